"""FBA's detection SLMs and bank, and DGL's FPN aux: the DESIGN section 1 invariants for detection."""

import copy
import itertools
import math

import pytest
import torch
from torchvision.models.detection import RetinaNet

import fba
from fba.config import resolve_config
from fba.errors import FBAError
from fba.tasks import get_task
from fba.methods.fba import feature_mismatch
from fba.tasks.detection.local import (
    DetectionSLM, FPNAux, LocalFPN, MultiScaleMapBank, YOLOSLM, coarser_sources, finer_sources, local_settings,
    predictor_sources,
)
from fba.tasks.detection.models import torchvision_retinanet

from conftest import assert_perturbing_aux_changes_only_its_module

SIZE = 64
DET = {"task": "detection", "device": "cpu", "data.image_size": SIZE}
INPASS = {"fba.bank.source": "inpass"}  # the paper's bank; the built-in run's default has none
TARGET = {"fba.bank.source": "lookahead", "fba.bank.usage": "target"}
NO_MOMENTUM = {"optim.momentum": 0.0, "optim.nesterov": False, "optim.weight_decay": 0.0}


def batch(n: int = 2, size: int = SIZE, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    cfg = resolve_config(None, ["task=detection"])
    return get_task("detection").synthetic_batch(cfg, n, 3, size, 3, generator, torch.device("cpu"))


def learner(model="retinanet_resnet18", method="fba", K=4, **options):
    return fba.build_learner(**DET, model=model, method=method, K=K, num_classes=3, **options)


def record_bank_reads(net) -> dict:
    """Wrap ``net.bank.read``: the returned dict gets each SLM's bank maps as they are read."""
    read, seen = net.bank.read, {}

    def spy(k, device):
        maps, valid = read(k, device)
        seen[k] = maps
        return maps, valid

    net.bank.read = spy
    return seen


# ---- what gets built ------------------------------------------------------------------------------
def test_fba_builds_detection_slms_fed_by_finer_maps_of_earlier_modules():
    net = learner(**INPASS)
    assert all(isinstance(aux, DetectionSLM) for aux in net.aux_nets)
    assert isinstance(net.bank, MultiScaleMapBank)
    # K=4 by stage: module 0 (stem + layer1, stride 4), 1 (layer2, stride 8), 2 (layer3, stride 16).
    assert net.bank.sources == [[], [], [1]]
    assert [len(aux.fpn.finer_laterals) for aux in net.aux_nets] == [0, 0, 1]
    assert all(aux.fpn.strides == [8, 16, 32, 64, 128] for aux in net.aux_nets)
    # The heads are light and of the main head's type, with its anchors on the same levels.
    aux = net.aux_nets[2]
    assert len(aux.head.net.head.classification_head.conv) == 1
    assert aux.head.net.anchor_generator.sizes == net.plain.anchor_generator.sizes
    assert local_settings(net.plain) == {"channels": 64, "head_convs": 1, "coarser": True, "finer": False,
                                         "min_stride": None, "zero_init": False, "lookahead_fusion": "replace"}
    slm = sum(p.numel() for p in aux.parameters())
    assert slm < 0.25 * sum(p.numel() for p in net.plain.parameters())


def test_the_built_in_default_has_no_bank():
    net = learner()  # fba.bank.source=none, chosen by the bank ablation (docs/detection.md)
    assert net.bank is None and all(len(aux.fpn.finer_laterals) == 0 for aux in net.aux_nets)
    # SLM 2 (layer3, stride 16) then has no P3: its own level and the coarser ones it makes.
    assert [aux.fpn.strides for aux in net.aux_nets] == [[8, 16, 32, 64, 128]] * 2 + [[16, 32, 64, 128]]


def test_local_finer_makes_the_missing_finer_levels_by_upsampling_where_the_bank_gives_none():
    net = learner(**{"det.local_finer": True})
    assert [aux.fpn.strides for aux in net.aux_nets] == [[8, 16, 32, 64, 128]] * 3
    assert [len(aux.fpn.upsamplers) for aux in net.aux_nets] == [0, 0, 1]  # SLM 2: P3 from its own map
    images, targets = batch()
    losses = net.train_step(images, targets)
    assert all(math.isfinite(v) for v in losses.values())
    # An SLM that reads the bank keeps its maps as the finer levels.
    net = learner(**{"det.local_finer": True}, **INPASS)
    assert [len(aux.fpn.upsamplers) for aux in net.aux_nets] == [0, 0, 0]
    assert [len(aux.fpn.finer_laterals) for aux in net.aux_nets] == [0, 0, 1]


def test_finer_sources_are_the_latest_earlier_module_of_each_finer_pyramid_scale():
    # by block on ResNet-18: stem 4, layer1 4 4, layer2 8 8, layer3 16 16, layer4 32 32
    strides = [4, 4, 4, 8, 8, 16, 16, 32, 32]
    assert finer_sources(strides, 9) == [[], [], [], [], [], [4], [4], [4, 6]]
    assert finer_sources([4, 8, 16, 32], 4) == [[], [], [1]]


def test_coarser_sources_are_the_main_fpn_maps_above_each_modules_own_level():
    # ResNet-18 by block: C4 and C5 are modules 6 and 8; a stride-4 module's own level is P3
    strides = [4, 4, 4, 8, 8, 16, 16, 32, 32]
    assert coarser_sources(strides, 9) == [[6, 8]] * 5 + [[8]] * 2 + [[]]
    assert coarser_sources([4, 8, 16, 32], 4) == [[2, 3], [2, 3], [3]]  # the stem's map joins P3
    assert coarser_sources([4, 8, 16, 32], 4, min_stride=16) == [[3], [3], [3]]


def test_lookahead_bank_feeds_this_batchs_coarser_maps_detached_and_keeps_nothing():
    net = learner(**{"fba.bank.source": "lookahead"})
    assert net.bank.needs_lookahead and net.bank.ahead == [[2, 3], [2, 3], [3]]
    assert [aux.fpn.strides for aux in net.aux_nets] == [[8, 16, 32, 64, 128]] * 3
    assert [len(aux.fpn.ahead_laterals) for aux in net.aux_nets] == [2, 2, 1]
    images, targets = batch()
    with torch.no_grad():  # what the plain model's modules give on this batch, before any update
        h, expected = images, []
        for module in copy.deepcopy(net.local_modules):  # a copy: train mode updates BatchNorm statistics
            h = module(h)
            expected.append(h)
    running = net.plain.backbone.body.bn1.running_mean.clone()
    seen = record_bank_reads(net)
    net.train_step(images, targets)
    # SLM 1 reads C4 and C5 of this batch; SLM 2 reads C3 in-pass and C5 from the lookahead.
    for got, want in zip(seen[1], [expected[2], expected[3]]):
        torch.testing.assert_close(got, want)
    assert [tuple(m.shape[1:]) for m in seen[2]] == [(128, 8, 8), (512, 2, 2)]
    assert all(not m.requires_grad for maps in seen.values() for m in maps)
    assert net.bank.tensors() == []
    # The lookahead forward leaves BatchNorm's running statistics to the local pass: one update.
    twin = learner()
    twin.train_step(images, targets)
    torch.testing.assert_close(net.plain.backbone.body.bn1.running_mean, twin.plain.backbone.body.bn1.running_mean)
    assert not torch.equal(running, net.plain.backbone.body.bn1.running_mean)


@pytest.mark.parametrize("fusion", ["replace", "add"])
def test_local_fpn_with_lookahead_maps(fusion):
    fpn = LocalFPN(64, 8, 16, ahead_channels=[128, 256], ahead_strides=[16, 32], ahead_fusion=fusion)
    own = torch.randn(1, 64, 8, 8, requires_grad=True)
    levels = fpn(own, [torch.randn(1, 128, 4, 4), torch.randn(1, 256, 2, 2)])
    assert fpn.strides == [8, 16, 32, 64, 128]
    assert [tuple(level.shape[-2:]) for level in levels] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    # "replace": the module's map reaches only its own level (the top-down pathway runs downwards);
    # "add": it reaches every level.
    reached = [torch.autograd.grad(level.sum(), own, retain_graph=True, allow_unused=True)[0] is not None
               for level in levels[:3]]
    assert reached == ([True, False, False] if fusion == "replace" else [True, True, True])
    with pytest.raises(ValueError, match="strides"):
        LocalFPN(64, 8, 16, ahead_channels=[256], ahead_strides=[32])
    with pytest.raises(ValueError, match="lookahead_fusion"):
        LocalFPN(64, 8, 16, ahead_channels=[128], ahead_strides=[16], ahead_fusion="concat")


@pytest.mark.parametrize("model", ["retinanet_resnet18", "retinanet_resnet50"])
def test_zero_init_slm_blocks_start_as_their_shortcut(model):
    net = learner(model, **{"det.local_zero_init": True})
    images, _ = batch()
    with torch.no_grad():
        h = net.local_modules[0](images)  # post-ReLU, so the identity shortcut gives it back unchanged
        block = net.aux_nets[0].block
        torch.testing.assert_close(block(h), h)
    plain = learner(model)
    with torch.no_grad():
        assert not torch.allclose(plain.aux_nets[0].block(h), h)


def test_settings_come_from_the_det_section():
    net = learner(**INPASS, **{"det.local_channels": 32, "det.local_head_convs": 2, "det.local_coarser": False})
    assert net.aux_nets[1].fpn.strides == [8] and net.aux_nets[2].fpn.strides == [8, 16]
    assert len(net.aux_nets[2].head.net.head.regression_head.conv) == 2
    assert net.aux_nets[0].fpn.output_convs[0].out_channels == 32
    images, targets = batch()
    assert math.isfinite(net.train_step(images, targets)["loss"])
    with pytest.raises(FBAError, match="fba.bank.source=inpass, lookahead or none"):
        learner(**{"fba.bank.source": "longterm"})


def test_local_fpn_shapes():
    fpn = LocalFPN(128, 16, 32, finer_channels=[64], finer_strides=[8])
    levels = fpn(torch.randn(2, 128, 4, 4), [torch.randn(2, 64, 8, 8)])
    assert [tuple(level.shape[-2:]) for level in levels] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    made = LocalFPN(64, 4, 16, make_finer=True)  # stride 4 brought to P3 by a stride-2 conv
    assert made.strides == [8, 16, 32, 64, 128] and len(made(torch.randn(1, 64, 16, 16))) == 5
    dgl = LocalFPN(256, 16, 16, make_finer=True, coarser=False)
    assert [tuple(level.shape[-2:]) for level in dgl(torch.randn(1, 256, 4, 4))] == [(8, 8), (4, 4)]


def test_dgl_builds_fpn_aux_nets_without_a_bank():
    net = learner(method="dgl")
    assert net.bank is None and all(isinstance(aux, FPNAux) for aux in net.aux_nets)
    assert all(aux.fpn.make_finer and aux.fpn.strides == [8, 16, 32, 64, 128] for aux in net.aux_nets)


# ---- the invariants -------------------------------------------------------------------------------
@pytest.mark.parametrize("step", ["global", "per_module"])
@pytest.mark.parametrize("method, j, source", [("fba", 1, "inpass"), ("fba", 2, "inpass"), ("dgl", 1, None),
                                               ("fba", 1, "lookahead"), ("fba", 1, "target")])
def test_perturbing_aux_j_changes_only_module_j(method, j, step, source):
    images, targets = batch()
    options = {"optim.step": step, **(TARGET if source == "target" else {"fba.bank.source": source} if source else {})}
    assert_perturbing_aux_changes_only_its_module(lambda: learner(method=method, **options),
                                                  (images, targets, torch.arange(2)), j=j, scale=0.1)


def test_yolo_smoke_isolation_and_training():
    images, targets = batch()
    assert_perturbing_aux_changes_only_its_module(lambda: learner("yolov1_resnet18", **INPASS),
                                                  (images, targets, torch.arange(2)), j=2, scale=0.1)
    net = learner("yolov1_resnet18", **INPASS)
    assert all(isinstance(aux, YOLOSLM) for aux in net.aux_nets)
    assert [len(aux.projections) for aux in net.aux_nets] == [0, 0, 1]
    dgl = learner("yolov1_resnet18", method="dgl")
    ahead = learner("yolov1_resnet18", **{"fba.bank.source": "lookahead"})
    assert [len(aux.projections) for aux in ahead.aux_nets] == [2, 2, 2]  # C4, C5; C4, C5; C3 and C5
    for each in (net, dgl, ahead):
        out = each.train_step(images, targets)
        assert all(math.isfinite(v) for v in out.values())


def test_target_usage_predicts_the_deeper_maps_of_this_batch_from_the_local_fpn():
    net = learner(**TARGET)
    # Nothing enters the local FPNs; each SLM predicts C4/C5 of the lookahead forward instead.
    assert net.bank.needs_lookahead and net.bank.sources == [[], [], []] and net.bank.ahead == [[2, 3], [2, 3], [3]]
    assert all(len(aux.fpn.ahead_laterals) == 0 and len(aux.fpn.finer_laterals) == 0 for aux in net.aux_nets)
    # From the local FPN level of the target's stride: P4 for C4 and P5 for C5 (module 2's FPN starts at P4).
    assert [aux.predictor.sources for aux in net.aux_nets] == [[1, 2], [1, 2], [1]]
    images, targets = batch()
    seen = record_bank_reads(net)
    losses = net.train_step(images, targets)
    h = images
    with torch.no_grad():
        for module in net.local_modules[:2]:
            h = module(h)
        out, predicted = net.aux_nets[1](h)
    assert [p.shape for p in predicted] == [m.shape for m in seen[1]] == [(2, 256, 4, 4), (2, 512, 2, 2)]
    # The local loss is the detection loss plus the mean cosine mismatch with the targets.
    fresh, zero = learner(**TARGET), learner(**TARGET, **{"fba.bank.target_weight": 0.0})
    zero.load_state_dict(fresh.state_dict())
    a, b = fresh.train_step(images, targets), zero.train_step(images, targets)
    assert a["loss/0"] > b["loss/0"] + 0.5 and math.isfinite(losses["loss"])  # 1 - cos is about 1 at the start
    yolo = learner("yolov1_resnet18", **TARGET)
    assert [len(aux.predictor.projections) for aux in yolo.aux_nets] == [2, 2, 1]
    assert all(math.isfinite(v) for v in yolo.train_step(images, targets).values())
    with pytest.raises(FBAError, match="fba.bank.usage=target .* fba.bank.source=lookahead"):
        learner(**{"fba.bank.source": "inpass", "fba.bank.usage": "target"})


def test_feature_mismatch_pools_each_prediction_to_its_target():
    target = torch.randn(2, 8, 2, 2)
    fine = target.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # pools back to the target
    assert feature_mismatch([fine], [target]).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_mismatch([fine, -target], [target, target]).item() == pytest.approx(1.0, abs=1e-6)
    assert predictor_sources([8, 16, 32, 64, 128], [16, 32]) == [1, 2]
    assert predictor_sources([8], [16, 32]) == [0, 0]  # without coarser levels: the coarsest one below
    with pytest.raises(ValueError, match="predicted maps"):
        feature_mismatch([fine], [target, target])


@pytest.mark.parametrize("method", ["fba", "dgl"])
def test_K1_equals_bp(method):
    images, targets = batch()
    bp = fba.build_learner(**DET, model="retinanet_resnet18", method="bp", num_classes=3)
    one = fba.build_learner(**DET, model="retinanet_resnet18", method=method, K=1, num_classes=3)
    one.plain.load_state_dict(bp.plain.state_dict())
    assert one.bank is None and len(one.aux_nets) == 0
    for _ in range(2):
        assert one.train_step(images, targets)["loss"] == bp.train_step(images, targets)["loss"]
    for p, q in zip(one.plain.state_dict().values(), bp.plain.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["fba", "dgl"])
def test_export_after_local_training_loads_strictly_into_torchvision(method):
    net = learner(method=method)
    images, targets = batch()
    for _ in range(2):
        net.train_step(images, targets)
    net.plain.head.classification_head.cls_logits.bias.data.zero_()  # scores above 0.05: detections to compare
    exported = net.export()
    assert isinstance(exported, RetinaNet) and not exported.training
    reference = torchvision_retinanet(18, num_classes=3, image_size=SIZE,
                                      fpn_channels=net.config["det"]["fpn_channels"])
    reference.load_state_dict(exported.state_dict(), strict=True)
    reference.eval()
    net.eval()
    with torch.no_grad():
        theirs, ours = reference(list(images)), net(images)
    assert sum(len(d["boxes"]) for d in theirs) > 0
    for a, b in zip(ours, theirs):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def test_bank_holds_detached_maps_for_this_step_only_and_is_unused_in_eval():
    net = learner(K=9, partition="count", **INPASS)
    assert net.bank.sources[-1] == [4, 6]
    images, targets = batch()
    read, seen = net.bank.read, []

    def spy(k, device):
        maps, valid = read(k, device)
        seen.append((k, [tuple(m.shape) for m in maps or []], list(net.bank.tensors()), maps or []))
        return maps, valid

    net.bank.read = spy
    net.train_step(images, targets)
    shapes = {k: s for k, s, _, _ in seen}
    assert shapes[5] == [(2, 128, 8, 8)] and shapes[7] == [(2, 128, 8, 8), (2, 256, 4, 4)]
    held = [t for *_, tensors, maps in seen for t in tensors + maps]
    assert held and all(not t.requires_grad and t.grad_fn is None for t in held)
    assert net.bank.tensors() == []  # freed after their last reader, nothing outlives the step

    def refuse(*args):
        raise AssertionError("the bank was used in eval")

    net.bank.read = net.bank.write = refuse
    net.eval()
    with torch.no_grad():
        net(images)
    assert net.bank.tensors() == []


@pytest.mark.parametrize("model", ["retinanet_resnet18", "yolov1_resnet18"])
def test_shared_head_is_the_main_head(model):
    net = learner(model, **{"fba.share_head": True})
    main = net.plain.head
    for aux in net.aux_nets:
        head = aux.head.net.head if model.startswith("retinanet") else aux.head.head
        assert head is main
        assert aux.adapter is not None
    main_ids = {id(p) for p in main.parameters()}
    assert main_ids <= {id(p) for p in net.aux_nets[0].parameters()}
    images, targets = batch()
    before = [p.detach().clone() for p in main.parameters()]
    net.train_step(images, targets)
    assert not all(torch.equal(a, b) for a, b in zip(before, main.parameters()))


def test_retinanet_resnet34_k4_builds_and_trains_a_step():
    net = fba.build_learner(task="detection", model="retinanet_resnet34", method="fba", K=4, num_classes=20)
    assert net.K == 4 and len(net.aux_nets) == 3
    images, targets = batch()
    out = net.train_step(images, targets)
    assert all(math.isfinite(v) for v in out.values())


def test_per_module_steps_give_the_same_weights_as_one_global_step():
    # Why detection steps per module by default: each module's loss reads only its own
    # parameters and detached inputs, so stepping it right after its backward changes nothing
    # but how long the other modules' gradients live.
    images, targets = batch()
    trained = []
    for step in ("global", "per_module"):
        net = learner(**{"optim.step": step})
        for _ in range(3):
            net.train_step(images, targets)
        trained.append(dict(net.named_parameters()))
    global_step, per_module = trained
    assert global_step.keys() == per_module.keys()
    for name, value in global_step.items():
        torch.testing.assert_close(per_module[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_detection_defaults_step_per_module():
    assert resolve_config(None, ["task=detection"])["optim"]["step"] == "per_module"


@pytest.mark.parametrize("model", ["retinanet_resnet18", "yolov1_resnet18"])
def test_min_stride_slm_coarsens_fine_maps_before_its_block_and_stays_isolated(model):
    from fba.tasks.detection.local import stride_reduction

    net = learner(model=model, **{"det.local_min_stride": 8})
    first = net.aux_nets[0]  # module 0 (stem + layer1) outputs stride 4: one halving
    assert isinstance(first.reduce, torch.nn.Sequential) and len(first.reduce) == 1
    assert isinstance(net.aux_nets[1].reduce, torch.nn.Identity)  # layer2 is already at stride 8
    h = torch.rand(2, 64, 16, 16)
    assert first.reduce(h).shape == (2, 64, 8, 8)
    images, targets = batch()
    assert math.isfinite(net.train_step(images, targets)["loss"])
    assert_perturbing_aux_changes_only_its_module(
        lambda: learner(model=model, **{"det.local_min_stride": 8}), (images, targets, torch.arange(2)), j=0, scale=0.1)
    assert isinstance(stride_reduction(64, 8, 8)[0], torch.nn.Identity)
    with pytest.raises(FBAError):
        learner(**{"det.local_min_stride": 12})


# ---- partition=balanced on a detector ------------------------------------------------------------
@pytest.mark.parametrize("model", ["retinanet_resnet18", "yolov1_resnet18"])
def test_balanced_partition_costs_the_chunked_stem_of_the_checkpointed_module_0(model):
    from fba.build import measure_partition_costs

    net = learner(model=model, method="dgl", partition="balanced")
    cfg = net.config
    assert cfg["checkpoint"] == [0] and cfg["checkpoint_chunks"] == 4  # detection's defaults
    costs = measure_partition_costs(cfg, 9, 3, 3, None, torch.device("cpu"))
    assert costs.recompute_chunks == [4] + [1] * 8  # the conv-BatchNorm stem runs in chunks
    assert costs.module_bytes(0, 2, checkpointed=True) < costs.module_bytes(0, 2)
    groups = net.groups
    assert len(groups) == 4 and [i for g in groups for i in g] == list(range(9))
    # module 0 is costed as checkpointed: no other partition has a smaller largest module plus
    # auxiliary weights
    best = min(costs.partition_bytes([list(range(a, b)) for a, b in zip((0, *cuts), (*cuts, 9))], frozenset({0}))
               for cuts in itertools.combinations(range(1, 9), 3))
    assert costs.partition_bytes(groups, frozenset({0})) == best



@pytest.mark.parametrize("model", ["retinanet_resnet18", "yolov1_resnet18"])
def test_a_checkpointed_module_holding_the_stem_and_a_tapped_block_feeds_the_head(model):
    # Its backward re-runs the stem, which used to clear the maps recorded for the head.
    images, targets = batch()
    options = dict(model=model, K=2, partition="cuts", cuts=[8], **NO_MOMENTUM)
    plain = learner(checkpoint=False, **options)
    checkpointed = learner(checkpoint=[0], **options)
    assert plain.train_step(images, targets)["loss"] == pytest.approx(checkpointed.train_step(images, targets)["loss"])
    for a, b in zip(plain.plain.parameters(), checkpointed.plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
