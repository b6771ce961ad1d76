"""Every registered model: units + head reproduce the plain model, FBA builds and steps."""

import pytest
import torch

import fba
from fba.tasks.classification.models import MODELS

HEAVY = {"resnet101", "resnet152", "resnet110"}


@pytest.mark.parametrize("name", fba.list_models("classification"))
def test_units_and_head_equal_plain_model(name):
    model = MODELS.get(name)(num_classes=7, in_channels=3)
    model.plain.eval()
    x = torch.randn(2, 3, 32, 32)
    h = x
    for unit in model.units:
        h = unit(h)
    torch.testing.assert_close(model.head(h), model.plain(x))
    assert len(model.specs) == len(model.units)
    assert model.specs[-1].out_channels == model.plain.fc.in_features


@pytest.mark.parametrize("name", [n for n in fba.list_models("classification") if n not in HEAVY])
def test_fba_one_module_per_unit_trains(name):
    n_units = len(MODELS.get(name)(num_classes=10).units)
    learner = fba.build_learner(model=name, method="fba", K=n_units, num_classes=10)
    out = learner.train_step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), torch.arange(4))
    assert len(learner.local_modules) == n_units and len(learner.aux_nets) == n_units - 1
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())


def test_slm_block_copies_the_stage_tail_architecture():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    learner = fba.build_learner(model="resnet50", method="fba", K=4, num_classes=10)
    assert all(isinstance(aux.block, Bottleneck) and aux.block.stride == 1 for aux in learner.aux_nets)
    learner = fba.build_learner(model="resnet32", method="fba", K=16, num_classes=10, **{"fba.reduction": 2})
    assert all(isinstance(aux.block, BasicBlock) for aux in learner.aux_nets)
    # channel reduction halves the SLM block's width
    assert learner.aux_nets[-1].block.conv1.out_channels == 32
