"""Every shipped config validates and builds its learner (no data needed)."""

from pathlib import Path

import pytest

import fba
from fba.config import resolve_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
NUM_CLASSES = {"imagenet": 1000, "digits": 10}


def test_configs_exist():
    assert len(CONFIGS) >= 31


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_config_validates_and_builds(path):
    cfg = resolve_config(path)
    if cfg["model"] in ("resnet101", "resnet152"):
        return  # building ResNet-101 is covered by the model tests
    if cfg["init_from"]:  # x3/x4 start from the x2 run of the same method
        assert cfg["task"] == "super_resolution" and f"{cfg['method']}_edsr_x2" in cfg["init_from"]
        cfg["init_from"] = None
    data = cfg["data"]["name"]
    learner = fba.build_learner(cfg, num_classes=NUM_CLASSES.get(data, 10), in_channels=1 if data == "digits" else 3)
    assert learner.K == (1 if cfg["method"].startswith("bp") else cfg["K"])


@pytest.mark.parametrize("method", ["bp", "fba", "dgl", "predsim", "infopro", "auglocal"])
@pytest.mark.parametrize("dataset", ["cifar10", "svhn", "stl10"])
def test_every_table_1_row_has_a_config(dataset, method):
    cfg = resolve_config(Path(__file__).parent.parent / "configs" / dataset / f"{method}_resnet32.yaml")
    assert (cfg["model"], cfg["method"], cfg["data"]["name"], cfg["train"]["epochs"]) == ("resnet32", method, dataset, 400)
    assert cfg["data"]["batch_size"] == (128 if dataset == "stl10" else 1024)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("method", ["bp", "fba"])
def test_every_table_5_row_has_a_config(method, scale):
    cfg = resolve_config(Path(__file__).parent.parent / "configs" / "div2k" / f"{method}_edsr_x{scale}.yaml")
    assert (cfg["task"], cfg["model"], cfg["sr"]["scale"], cfg["sr"]["patch_size"]) == ("super_resolution", "edsr_baseline", scale, 48)
    assert (cfg["init_from"] is None) == (scale == 2)
