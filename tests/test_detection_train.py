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
