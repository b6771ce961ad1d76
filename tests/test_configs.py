"""Every shipped config validates and builds its learner (no data needed)."""

from pathlib import Path

import pytest

import fba
from fba.config import resolve_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
NUM_CLASSES = {"imagenet": 1000, "digits": 10}


def test_configs_exist():
    assert len(CONFIGS) >= 11


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_config_validates_and_builds(path):
    cfg = resolve_config(path)
    if cfg["model"] in ("resnet101", "resnet152"):
        assert cfg["method"] == "bp" or (cfg["K"], cfg["partition"]) == (4, "stage")
        return  # building ResNet-101 is covered by the model tests
    data = cfg["data"]["name"]
    learner = fba.build_learner(cfg, num_classes=NUM_CLASSES.get(data, 10), in_channels=1 if data == "digits" else 3)
    assert learner.K == (1 if cfg["method"].startswith("bp") else cfg["K"])
