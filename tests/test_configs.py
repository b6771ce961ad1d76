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
    if cfg["model"].endswith(("resnet101", "resnet152")):
        return  # building ResNet-101 and -152 is covered by the model tests
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


K_BY_BLOCK = {34: 17, 50: 17, 101: 34, 152: 51}


@pytest.mark.parametrize("method", ["bp", "fba"])
@pytest.mark.parametrize("model", [*(f"retinanet_r{d}" for d in (34, 50, 101, 152)), *(f"yolov1_r{d}" for d in (34, 50, 101))])
def test_every_table_2_row_has_a_config(model, method):
    cfg = resolve_config(Path(__file__).parent.parent / "configs" / "voc" / f"{method}_{model}.yaml")
    depth = int(model.rsplit("r", 1)[1])
    assert (cfg["task"], cfg["data"]["name"], cfg["model"]) == ("detection", "voc", model.replace("_r", "_resnet"))
    assert cfg["method"] == method and (method == "bp" or cfg["K"] == K_BY_BLOCK[depth])
    assert cfg["optim"]["name"] == "sgd"  # the paper's recipe, not the built-in run's
    assert not model.startswith("retinanet") or cfg["det"]["fpn_channels"] == 256
    assert method == "bp" or cfg["fba"]["bank"]["source"] == "inpass"  # the paper's bank-fed local FPN


@pytest.mark.parametrize("name", [*(f"{m}_{a}_r{d}" for m in ("bp", "fba") for a in ("retinanet", "yolov1")
                                    for d in (34, 50, 101, 152)), "dgl_retinanet_r34", "ablation_no_adapt",
                                  "ablation_adapt", "ablation_adapt_shared_head"])
def test_every_table_3_and_4_row_has_a_config(name):
    cfg = resolve_config(Path(__file__).parent.parent / "configs" / "coco" / f"{name}.yaml")
    assert (cfg["task"], cfg["data"]["name"]) == ("detection", "coco")
    assert cfg["method"] == "bp" or (cfg["K"], cfg["partition"]) == (4, "stage")
    assert cfg["optim"]["name"] == "sgd" and ("retinanet" not in cfg["model"] or cfg["det"]["fpn_channels"] == 256)
    if name.startswith("ablation"):
        assert cfg["model"] == "retinanet_resnet34"
        assert cfg["fba"]["share_head"] == name.endswith("shared_head")
    if cfg["method"] == "fba":
        assert cfg["fba"]["bank"]["source"] == "inpass"
