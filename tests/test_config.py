import pytest

from fba.config import parse_override, resolve_config
from fba.errors import ConfigError


def test_defaults_are_the_builtin_run():
    cfg = resolve_config()
    assert (cfg["method"], cfg["model"], cfg["K"], cfg["data"]["name"]) == ("fba", "resnet32", 16, "digits")


def test_dotted_overrides_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: bp\ndata:\n  batch_size: 32\noptim:\n  lr: 1e-3\n")
    cfg = resolve_config(path, ["data.batch_size=64", "fba.bank.source=longterm"])
    assert cfg["method"] == "bp" and cfg["data"]["batch_size"] == 64
    assert cfg["optim"]["lr"] == pytest.approx(1e-3) and isinstance(cfg["optim"]["lr"], float)
    assert cfg["fba"]["bank"]["source"] == "longterm"
    assert cfg["data"]["name"] == "digits"  # untouched keys keep their defaults


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=-3", "'data.batch_size': expected an integer >= 2, got -3"),
    ("optim.lr=abc", "'optim.lr': expected a finite positive number, got 'abc'"),
    ("data.batch_sise=3", "unknown config key 'data.batch_sise' (did you mean 'data.batch_size'?)"),
    ("precision=fp8", "'precision': 'fp8' is not one of fp32, bf16, fp16"),
    ("train.epochs=2.5", "'train.epochs': expected a positive integer, got 2.5"),
    ("data=3", "'data' is a section"),
    ("noequals", "not of the form key=value"),
    ("predsim.beta=1.5", "'predsim.beta': expected a number in [0, 1], got 1.5"),
    ("infopro.weights_first=[1]", "'infopro.weights_first': expected a list of two non-negative numbers"),
    ("infopro.mode=simclr", "'infopro.mode': 'simclr' is not one of contrast, ce"),
    ("auglocal.depth=0", "'auglocal.depth': expected a positive integer, got 0"),
    ("sr.scale=8", "'sr.scale': 8 is not one of 2, 3, 4"),
    ("task=segmentation", "'task': 'segmentation' is not one of classification, detection, super_resolution"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        resolve_config(path)


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {batch_size: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        resolve_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve_config(listy)


def test_parse_override_types():
    assert parse_override("K=4") == ("K", 4)
    assert parse_override("fba.share_head=true") == ("fba.share_head", True)
    assert parse_override("cuts=[2, 5]") == ("cuts", [2, 5])
    assert parse_override("train.name=null") == ("train.name", None)


def test_task_defaults_give_a_complete_super_resolution_run(tmp_path):
    cfg = resolve_config(None, ["task=super_resolution"])
    assert (cfg["model"], cfg["data"]["name"], cfg["method"], cfg["sr"]["scale"]) == ("edsr_baseline", "photos-sr", "fba", 2)
    assert cfg["optim"]["name"] == "adam" and cfg["fba"]["bank"]["source"] == "inpass"
    # The task's defaults sit under the file and the overrides, which still win.
    path = tmp_path / "sr.yaml"
    path.write_text("task: super_resolution\nK: 9\noptim: {lr: 1.0e-4}\n")
    cfg = resolve_config(path, ["sr.scale=4"])
    assert (cfg["K"], cfg["optim"]["lr"], cfg["sr"]["scale"], cfg["optim"]["name"]) == (9, 1e-4, 4, "adam")
    assert resolve_config()["model"] == "resnet32"  # classification defaults are untouched
