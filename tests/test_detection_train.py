"""Detection batches through the trainer and the CLI: collate, targets on the device, mAP."""

import json

import pytest

from fba.cli import main
from test_detection_data import _voc


@pytest.mark.parametrize("method", ["bp", "fba"])
def test_train_detection_from_the_cli_on_voc_files(tmp_path, capsys, method):
    root = tmp_path / "voc"
    _voc(root)
    code = main(["train", "task=detection", f"method={method}", "data.name=voc", f"data.root={root}",
                 "data.image_size=64", "data.batch_size=2", "data.eval_batch_size=2", "train.epochs=2",
                 "train.progress=false", f"train.runs_dir={tmp_path / 'runs'}", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["task"] == "detection" and summary["dataset"] == "voc"
    assert {"map", "map50", "map75", "peak_memory_bytes"} <= set(summary)
    assert 0.0 <= summary["map50"] <= 1.0 and summary["peak_memory_bytes"] > 0


def test_eval_prints_the_per_class_table_and_draws_detections(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from fba.tasks.detection.data import VOC_CLASSES

    root = tmp_path / "voc"
    _voc(root)
    runs = tmp_path / "runs"
    assert main(["train", "task=detection", "method=fba", "data.name=voc", f"data.root={root}", "data.image_size=64",
                 "data.batch_size=2", "data.eval_batch_size=2", "train.epochs=1", "train.progress=false",
                 f"train.runs_dir={runs}", "train.name=det"]) == 0
    capsys.readouterr()
    # The table: one row per VOC class, difficult objects not counted, a mean row.
    assert main(["eval", str(runs / "det"), "det.draw_score=0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("voc validation: mAP@0.5") and "AP50 (11-pt)" in lines[1]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if not line.startswith("-")}
    assert set(rows) == {*VOC_CLASSES, "mean"}
    assert rows["person"][0] == "1" and rows["tvmonitor"][0] == "0" and rows["mean"][0] == "2"
    assert rows["tvmonitor"][1] == "nan"  # only a difficult object: no AP, left out of the mean
    assert main(["eval", str(runs / "det"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["class"] for r in result["per_class"]] == [*VOC_CLASSES, "mean"]
    # --out alone draws the validation images, named after their files.
    assert main(["eval", str(runs / "det"), "--out", str(tmp_path / "val_drawn"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(p.name for p in (tmp_path / "val_drawn").iterdir()) == ["000001.png", "000002.png"]
    assert Image.open(tmp_path / "val_drawn" / "000001.png").size == (64, 64)

    # A folder of images of any size, without the dataset: PNGs of the same size, boxes drawn.
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (70, 40, 3), dtype=np.uint8)).save(folder / "tall.png")
    import shutil

    shutil.rmtree(root)
    out = tmp_path / "drawn"
    assert main(["eval", str(runs / "det"), "--images", str(folder), "--out", str(out), "det.draw_score=0",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 2 and result["out"] == str(out)
    assert Image.open(out / "wide.png").size == (90, 50) and Image.open(out / "tall.png").size == (40, 70)


def test_detect_maps_boxes_back_to_each_images_own_pixels():
    import torch

    from fba.tasks.detection.draw import detect

    class WholeInput(torch.nn.Module):
        """Finds one object covering its whole (square) input."""

        def forward(self, batch):
            size = batch.shape[-1]
            assert batch.shape[-2:] == (size, size)
            return [{"boxes": torch.tensor([[0., 0., size / 2, size]]), "scores": torch.tensor([0.7]),
                     "labels": torch.tensor([3])} for _ in batch]

    found = detect(WholeInput(), [torch.rand(3, 50, 90), torch.rand(3, 70, 40)], image_size=64,
                   device=torch.device("cpu"))
    assert found[0]["boxes"].tolist() == [[0.0, 0.0, 45.0, 50.0]] and found[1]["boxes"].tolist() == [[0.0, 0.0, 20.0, 70.0]]
    assert found[1]["labels"].tolist() == [3] and found[1]["scores"].tolist() == [0.699999988079071]


def test_draw_detections_labels_boxes_above_the_threshold_only():
    import torch

    from fba.tasks.detection.draw import draw_detections

    image = torch.zeros(3, 40, 40)
    detections = {"boxes": torch.tensor([[2., 2., 20., 20.], [25., 25., 38., 38.]]),
                  "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 0])}
    drawn = draw_detections(image, detections, ["a", "b"], score_threshold=0.5)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 40, 40)
    assert drawn[:, 2, 2:20].sum() > 0  # the kept box's edge
    assert drawn[:, 30:38, 37].sum() == 0 and drawn[:, 37, 30:38].sum() == 0  # the low-score box is not drawn


def test_bench_builds_the_detector_for_the_measured_input_size(capsys, tmp_path):
    # A detector built for another size would resize the batch inside its transform, so the
    # figures would be those of another shape; a contradicting data.image_size is refused.
    assert main(["bench", "memory", "task=detection", "data.image_size=128", "--input-size", "64"]) == 2
    assert "data.image_size=128 and --input-size 64 disagree" in capsys.readouterr().err
    config = tmp_path / "det.yaml"
    config.write_text("task: detection\ndata: {image_size: 96}\n")
    assert main(["bench", "memory", str(config), "--input-size", "64"]) == 2  # the same rule for a YAML file
    assert "data.image_size=96 and --input-size 64 disagree" in capsys.readouterr().err
    from fba.config import resolve_config

    assert resolve_config(None, ["task=detection"])["data"]["image_size"] == 128  # the default run's size


@pytest.mark.parametrize("method", ["bp", "fba", "dgl"])
def test_train_step_takes_a_list_of_differently_sized_images(method):
    import math

    import torch

    import fba

    torch.manual_seed(0)
    learner = fba.build_learner(task="detection", model="retinanet_resnet18", method=method, K=4, num_classes=3,
                                **{"data.image_size": 64})
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    out = learner.train_step(images, targets)
    assert math.isfinite(out["loss"]) and len([k for k in out if k.startswith("loss/")]) == learner.K
