"""Detection models: units + head reproduce the plain model, the FPN maps respect gradient
isolation, the RetinaNet exports to torchvision's, and YOLOv1's loss is the paper's."""

import math
from functools import partial

import pytest
import torch
from torchvision.models.detection import RetinaNet

import fba
from fba.config import resolve_config
from fba.tasks import get_task
from fba.tasks.detection.models import (
    MODELS, DetectionTrainingOutput, TappedBlock, YOLOv1Head, default_anchor_sizes, default_grid_size,
    retinanet_loss, torchvision_retinanet,
)
from fba.tasks.detection.task import DetectionTask

SIZE = 64  # tiny inputs keep the whole file fast; P7 is then 1 x 1
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
DET = {"task": "detection", "device": "cpu", "data.image_size": SIZE}


def batch(n: int = 2, size: int = SIZE, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    cfg = resolve_config(None, ["task=detection"])
    return get_task("detection").synthetic_batch(cfg, n, 3, size, 3, generator, torch.device("cpu"))


def chain(model, x):
    h = x
    for unit in model.units:
        h = unit(h)
    return model.head(h)


def open_up_scores(model) -> None:
    """An untrained RetinaNet scores every anchor at its 0.01 prior, under the 0.05 threshold:
    a zero bias makes detections (and so NMS) happen."""
    model.plain.head.classification_head.cls_logits.bias.data.zero_()


def assert_same_detections(a, b, atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert da.keys() == db.keys() == {"boxes", "scores", "labels"}
        for key in da:
            torch.testing.assert_close(da[key], db[key], rtol=0, atol=atol)


def test_registry_holds_every_model():
    names = {f"{family}_resnet{d}" for family in ("retinanet", "yolov1") for d in BLOCKS}
    assert set(fba.list_models("detection")) == names


@pytest.mark.parametrize("name", ["retinanet_resnet18", "yolov1_resnet18", "retinanet_resnet50", "yolov1_resnet34"])
def test_units_and_head_equal_the_plain_model(name):
    torch.manual_seed(0)
    model = MODELS.get(name)(num_classes=3, image_size=SIZE)
    images, targets = batch()
    model.plain.train()
    expected = model.plain(images, targets)
    output = chain(model, images)
    assert isinstance(output, DetectionTrainingOutput)
    got = output.losses(targets)
    assert got.keys() == expected.keys() and {"classification", "bbox_regression"} <= got.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    model.plain.eval()
    if name.startswith("retinanet"):
        open_up_scores(model)
    with torch.no_grad():
        expected, got = model.plain(images), chain(model, images)
    assert sum(len(d["boxes"]) for d in got) > 0
    assert_same_detections(got, expected)


@pytest.mark.parametrize("depth", list(BLOCKS))
@pytest.mark.parametrize("family", ["retinanet", "yolov1"])
def test_unit_specs(family, depth):
    if depth in (101, 152) and family == "yolov1":
        pytest.skip("the ResNet specs are the same as RetinaNet's; two giants are enough")
    model = MODELS.get(f"{family}_resnet{depth}")(num_classes=3, image_size=SIZE)
    blocks = BLOCKS[depth]
    assert len(model.units) == len(model.specs) == 1 + sum(blocks)
    width = 1 if depth < 50 else 4
    expected = [(64, 4, 0)]
    for stage, count in enumerate(blocks, start=1):
        expected += [(64 * 2 ** (stage - 1) * width, 4 * 2 ** (stage - 1), stage)] * count
    assert [(s.out_channels, s.downsample, s.stage) for s in model.specs] == expected
    prefix = "backbone.body." if family == "retinanet" else "backbone."
    assert model.specs[1].name == f"{prefix}layer1.0" and model.specs[-1].name == f"{prefix}layer4.{blocks[3] - 1}"
    tapped = [i for i, unit in enumerate(model.units) if isinstance(unit, TappedBlock)]
    if family == "retinanet":  # C3 and C4: the last blocks of layer2 and layer3
        assert tapped == [1 + blocks[0] + blocks[1] - 1, 1 + blocks[0] + blocks[1] + blocks[2] - 1]
    else:
        assert tapped == []
    block = model.make_stage_block(2, expected[-1][0], 32 * width)
    assert block(torch.randn(1, expected[-1][0], 4, 4)).shape == (1, 32 * width, 4, 4)


@pytest.mark.parametrize("model", ["retinanet_resnet18", "yolov1_resnet18"])
def test_bp_learner_trains_a_step(model):
    learner = fba.build_learner(**DET, model=model, method="bp", num_classes=3)
    assert learner.K == 1
    images, targets = batch()
    for _ in range(2):
        out = learner.train_step(images, targets)
        assert all(math.isfinite(v) for v in out.values())
    assert set(learner.task.last_losses) >= {"classification", "bbox_regression"}
    learner.eval()
    with torch.no_grad():
        detections = learner(images)
    assert len(detections) == 2 and all(d["boxes"].shape[1:] == (4,) for d in detections)


@pytest.mark.parametrize("model", ["retinanet_resnet18", "yolov1_resnet18"])
@pytest.mark.parametrize("spoil, message", [
    (lambda t: t[:1], "1 targets for a batch of 2 images"),  # YOLO used to train image 2 as background
    (lambda t: [t[0], {**t[1], "labels": t[1]["labels"] + 3}], "labels must be 0-based class indices below 3"),
    (lambda t: [t[0], {**t[1], "labels": t[1]["labels"] - 5}], "below 3, got -"),
    (lambda t: [t[0], {**t[1], "labels": t[1]["labels"].float()}], "'labels' must be a"),
    (lambda t: [t[0], {**t[1], "boxes": t[1]["boxes"][:, :3]}], "'boxes' must be a (M, 4) tensor"),
    (lambda t: [t[0], (t[1]["boxes"], t[1]["labels"])], "target 1 must be a dict"),
])
def test_train_step_refuses_bad_targets_with_one_line(model, spoil, message):
    learner = fba.build_learner(**DET, model=model, method="fba", K=2, num_classes=3, num_samples=2)
    images, targets = batch()
    with pytest.raises(ValueError) as error:
        learner.train_step(images, spoil(targets))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("model", ["retinanet_resnet18", "yolov1_resnet18"])
def test_fba_by_stage_trains_with_the_detection_slm(model):
    learner = fba.build_learner(**DET, model=model, method="fba", K=4, num_classes=3, num_samples=2)
    assert learner.K == 4 and len(learner.aux_nets) == 3
    images, targets = batch()
    out = learner.train_step(images, targets, torch.arange(2))
    assert all(math.isfinite(v) for v in out.values())


def test_K1_fba_equals_bp():
    images, targets = batch()
    bp = fba.build_learner(**DET, model="retinanet_resnet18", method="bp", num_classes=3)
    one = fba.build_learner(**DET, model="retinanet_resnet18", method="fba", K=1, num_classes=3)
    one.plain.load_state_dict(bp.plain.state_dict())
    assert not any(one.head.taps.detach.values())
    for _ in range(2):
        assert one.train_step(images, targets)["loss"] == bp.train_step(images, targets)["loss"]
    for p, q in zip(one.plain.parameters(), bp.plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["retinanet_resnet18", "yolov1_resnet18"])
def test_make_head_is_a_working_head_on_one_map(name):
    """The UnitModel contract's fresh head, for methods that build their auxiliary nets from it."""
    model = get_task("detection").build_model(resolve_config(None, ["task=detection", f"data.image_size={SIZE}",
                                                                     f"model={name}"]), 3, 3)
    images, targets = batch()
    h = model.units[0](images)  # the stem records the image geometry the head reads
    head = model.make_head(h.shape[1])
    losses = head(h).losses(targets)
    assert losses and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    head.eval()
    with torch.no_grad():
        found = head(h)
    assert len(found) == 2 and all(d["boxes"].shape[1:] == (4,) for d in found)


def test_fpn_maps_from_earlier_modules_reach_the_head_detached():
    learner = fba.build_learner(**DET, model="retinanet_resnet18", method="fba", K=4, num_classes=3, num_samples=2)
    taps = learner.head.taps
    assert list(taps.detach.values()) == [True, True]  # C3 in module 1, C4 in module 2, head in module 3
    body = learner.plain.backbone.body
    seen = {"stem": [], "c3": [], "c4": []}
    body.conv1.weight.register_hook(lambda g: seen["stem"].append(g))
    body.layer2[-1].conv2.weight.register_hook(lambda g: seen["c3"].append(g))
    body.layer3[-1].conv2.weight.register_hook(lambda g: seen["c4"].append(g))
    images, targets = batch()
    learner.train_step(images, targets, torch.arange(2))
    # Each earlier module is reached by its own local loss only, not by the head's.
    assert {k: len(v) for k, v in seen.items()} == {"stem": 1, "c3": 1, "c4": 1}
    assert taps.values == {}  # read once and forgotten: no detached map outlives the step
    # The check can fail: with the maps attached, the head's loss would run back into module 1,
    # whose graph its own backward has already freed.
    taps.detach = {key: False for key in taps.keys}
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        learner.train_step(images, targets, torch.arange(2))


def test_maps_inside_the_last_module_keep_their_graph():
    # Module 1 starts at layer2's first block (unit 3): C3, C4 and the head share it.
    learner = fba.build_learner(**DET, model="retinanet_resnet18", method="fba", cuts=[3], K=2, num_classes=3,
                                num_samples=2)
    assert list(learner.head.taps.detach.values()) == [False, False]


@pytest.mark.parametrize("fpn_channels", [256, 64])
def test_export_loads_strictly_into_torchvision_retinanet_and_detects_the_same(fpn_channels):
    learner = fba.build_learner(**DET, model="retinanet_resnet18", method="fba", K=4, num_classes=3, num_samples=2,
                                **{"det.fpn_channels": fpn_channels})
    images, targets = batch()
    learner.train_step(images, targets, torch.arange(2))  # moves weights and BN statistics
    learner.plain.head.classification_head.cls_logits.bias.data.zero_()
    exported = learner.export()
    assert isinstance(exported, RetinaNet) and not exported.training
    reference = torchvision_retinanet(18, num_classes=3, image_size=SIZE, fpn_channels=fpn_channels)
    reference.load_state_dict(exported.state_dict(), strict=True)
    reference.eval()
    test_images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    learner.eval()
    with torch.no_grad():
        ours, theirs, via_units = exported(test_images), reference(list(test_images)), learner(test_images)
    assert sum(len(d["boxes"]) for d in theirs) > 0
    assert_same_detections(ours, theirs, atol=1e-5)
    assert_same_detections(via_units, theirs, atol=1e-5)


def test_torchvision_retinanet_is_resnet_fpn_backbone_at_256_channels_seed_for_seed():
    """At torchvision's width the backbone is ``resnet_fpn_backbone``'s, weights included."""
    from torch import nn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    ours = torchvision_retinanet(18, num_classes=3, image_size=SIZE).backbone.state_dict()
    torch.manual_seed(0)
    theirs = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5,
                                 returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(512, 256)).state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(ValueError, match="multiple of 32"):
        torchvision_retinanet(18, num_classes=3, image_size=SIZE, fpn_channels=48)


def _loss_case(n: int = 4, anchors_per_image: int = 3000, classes: int = 20):
    generator = torch.Generator().manual_seed(0)
    net = torchvision_retinanet(18, num_classes=classes, image_size=SIZE).train()
    outputs = {"cls_logits": torch.randn(n, anchors_per_image, classes, generator=generator, requires_grad=True),
               "bbox_regression": torch.randn(n, anchors_per_image, 4, generator=generator, requires_grad=True)}
    corners = torch.rand(anchors_per_image, 2, generator=generator) * 48
    anchors = [torch.cat([corners, corners + 16], dim=1)] * n
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 26.0], [30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([1, 7])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # an image without objects
    return net, outputs, anchors, (targets * n)[:n]


def test_per_image_checkpointed_loss_is_torchvisions_and_holds_less_memory():
    """``retinanet_loss`` gives torchvision's losses and gradients; checkpointed per image, the
    focal loss's intermediates are not kept for the whole batch (the CPU tracker's peak)."""
    from fba.bench.memory import peak_memory

    net, outputs, anchors, targets = _loss_case()
    theirs = net.compute_loss(targets, outputs, anchors)
    their_grads = torch.autograd.grad(sum(theirs.values()), list(outputs.values()))
    ours = retinanet_loss(net, targets, outputs, anchors, checkpoint_from_bytes=0)
    our_grads = torch.autograd.grad(sum(ours.values()), list(outputs.values()))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b)

    def peak(loss_fn) -> int:
        return peak_memory(lambda: sum(loss_fn(net, targets, outputs, anchors).values()).backward(),
                           existing=list(outputs.values()))["peak_bytes"]

    logits_bytes = outputs["cls_logits"].numel() * 4
    plain = peak(lambda net, *args: net.compute_loss(*args))
    assert peak(partial(retinanet_loss, checkpoint_from_bytes=logits_bytes)) < plain - 2 * logits_bytes
    # Logits under the threshold (the default's 16 MiB here) are not worth the recomputation.
    assert peak(retinanet_loss) == plain
    with torch.no_grad():  # evaluation: no graph, torchvision's call as it is
        torch.testing.assert_close(retinanet_loss(net, targets, outputs, anchors), theirs)


def test_default_anchor_and_grid_sizes():
    assert default_anchor_sizes(512) == default_anchor_sizes(800) == (32, 64, 128, 256, 512)
    assert default_anchor_sizes(128) == (8, 16, 32, 64, 128)
    assert default_anchor_sizes(160) == (10, 20, 40, 80, 160)
    assert (default_grid_size(224), default_grid_size(448), default_grid_size(128)) == (7, 14, 4)
    model = MODELS.get("retinanet_resnet18")(num_classes=3, image_size=128)
    assert model.plain.anchor_generator.sizes[0] == (8, 10, 12)
    model = MODELS.get("yolov1_resnet18")(num_classes=3, image_size=SIZE, grid_size=3)
    model.plain.eval()
    assert model.plain.head(torch.randn(2, 512, 2, 2)).shape == (2, 3, 3, 5 * 2 + 3)


# ---- YOLOv1's loss, by hand ---------------------------------------------------------------------
def yolo_grid(cell_boxes, class_probs, other=0.5):
    """A (1, 2, 2, 12) YOLOv1 output (S=2, B=2, C=2) whose sigmoids/softmax are the given values:
    cell (row 0, col 1) holds ``cell_boxes`` (two (x, y, w, h, c)) and ``class_probs``; every
    other box has all values ``other`` and every other cell uniform class probabilities."""
    values = torch.full((1, 2, 2, 10), other)
    values[0, 0, 1] = torch.tensor(cell_boxes).flatten()
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, 1] = torch.tensor(class_probs).log()
    return torch.cat([torch.logit(values.double()).float(), logits], dim=-1)


# Ground truth: one object of class 1 in a 64 x 64 image, xyxy (32, 4, 48, 36): centre (40, 20)
# in cell (row 0, col 1) of the 2 x 2 grid, offsets x = 40/32 - 1 = 0.25, y = 20/32 = 0.625,
# size w = 16/64 = 0.25, h = 32/64 = 0.5.
TRUTH = [{"boxes": torch.tensor([[32.0, 4.0, 48.0, 36.0]]), "labels": torch.tensor([1])}]
POOR = (0.5, 0.5, 0.1, 0.1, 0.3)  # the other box: IoU 0.04 with the truth, so never responsible
# Every box but the responsible one: 3 other cells x 2 boxes at confidence 0.5, and POOR's 0.3.
NO_OBJECT = 0.5 * (6 * 0.5**2 + 0.3**2)
CLASSES = 0.25**2 + 0.25**2  # probabilities (0.25, 0.75) against the one-hot (0, 1)


@pytest.mark.parametrize("box, coord, iou", [
    # perfect: IoU 1, no coordinate loss
    ((0.25, 0.625, 0.25, 0.5, 0.8), 0.0, 1.0),
    # x off by 0.25 cell: 5 * 0.25^2; predicted box x 40..56 against 32..48: IoU 256 / 768
    ((0.5, 0.625, 0.25, 0.5, 0.8), 5 * 0.25**2, 1 / 3),
    # w 0.36 instead of 0.25: 5 * (sqrt 0.36 - sqrt 0.25)^2 = 5 * 0.1^2; width 23.04 px around the
    # truth's 16: IoU 16 / 23.04
    ((0.25, 0.625, 0.36, 0.5, 0.8), 5 * 0.1**2, 16 / 23.04),
])
def test_yolo_loss_by_hand(box, coord, iou):
    head = YOLOv1Head(8, num_classes=2, grid_size=2, num_boxes=2)
    losses = head.compute_loss(yolo_grid([box, POOR], [0.25, 0.75]), TRUTH, (64, 64))
    expected = {"bbox_regression": coord, "objectness": (0.8 - iou) ** 2, "no_object": NO_OBJECT,
                "classification": CLASSES}
    assert losses.keys() == expected.keys()
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, abs=1e-5), key


def test_yolo_responsible_box_is_the_best_iou_and_the_largest_object_owns_its_cell():
    head = YOLOv1Head(8, num_classes=2, grid_size=2, num_boxes=2)
    # The perfect box is box 1 this time; a smaller object with its centre in the same cell is
    # dropped (one object per cell), so the prediction is still perfect.
    small = {"boxes": torch.tensor([[38.0, 18.0, 42.0, 22.0]]), "labels": torch.tensor([0])}
    targets = [{"boxes": torch.cat([small["boxes"], TRUTH[0]["boxes"]]), "labels": torch.tensor([0, 1])}]
    grid = yolo_grid([POOR, (0.25, 0.625, 0.25, 0.5, 0.8)], [0.25, 0.75])
    losses = head.compute_loss(grid, targets, (64, 64))
    assert losses["bbox_regression"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["objectness"].item() == pytest.approx(0.2**2, abs=1e-6)
    # Perfect and certain everywhere: every term vanishes.
    certain = yolo_grid([(0.25, 0.625, 0.25, 0.5, 1 - 1e-7), (0.5, 0.5, 0.5, 0.5, 1e-7)], [1e-7, 1 - 1e-7],
                        other=1e-7)
    assert sum(head.compute_loss(certain, TRUTH, (64, 64)).values()).item() == pytest.approx(0.0, abs=1e-5)


def test_yolo_postprocess_returns_torchvision_style_detections():
    head = YOLOv1Head(8, num_classes=2, grid_size=2, num_boxes=2)
    out = head.postprocess(yolo_grid([(0.25, 0.625, 0.25, 0.5, 0.9), POOR], [0.25, 0.75], other=0.01), (64, 64))
    assert len(out) == 1 and out[0].keys() == {"boxes", "scores", "labels"}
    best = out[0]["scores"].argmax()
    torch.testing.assert_close(out[0]["boxes"][best], torch.tensor([32.0, 4.0, 48.0, 36.0]), rtol=0, atol=1e-4)
    assert out[0]["labels"][best] == 1 and out[0]["scores"][best].item() == pytest.approx(0.9 * 0.75, abs=1e-5)


# ---- the task and the plugin --------------------------------------------------------------------
def test_task_loss_sums_the_head_dict_and_keeps_it_for_logging():
    task = DetectionTask()
    parts = {"classification": torch.tensor(1.5), "bbox_regression": torch.tensor(0.25, requires_grad=True)}
    loss = task.loss(DetectionTrainingOutput({}, lambda targets: parts), [])
    assert loss.item() == 1.75 and loss.requires_grad
    assert task.last_losses == {"classification": 1.5, "bbox_regression": 0.25}
    assert not any(v.requires_grad for v in task.last_losses.values())
    with pytest.raises(TypeError, match="detection head"):
        task.loss(torch.zeros(2), [])


def test_task_evaluate_collects_detections_for_coco_map(monkeypatch):
    import fba.metrics

    seen = {}

    def fake_coco_map(predictions, targets):
        seen.update(predictions=predictions, targets=targets)
        return {"map": 0.25, "map50": 0.5, "map75": 0.125}

    monkeypatch.setattr(fba.metrics, "coco_map", fake_coco_map, raising=False)
    learner = fba.build_learner(**DET, model="yolov1_resnet18", method="bp", num_classes=3)
    images, targets = batch(4)
    batches = [(images[:2], targets[:2], torch.arange(2)), (images[2:], targets[2:], torch.arange(2, 4))]
    metrics = learner.task.evaluate(learner, batches, torch.device("cpu"))
    assert metrics["map50"] == 0.5 and math.isfinite(metrics["loss"]) and learner.training
    assert len(seen["predictions"]) == len(seen["targets"]) == 4
    assert all(p.keys() == {"boxes", "scores", "labels"} for p in seen["predictions"])


def test_plugin_config_batch_and_metadata():
    plugin = get_task("detection")
    cfg = resolve_config(None, ["task=detection"])
    assert (cfg["model"], cfg["K"], cfg["data"]["name"], cfg["data"]["image_size"]) == (
        "retinanet_resnet18", 4, "shapes-det", 128)
    assert cfg["det"] == {"anchor_sizes": None, "fpn_channels": 128, "box_loss": "l1", "yolo_grid": None,
                          "local_channels": None, "local_head_convs": 1,
                          "local_coarser": True, "local_finer": False, "local_min_stride": None, "local_zero_init": False,
                          "lookahead_fusion": "replace", "draw_score": 0.3}
    assert cfg["fba"]["bank"]["source"] == "none"  # measured: docs/detection.md, the bank ablation
    assert cfg["checkpoint"] == [0]  # module 0 sets the peak (docs/detection.md, Memory)
    assert cfg["train"]["epochs"] == 9  # the 20-minute budget on 2 cores (docs/detection.md, Results)
    with pytest.raises(fba.errors.ConfigError, match="det.anchor_sizes"):
        resolve_config(None, ["task=detection", "det.anchor_sizes=[1, 2]"])
    with pytest.raises(fba.errors.ConfigError, match="at least 1 pixel"):  # would round to empty anchors
        resolve_config(None, ["task=detection", "det.anchor_sizes=[0.5, 16, 32, 64, 128]"])
    with pytest.raises(fba.errors.ConfigError, match="det.fpn_channels.*multiple of 32"):
        resolve_config(None, ["task=detection", "det.fpn_channels=100"])
    with pytest.raises(fba.errors.ConfigError, match="det.lookahead_fusion"):
        resolve_config(None, ["task=detection", "det.lookahead_fusion=concat"])
    assert plugin.build_task(cfg).name == "detection" and plugin.primary_metric == "map50"
    images, targets = batch(5, size=96)
    assert images.shape == (5, 3, 96, 96) and 0 <= images.min() and images.max() <= 1
    for t in targets:
        boxes = t["boxes"]
        assert 1 <= len(boxes) <= 3 and t["labels"].dtype == torch.int64 and t["labels"].max() < 3
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 96

    class Info:
        num_classes = 3

    assert plugin.export_metadata(cfg, Info()) == {"num_classes": "3", "image_size": "128",
                                                   "anchor_sizes": "[8, 16, 32, 64, 128]", "fpn_channels": "128"}
    yolo = resolve_config(None, ["task=detection", "model=yolov1_resnet34", "det.yolo_grid=5"])
    assert plugin.export_metadata(yolo, Info())["grid_size"] == "5"
    assert plugin.build_model(yolo, 3, 3).plain.head.grid_size == 5
    assert plugin.describe_metrics({"map": 0.1, "map50": 0.2, "map75": None}).startswith("mAP@0.5 0.2000")
    assert plugin.dataset_registry() is not None  # empty until the data module is there
