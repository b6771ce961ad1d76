"""The classification baselines (DGL, PredSim, InfoPro, AugLocal): build, train, isolate, and
the facts of each reference (shared/reference/baselines.md) they implement."""

import math

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import fba
from fba.engine.partition import partition_units
from fba.methods import get_method
from fba.methods.auglocal import AugLocal, pyramidal_depth, sampled_unit_indices
from fba.methods.base import BuildContext
from fba.methods.dgl import DGL, MLPSRClassifierAux
from fba.methods.infopro import InfoPro, images_to_unit_range, supervised_contrastive_loss
from fba.methods.predsim import PredSim, PredSimAux, prediction_pool_size, similarity_matrix
from fba.tasks.classification.models import MODELS
from fba.tasks.classification.task import ClassificationTask

from conftest import assert_perturbing_aux_changes_only_its_module, tiny_batch

BASELINES = ["dgl", "predsim", "infopro", "auglocal"]
NO_MOMENTUM = {"optim": {"momentum": 0.0, "weight_decay": 0.0, "nesterov": False}}


def _context(model_name: str, K: int, num_classes: int = 10) -> BuildContext:
    model = MODELS.get(model_name)(num_classes=num_classes)
    return BuildContext(model=model, groups=partition_units(model.specs, K), task=ClassificationTask())


# ---- every method, every block type ------------------------------------------------------------
@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("model, K, size, extra", [
    ("resnet8", 4, 16, {}),
    ("resnet18", 4, 32, {}),  # K = stages: one module per stage, stem in the first
    # Bottleneck blocks; the cuts keep the aux nets on the narrow early maps, for speed.
    ("resnet50", 4, 32, {"cuts": [1, 2, 4]}),
])
def test_builds_and_trains_with_finite_losses(method, model, K, size, extra):
    learner = fba.build_learner(model=model, method=method, K=K, num_classes=10, **extra)
    assert learner.K == K and len(learner.aux_nets) == K - 1
    assert learner.step_mode == get_method(method).default_step
    x, y = tiny_batch(n=8, size=size)
    for _ in range(2):
        out = learner.train_step(x, y)
        assert all(math.isfinite(out[f"loss/{k}"]) for k in range(K)), out


@pytest.mark.parametrize("method", BASELINES)
def test_every_aux_parameter_is_registered_and_trained(method):
    learner = fba.build_learner(model="resnet8", method=method, K=4, num_classes=10, **NO_MOMENTUM)
    before = [p.detach().clone() for p in learner.aux_nets.parameters()]
    assert before, "aux nets must be registered modules"
    x, y = tiny_batch()
    learner.train_step(x, y)
    unchanged = [name for (name, p), q in zip(learner.aux_nets.named_parameters(), before) if torch.equal(p, q)]
    assert not unchanged


@pytest.mark.parametrize("method", BASELINES)
def test_num_classes_comes_from_the_model_head(method):
    kwargs = {"mode": "ce"} if method == "infopro" else {}
    ctx = _context("resnet8", K=2, num_classes=7)
    (aux,) = get_method(method)(**kwargs).build_aux_nets(ctx)
    h = torch.randn(4, 16, 8, 8)
    out = aux(h, (16, 16)) if method == "infopro" else aux(h)
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (4, 7)


# ---- the invariants ---------------------------------------------------------------------------
@pytest.mark.parametrize("step", ["auto", "global", "per_module"])
@pytest.mark.parametrize("method", BASELINES)
def test_perturbing_aux_j_changes_only_module_j(method, step):
    x, y = tiny_batch()
    kwargs = dict(model="resnet8", method=method, K=4, num_classes=10, **{"optim.step": step})
    assert_perturbing_aux_changes_only_its_module(lambda: fba.build_learner(**kwargs), (x, y, None))


@pytest.mark.parametrize("method", BASELINES)
def test_K1_equals_bp(method):
    x, y = tiny_batch()
    local = fba.build_learner(model="resnet8", method=method, K=1, num_classes=10)
    bp = fba.build_learner(model="resnet8", method="bp", num_classes=10)
    assert len(local.aux_nets) == 0
    bp.plain.load_state_dict(local.plain.state_dict())
    for _ in range(2):
        assert local.train_step(x, y)["loss"] == bp.train_step(x, y)["loss"]
    for p, q in zip(local.plain.state_dict().values(), bp.plain.state_dict().values()):
        assert torch.equal(p, q)


def test_aux_nets_refuse_a_task_without_a_classifier_head():
    class Regression(ClassificationTask):
        name = "regression"

    ctx = _context("resnet8", K=3)
    with pytest.raises(ValueError, match="no auxiliary network for task 'regression'"):
        DGL().build_aux_nets(BuildContext(ctx.model, ctx.groups, Regression()))
    ctx.model.head = nn.Identity()
    for method in (PredSim(), InfoPro(), AugLocal()):
        with pytest.raises(ValueError, match="not a classifier"):
            method.build_aux_nets(ctx)


# ---- DGL ---------------------------------------------------------------------------------------
def test_dgl_aux_is_mlp_sr():
    learner = fba.build_learner(model="resnet32", method="dgl", K=16, num_classes=10)
    aux = learner.aux_nets[8]  # module 8 is a stage-2 block: 32 channels, 16x16
    assert isinstance(aux, MLPSRClassifierAux)
    kinds = [type(m) for m in aux.convs]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    assert all(c.kernel_size == (1, 1) and c.bias is None and (c.in_channels, c.out_channels) == (32, 32)
               for c in aux.convs if isinstance(c, nn.Conv2d))
    assert [type(m) for m in aux.mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2
    assert all(lin.bias is None and (lin.in_features, lin.out_features) == (128, 128)
               for lin in aux.mlp if isinstance(lin, nn.Linear))
    assert (aux.fc.in_features, aux.fc.out_features) == (128, 10)
    seen = []
    aux.convs[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    assert aux(torch.randn(4, 32, 16, 16)).shape == (4, 10)
    assert seen == [(4, 4)]  # pooled to ceil(16 / 4)
    aux(torch.randn(4, 32, 7, 7))
    assert seen[-1] == (2, 2)  # ceil(7 / 4)


# ---- PredSim -----------------------------------------------------------------------------------
def test_predsim_similarity_matrix():
    x = torch.randn(6, 8, 5, 5)
    r = similarity_matrix(x)
    assert r.shape == (6, 6)
    torch.testing.assert_close(r, r.t())
    torch.testing.assert_close(torch.diagonal(r), torch.ones(6))
    assert r.min() >= -1 and r.max() <= 1
    # 4-D maps are compared by their channels' spatial standard deviations.
    torch.testing.assert_close(r, similarity_matrix(x.flatten(2).std(dim=2)))
    assert similarity_matrix(torch.randn(3, 4, 1, 1)).isfinite().all()  # no std of one position


def test_predsim_loss_vanishes_when_the_features_mirror_the_labels():
    method = PredSim()
    method.num_classes = 10
    same = torch.randn(1, 8, 4, 4).expand(6, -1, -1, -1)
    assert method.similarity_loss(same, torch.full((6,), 3)).item() < 1e-10
    # Two classes, each sample's feature a function of its class only: sim matrices match.
    labels = torch.tensor([0, 1, 0, 1])
    features = torch.zeros(4, 10, 3, 3)
    features[:, :, 0, 0] = torch.nn.functional.one_hot(labels, 10).float()
    assert method.similarity_loss(features, labels).item() < 1e-10
    assert method.similarity_loss(torch.randn(4, 10, 3, 3), labels).item() > 1e-3


def test_predsim_heads():
    assert [prediction_pool_size(c, 512) for c in (16, 32, 64, 2048)] == [4, 4, 2, 1]
    aux = PredSimAux(32, 10)
    assert aux.classifier.in_features == 32 * 4 * 4 <= 512
    assert not aux.classifier.weight.any()  # zero-initialised, as in the reference
    assert aux.similarity.kernel_size == (3, 3) and aux.similarity.bias is None
    logits, features = aux(torch.randn(2, 32, 16, 16))
    assert logits.shape == (2, 10) and features.shape == (2, 32, 16, 16)
    with pytest.raises(ValueError):
        PredSim(beta=1.5)


# ---- InfoPro -----------------------------------------------------------------------------------
def test_infopro_weights_are_interpolated_from_first_to_last_aux_module():
    method = InfoPro()
    assert method.loss_weights(0, 16) == (5.0, 0.05)
    w1, w2 = method.loss_weights(14, 16)
    assert w1 == pytest.approx(0.2) and w2 == pytest.approx(0.5)
    assert method.loss_weights(7, 16) == (pytest.approx(2.6), pytest.approx(0.275))
    assert method.loss_weights(0, 2) == (5.0, 0.05)  # K=2: one aux module, no division by zero
    custom = InfoPro(weights_first=(1.0, 0.0), weights_last=(0.0, 1.0))
    assert custom.loss_weights(1, 4) == (0.5, 0.5)


def test_infopro_aux_heads():
    learner = fba.build_learner(model="resnet32", method="infopro", K=16, num_classes=10)
    convs = [aux.head[0] for aux in learner.aux_nets]
    # 1c2f: 16 and 32 channels widen to 2C at stride 2; the last stage's 64 stays at stride 1.
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in (convs[0], convs[8], convs[14])] == \
        [(16, 32, 2), (32, 64, 2), (64, 64, 1)]
    assert learner.aux_nets[0].head[-1].out_features == 128  # contrast mode: a 128-d embedding
    decoder = learner.aux_nets[0].decoder
    assert (decoder[0].out_channels, decoder[-1].out_channels) == (12, 3)
    ce = InfoPro(mode="ce").build_aux_nets(_context("resnet18", K=4))
    assert ce[0].head[-1].out_features == 10
    # torchvision widths follow the same rule: widen before the last stage.
    assert [(a.head[0].in_channels, a.head[0].out_channels) for a in ce] == [(64, 128), (128, 256), (256, 512)]
    out, reconstruction = ce[1](torch.randn(2, 128, 4, 4), (32, 32))
    assert out.shape == (2, 10) and reconstruction.shape == (2, 3, 32, 32)


def test_infopro_recovers_the_image_from_normalised_inputs():
    images = torch.rand(2, 3, 8, 8)
    images[:, :, 0, 0], images[:, :, 0, 1] = 0.0, 1.0  # every channel spans [0, 1]
    mean, std = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1), torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    torch.testing.assert_close(images_to_unit_range((images - mean) / std), images)


def test_supervised_contrastive_loss():
    labels = torch.tensor([0, 0, 1, 1])
    aligned = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert supervised_contrastive_loss(aligned, labels) < supervised_contrastive_loss(aligned, torch.tensor([0, 1, 0, 1]))
    assert supervised_contrastive_loss(torch.randn(3, 5), torch.tensor([0, 1, 2])).item() == 0.0  # no positive pairs
    loss = supervised_contrastive_loss(torch.randn(5, 8, requires_grad=True), torch.tensor([0, 0, 1, 2, 3]))
    assert loss.isfinite() and loss.requires_grad


# ---- AugLocal ----------------------------------------------------------------------------------
def test_auglocal_depth_schedule_and_sampled_units_on_resnet32_K16():
    learner = fba.build_learner(model="resnet32", method="auglocal", K=16, num_classes=10)
    assert learner.K == 16 and len(learner.aux_nets) == 15  # K is not reduced by the aux depth
    L, K, d, tau = 16, 16, 2, 0.5
    for k, aux in enumerate(learner.aux_nets):
        depth = max(1, round(d * (1 - k * tau / (K - 2)) + k * tau / (K - 2)))
        expected = [min(L - 1, max(k + 1, round(k + (L - k - 1) / depth * i))) for i in range(1, depth + 1)]
        assert aux.unit_indices == expected and len(aux.blocks) == depth
    assert learner.aux_nets[0].unit_indices == [8, 15]
    assert learner.aux_nets[13].unit_indices == [14, 15]
    first = learner.aux_nets[0]
    # Unit 8 is a stage-2 block (32 wide, 16x16), unit 15 a stage-3 one (64 wide, 8x8).
    assert [(b.conv1.in_channels, b.conv2.out_channels, b.conv1.stride[0]) for b in first.blocks] == [(16, 32, 2), (32, 64, 2)]
    assert isinstance(first.norm, nn.Identity) and first.fc.in_features == 64
    assert first(torch.randn(2, 16, 32, 32)).shape == (2, 10)


def test_auglocal_pyramidal_depth_formula():
    assert [pyramidal_depth(k, 16, 5, 0.5) for k in (0, 4, 11, 14)] == [5, 4, 3, 3]
    assert [pyramidal_depth(k, 16, 3, 0.5) for k in (0, 7, 14)] == [3, 2, 2]
    assert pyramidal_depth(0, 2, 3, 0.5) == 3  # K=2: no division by zero
    assert sampled_unit_indices(0, 16, 3) == [5, 10, 15]
    assert sampled_unit_indices(14, 16, 2) == [15, 15]  # kept after the module


def test_auglocal_depth_one_has_batchnorm_and_bottlenecks_are_rebuilt():
    nets = AugLocal(depth=1).build_aux_nets(_context("resnet32", K=16))
    assert all(len(a.blocks) == 1 and isinstance(a.norm, nn.BatchNorm1d) for a in nets)
    ctx = _context("resnet50", K=4)  # stage partition: modules end at 256, 512, 1024 channels
    nets = AugLocal().build_aux_nets(ctx)
    assert all(isinstance(b, Bottleneck) for a in nets for b in a.blocks)
    assert all(a.unit_indices[-1] == len(ctx.model.specs) - 1 for a in nets)
    assert nets[0](torch.randn(2, 256, 8, 8)).shape == (2, 10)
    assert all(isinstance(b, BasicBlock) for a in AugLocal().build_aux_nets(_context("resnet18", K=4)) for b in a.blocks)
    with pytest.raises(ValueError):
        AugLocal(depth=0)


@pytest.mark.parametrize("method", ["dgl", "predsim", "infopro", "auglocal"])
def test_every_baseline_trains_resnet32_K16_from_the_cli(method, tmp_path, capsys):
    import json

    from fba.cli import main

    code = main(["train", f"method={method}", "model=resnet32", "K=16", "train.epochs=1", "train.progress=false",
                 "data.per_class_train=8", "data.per_class_test=4", "data.batch_size=40",
                 f"train.runs_dir={tmp_path}", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["method"] == method and summary["K"] == 16
    rows = json.loads((tmp_path / next(tmp_path.iterdir()) / "metrics.json").read_text())
    assert all(math.isfinite(r["train_loss"]) for r in rows) and 0 <= summary["top1"] <= 1
