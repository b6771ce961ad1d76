"""fba compare: one budget for every method, one row per method, ratios to bp, files written."""

import json

from fba.cli import main

FAST = ["model=resnet8", "K=4", "train.epochs=1", "train.progress=false", "data.batch_size=128",
        "data.per_class_train=30", "data.per_class_test=10"]


def test_compare_writes_table_1_shape(capsys, tmp_path):
    code = main(["compare", *FAST, "--methods", "bp,fba,dgl", "--out", str(tmp_path), "--json", "--quiet"])
    out, _ = capsys.readouterr()
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["method"] for r in rows] == ["bp", "fba", "dgl"]
    assert [r["K"] for r in rows] == [1, 4, 4]
    bp = rows[0]
    assert bp["memory_ratio_to_bp"] == 1.0 and bp["time_ratio_to_bp"] == 1.0
    for row in rows:
        assert 0.0 <= row["metric"] <= 1.0 and row["metric"] == row["top1"]
        assert row["peak_memory_bytes"] > 0 and row["seconds_per_epoch"] > 0
        assert row["memory_ratio_to_bp"] == row["peak_memory_bytes"] / bp["peak_memory_bytes"]
        assert row["epochs"] == 1 and row["dataset"] == "digits"  # one budget for all
    for name in ("compare.csv", "compare.md", "compare.json", "compare.png"):
        assert (tmp_path / name).is_file(), name
    assert "| method | K | top1 |" in (tmp_path / "compare.md").read_text()
    assert len(list((tmp_path / "runs").iterdir())) == 3


def test_compare_refuses_unknown_or_repeated_methods_before_training(capsys, tmp_path):
    for methods, fragment in (("bp,fbaa", "did you mean 'fba'"), ("bp,bp", "twice"), (",", "at least one")):
        code = main(["compare", *FAST, "--methods", methods, "--out", str(tmp_path)])
        _, err = capsys.readouterr()
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
