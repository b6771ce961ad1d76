"""The command line: the default run's outputs, resume, eval/export/bench, and bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fba.cli import main

FAST = ["model=resnet8", "K=4", "train.epochs=1", "train.progress=false", "data.batch_size=128"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    code = main(["train", *FAST, f"train.runs_dir={runs}", "train.epochs=2", "--json"])
    assert code == 0
    return next(runs.iterdir())


def test_train_json_and_run_folder(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", *FAST, f"train.runs_dir={tmp_path}", "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert {"run_dir", "top1", "peak_memory_bytes", "seconds_per_epoch", "world_size"} <= set(summary)
    assert 0.0 <= summary["top1"] <= 1.0 and summary["peak_memory_bytes"] > 0 and summary["world_size"] == 1
    run = Path(summary["run_dir"])
    for name in ("config.yaml", "metrics.csv", "metrics.json", "curves.png", "summary.json",
                 "checkpoints/last.safetensors", "checkpoints/last_state.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_with_the_balanced_partition_prints_cuts_that_pin_it(capsys, tmp_path, monkeypatch):
    import fba.build

    probe_sizes = []
    measure = fba.build.measure_partition_costs

    def spy(*args, **kwargs):
        probe_sizes.append(kwargs.get("input_size", args[6] if len(args) > 6 else None))
        return measure(*args, **kwargs)

    monkeypatch.setattr(fba.build, "measure_partition_costs", spy)
    code, out, err = run_cli(capsys, "train", *FAST, "K=2", "partition=balanced", "train.epochs=1",
                             f"train.runs_dir={tmp_path}", "train.name=balanced")
    assert code == 0, err
    assert probe_sizes == [8]  # the built-in digits' 8x8 images, not data.image_size (ImageNet's 224)
    line = next(text for text in (out + err).splitlines() if text.startswith("partition=balanced"))
    cuts = line.split("cuts=")[1].split(" ")[0]
    code, out, err = run_cli(capsys, "train", *FAST, "K=2", "partition=cuts", f"cuts={cuts}", "train.epochs=1",
                             f"train.runs_dir={tmp_path}", "train.name=pinned")
    assert code == 0, err
    # the same modules, weights and data order: the same training, metric for metric
    balanced, pinned = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("balanced", "pinned"))
    for row_a, row_b in zip(balanced, pinned):
        assert {k: v for k, v in row_a.items() if "second" not in k} == \
            {k: v for k, v in row_b.items() if "second" not in k}


def test_bench_takes_the_balanced_partition_from_the_config(capsys, tmp_path):
    # Its check before measuring used to need measured costs and stopped with a traceback.
    code, out, err = run_cli(capsys, "bench", "memory", "model=resnet8", "K=2", "partition=balanced",
                             "--batch-size", "4", "--input-size", "16", "--methods", "bp,fba", "--out", str(tmp_path),
                             "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "bench", "memory", "model=resnet8", "K=9", "partition=balanced", "--methods", "fba",
                           "--out", str(tmp_path))
    assert code == 2 and err.strip() == "fba: error: K=9 is impossible for a backbone of 4 units: choose K in 1..4"


def test_metrics_hold_each_modules_local_loss(trained_run):
    """K=4: one mean local loss per module and epoch; the last module's is the train loss."""
    rows = json.loads((trained_run / "metrics.json").read_text())
    for row in rows:
        local = [row[f"train_loss/{k}"] for k in range(4)]
        assert all(math.isfinite(v) and v > 0 for v in local)
        assert local[-1] == pytest.approx(row["train_loss"])


def test_eval_reproduces_the_final_top1(capsys, trained_run):
    final = json.loads((trained_run / "summary.json").read_text())["top1"]
    code, out, _ = run_cli(capsys, "eval", str(trained_run), "--json")
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(final)


def test_export_writes_plain_model(capsys, trained_run, tmp_path):
    from safetensors.torch import load_file

    from fba.tasks.classification.models import CifarResNet

    out_file = tmp_path / "m.safetensors"
    code, out, _ = run_cli(capsys, "export", str(trained_run), "--out", str(out_file), "--json")
    assert code == 0
    state = load_file(str(out_file))
    model = CifarResNet(8, num_classes=10, in_channels=1)
    model.load_state_dict(state, strict=True)


def test_bench_memory_writes_table_and_chart(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "bench", "memory", "model=resnet20", "K=10", "--batch-size", "32",
                           "--input-size", "32", "--out", str(tmp_path), "--json", "--quiet")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["method"] for r in rows] == ["bp", "bp_checkpoint", "fba"]
    assert rows[0]["memory_ratio_to_bp"] == 1.0 and rows[2]["memory_ratio_to_bp"] < 1.0
    for r in rows:
        parts = sum(r[k] for k in ("params", "grads", "optimizer", "bank", "activations"))
        assert parts == r["peak_bytes"]
    for name in ("memory.csv", "memory.md", "memory.png"):
        assert (tmp_path / name).is_file()


def test_bench_time(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "bench", "time", "model=resnet8", "K=4", "--methods", "bp,fba", "--batch-size", "8",
                           "--input-size", "16", "--steps", "3", "--warmup", "1", "--out", str(tmp_path), "--json", "--quiet")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert rows[1]["time_ratio_to_bp"] > 0 and (tmp_path / "time.png").is_file()


def test_list(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "resnet32" in out and "bp_checkpoint" in out and "patches" in out


def test_warnings_print_as_one_line_and_the_handler_is_restored(capsys, monkeypatch):
    import warnings

    import fba.cli

    def list_with_a_warning(args):
        warnings.warn("dropped 2 annotation(s) with a zero-width or zero-height box (ids 918, 919)")
        return 0

    monkeypatch.setattr(fba.cli, "cmd_list", list_with_a_warning)
    before = warnings.showwarning
    code, _, err = run_cli(capsys, "list")
    assert code == 0 and err == "fba: warning: dropped 2 annotation(s) with a zero-width or zero-height box (ids 918, 919)\n"
    assert warnings.showwarning is before


@pytest.mark.parametrize("argv, fragment", [
    (["train", "K=0"], "K=0 is impossible for a backbone of 16 units: choose K in 1..16"),
    (["train", "K=17"], "choose K in 1..16"),
    (["train", "model=resnet33"], "unknown model 'resnet33'"),
    (["train", "method=dgk"], "unknown method 'dgk'"),
    (["train", "data.name=fashion-mnist"], "unknown dataset 'fashion-mnist'"),
    (["train", "optimizer.lr=0.1"], "unknown config key 'optimizer.lr'"),
    (["train", "data.batch_size=-1"], "'data.batch_size': expected an integer >= 2, got -1"),
    (["train", "optim.lr=fast"], "'optim.lr': expected a finite positive number, got 'fast'"),
    (["train", "missing.yaml"], "config file 'missing.yaml' not found"),
    (["train", "data.name=cifar10", "data.root=/nonexistent/fba-data"], "CIFAR-10 not found or corrupt under /nonexistent/fba-data"),
    (["train", "data.name=imagenet", "data.root=/nonexistent/fba-data"], "ImageNet folder"),
    (["eval", "/nonexistent/run"], "neither a run folder"),
    (["bench", "memory", "--batch-size", "-2"], "--batch-size must be positive"),
    (["bench", "memory", "--methods", "bp,nope"], "unknown method 'nope'"),
    (["bench", "memory", "--methods", ","], "give at least one method"),
    (["bench", "memory", "--batch-size", "4", "K=0"], "choose K in 1..16"),
    (["bench", "memory", "--batch-size", "64", "--num-samples", "8"], "--num-samples (8) must be at least"),
    (["train", "device=mps"], "expected auto, cpu, cuda or cuda:N"),
    (["train", "seed=99999999999999999999"], "'seed': expected an integer in [0, 2**32)"),
    (["train", "optim.warmup_epochs=.inf"], "finite non-negative number"),
    (["train", "precision=fp16", "device=cpu"], "fp16 needs CUDA"),
    (["train", "data.batch_size=1"], "expected an integer >= 2"),
    (["train", "train.runs_dir=/dev/null/x"], "cannot create the run folder"),
    (["train", str(Path(__file__).parent.parent / "configs/builtin/ci.yaml"), "resume=runs/x"], "continues with that run's own config.yaml"),
    (["train", "resume=/nonexistent/run"], "is not a run folder"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fba: error: ") and fragment in lines[0], err
    assert "Traceback" not in err


def test_malformed_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [resnet32\n")
    code, _, err = run_cli(capsys, "train", str(bad))
    assert code == 2 and "not valid YAML" in err and len(err.strip().splitlines()) == 1


def test_structural_override_on_eval_is_a_clear_error(capsys, trained_run):
    code, _, err = run_cli(capsys, "eval", str(trained_run), "fba.bank.source=lookahead", "model=resnet20")
    assert code == 2 and "does not fit this config" in err and len(err.strip().splitlines()) == 1


def test_exported_file_is_not_a_training_checkpoint(capsys, trained_run, tmp_path):
    out_file = tmp_path / "m.safetensors"
    assert main(["export", str(trained_run), "--out", str(out_file)]) == 0
    code, _, err = run_cli(capsys, "eval", str(out_file))
    assert code == 2 and "not a training checkpoint" in err


def test_options_before_overrides(capsys, trained_run):
    code, out, _ = run_cli(capsys, "eval", str(trained_run), "--json", "device=cpu")
    assert code == 0 and "top1" in json.loads(out)


def test_torn_checkpoint_is_detected(tmp_path):
    from fba.errors import DataError
    from fba.training.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, {"model.w": torch.ones(2)}, {"rows": []}, epoch=3)
    torch.save({"rows": [], "epoch": 4}, tmp_path / "last_state.pt")
    with pytest.raises(DataError, match="inconsistent: weights from epoch 3, training state from epoch 4"):
        load_checkpoint(tmp_path)


def test_a_save_torn_between_weights_and_state_resumes_from_the_previous_pair(tmp_path, monkeypatch):
    import os
    import stat

    from fba.training import checkpoint
    from fba.training.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, {"model.w": torch.ones(2)}, {"rows": [1]}, epoch=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process stops after the weights, before the state

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"model.w": torch.full((2,), 2.0)}, {"rows": [1, 2]}, epoch=2)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="stopped while saving epoch 2; using the complete checkpoint of epoch 1"):
        weights, state = load_checkpoint(tmp_path)
    assert weights["model.w"].tolist() == [1.0, 1.0] and state["epoch"] == 1 and state["rows"] == [1]
    # A complete save makes the pair consistent again, and files get the umask's permissions.
    save_checkpoint(tmp_path, {"model.w": torch.full((2,), 3.0)}, {"rows": [1, 2]}, epoch=2)
    weights, state = load_checkpoint(tmp_path)
    assert weights["model.w"].tolist() == [3.0, 3.0] and state["epoch"] == 2
    mask = os.umask(0)
    os.umask(mask)
    for name in ("last.safetensors", "last_state.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors", "last_state.pt", "prev.safetensors"]


def test_console_script_exits_nonzero_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "fba.cli", "train", "K=0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fba: error:") and "Traceback" not in proc.stderr


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(capsys, tmp_path):
    from fba.config import resolve_config
    from fba.errors import NonFiniteLossError
    from fba.training.trainer import Trainer

    cfg = resolve_config(None, [*FAST, "train.epochs=3", f"train.runs_dir={tmp_path}"])
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.fit(stop_after_epochs=1)
    weights = trainer.run_dir / "checkpoints" / "last.safetensors"
    before = weights.read_bytes()
    original = trainer.learner.task.loss
    trainer.learner.task.loss = lambda out, y: original(out, y) * float("nan")
    with pytest.raises(NonFiniteLossError, match="loss of module .* is nan.*last good checkpoint is kept"):
        trainer.fit()
    assert weights.read_bytes() == before


def test_resume_matches_an_uninterrupted_run(tmp_path):
    from fba.config import resolve_config
    from fba.training.trainer import Trainer

    common = [*FAST, "train.epochs=2", "fba.bank.source=longterm", f"train.runs_dir={tmp_path}"]
    full = Trainer(resolve_config(None, common + ["train.name=full"]), log=lambda m: None)
    full.fit()
    part = Trainer(resolve_config(None, common + ["train.name=part"]), log=lambda m: None)
    part.fit(stop_after_epochs=1)
    resumed = Trainer.resume(part.run_dir, log=lambda m: None)
    assert resumed.start_epoch == 2
    summary = resumed.fit()
    for (name, a), b in zip(full.learner.weights().items(), resumed.learner.weights().values()):
        assert torch.equal(a, b), name
    assert torch.equal(full.learner.bank.table, resumed.learner.bank.table)
    assert summary["epochs"] == 2
    assert [r["top1"] for r in json.loads((part.run_dir / "metrics.json").read_text())] == [r["top1"] for r in full.rows]
