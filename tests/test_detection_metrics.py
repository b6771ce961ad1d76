"""COCO mAP against pycocotools called directly, and VOC AP against cases worked out by hand."""

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from fba.metrics import COCO_METRIC_NAMES, coco_map, voc_ap


def _random_case(seed: int, images: int = 12, classes: int = 4):
    """Ground truth of varied sizes (some images empty, some crowd boxes) and noisy detections of it."""
    rng = np.random.default_rng(seed)
    targets, predictions = [], []
    for _ in range(images):
        m = int(rng.integers(0, 6))
        xy = rng.uniform(0, 300, (m, 2))
        wh = np.exp(rng.uniform(np.log(4), np.log(200), (m, 2)))  # small, medium and large objects
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, classes, m)
        crowd = rng.random(m) < 0.1
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "iscrowd": torch.tensor(crowd)})
        # Jittered copies of the truth (labels sometimes wrong) plus background clutter.
        keep = rng.random(m) < 0.8
        jitter = boxes[keep] + rng.normal(0, 0.08, (int(keep.sum()), 4)) * np.tile(wh[keep], 2)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        det_labels = np.where(rng.random(int(keep.sum())) < 0.85, labels[keep], rng.integers(0, classes, int(keep.sum())))
        k = int(rng.integers(0, 8))
        xy = rng.uniform(0, 400, (k, 2))
        clutter = np.concatenate([xy, xy + rng.uniform(3, 150, (k, 2))], 1)
        det_boxes = np.concatenate([jitter, clutter]).astype(np.float32)
        predictions.append({"boxes": torch.from_numpy(det_boxes),
                            "scores": torch.tensor(rng.random(len(det_boxes)), dtype=torch.float32),
                            "labels": torch.tensor(np.concatenate([det_labels, rng.integers(0, classes, k)]))})
    return predictions, targets


def _pycocotools_directly(predictions, targets) -> np.ndarray:
    """The reference: COCO(), loadRes and COCOeval on the same boxes, written out independently."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = {"images": [], "annotations": [], "categories": [{"id": c} for c in range(1, 11)]}
    for image_id, target in enumerate(targets, start=100):
        dataset["images"].append({"id": image_id})
        for box, label, crowd in zip(target["boxes"].tolist(), target["labels"].tolist(), target["iscrowd"].tolist()):
            x0, y0, x1, y1 = box
            dataset["annotations"].append({
                "id": 1000 + len(dataset["annotations"]), "image_id": image_id, "category_id": label + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": int(crowd)})
    results = [{"image_id": image_id, "category_id": label + 1, "score": score,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
               for image_id, p in enumerate(predictions, start=100)
               for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_coco_map_agrees_with_pycocotools(seed, capsys):
    predictions, targets = _random_case(seed)
    got = coco_map(predictions, targets)
    assert capsys.readouterr().out == ""  # pycocotools' printing is suppressed
    assert list(got) == list(COCO_METRIC_NAMES)
    reference = _pycocotools_directly(predictions, targets)
    for name, value in zip(COCO_METRIC_NAMES, reference):
        if value < 0:
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, abs=1e-4), name
    assert 0.05 < got["map"] < 0.95 and got["map50"] >= got["map75"]  # a real, imperfect case


def test_coco_map_takes_numpy_and_lists_too():
    predictions, targets = _random_case(5)
    expected = coco_map(predictions, targets)
    as_numpy = [{k: v.numpy() for k, v in p.items()} for p in predictions]
    as_lists = [{k: v.tolist() for k, v in t.items()} for t in targets]
    assert coco_map(as_numpy, as_lists) == pytest.approx(expected, nan_ok=True)


def test_perfect_predictions_score_one():
    boxes = torch.tensor([[0, 0, 20, 20], [10, 10, 60, 70], [0, 0, 200, 150], [5, 5, 9, 12]], dtype=torch.float32)
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1, 2, 0])}, {"boxes": boxes[:2], "labels": torch.tensor([1, 1])}]
    predictions = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(0.9, 0.5, len(t["labels"]))}
                   for t in targets]
    got = coco_map(predictions, targets)
    for name in ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar_100"):
        assert got[name] == pytest.approx(1.0), name
    assert voc_ap(predictions, targets, 3) == {"map": 1.0, "ap": [1.0, 1.0, 1.0], "objects": [2, 3, 1]}
    assert voc_ap(predictions, targets, 3, use_07_metric=False) == {"map": 1.0, "ap": [1.0, 1.0, 1.0], "objects": [2, 3, 1]}


def test_empty_inputs_are_zero_where_something_was_missed_and_nan_where_nothing_is_defined():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 50.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    nothing = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    missed = coco_map(nothing, targets)
    assert missed["map"] == 0.0 and missed["map50"] == 0.0 and missed["mar_100"] == 0.0 and missed["map_medium"] == 0.0
    assert math.isnan(missed["map_small"]) and math.isnan(missed["map_large"])  # no objects of those sizes
    # The same as pycocotools reports once a single useless detection makes it runnable.
    one = [{"boxes": torch.tensor([[200.0, 200.0, 210.0, 210.0]]), "scores": torch.tensor([0.1]),
            "labels": torch.tensor([0])}, nothing[0]]
    assert coco_map(one, targets) == pytest.approx(missed, nan_ok=True)
    no_truth = coco_map(one, [targets[1], targets[1]])
    assert all(math.isnan(v) for v in no_truth.values())
    assert all(math.isnan(v) for v in coco_map([], []).values())
    assert voc_ap(nothing, targets, 3) == {"map": 0.0, "ap": [pytest.approx(math.nan, nan_ok=True)] * 2 + [0.0], "objects": [0, 0, 1]}
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        coco_map(nothing, targets[:1])


def test_coco_map_does_not_count_difficult_objects():
    truth = {"boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0], [60.0, 60.0, 100.0, 100.0]]), "labels": torch.tensor([0, 0])}
    found_one = [{"boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    assert coco_map(found_one, [truth])["map50"] < 0.6  # the second object was missed
    hard = {**truth, "difficult": torch.tensor([False, True])}
    assert coco_map(found_one, [hard])["map50"] == pytest.approx(1.0)  # missing a difficult one costs nothing
    found_both = [{"boxes": truth["boxes"].flip(0), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])}]
    assert coco_map(found_both, [hard])["map"] == pytest.approx(1.0)  # and finding it is no false positive


# The hand-worked VOC case: one class (class 1 has no ground truth), two images.
#   image A: g1 (0,0,10,10), g2 (20,20,30,30), g3 (40,40,50,50) difficult;  image B: g4 (0,0,10,10)
#   -> 3 counted objects (g1, g2, g4).
# Detections by score, and how the greedy matching at IoU >= 0.5 judges them:
#   d1 0.9 A (0,0,10,10)        IoU 1 with g1                     -> TP   tp=1 fp=0  R=1/3 P=1
#   d2 0.8 A (0,0,10,10)        g1 already taken                  -> FP   tp=1 fp=1  R=1/3 P=1/2
#   d3 0.7 A (40,40,50,50)      best is g3, difficult              -> ignored (no TP, no FP)
#   d4 0.6 B (100,100,110,110)  overlaps nothing                  -> FP   tp=1 fp=2  R=1/3 P=1/3
#   d5 0.5 B (0,0,10,10)        IoU 1 with g4                     -> TP   tp=2 fp=2  R=2/3 P=1/2
#   d6 0.4 A (21,20,31,30)      IoU with g2 = 90 / 110 = 0.818    -> TP   tp=3 fp=2  R=1   P=3/5
# 11-point: the best precision at recall >= t is 1 for t = 0, .1, .2, .3 (d1) and 3/5 for the
#   seven levels t = .4 ... 1 (d6 dominates d5), so AP = (4 * 1 + 7 * 0.6) / 11 = 8.2 / 11.
# Area: the precision envelope is 1 on recall (0, 1/3] and 3/5 on (1/3, 1], so
#   AP = 1/3 * 1 + 2/3 * 0.6 = 2.2 / 3.
VOC_TARGETS = [
    {"boxes": torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=torch.float32),
     "labels": torch.tensor([0, 0, 0]), "difficult": torch.tensor([False, False, True])},
    {"boxes": torch.tensor([[0, 0, 10, 10]], dtype=torch.float32), "labels": torch.tensor([0])},
]
VOC_PREDICTIONS = [
    {"boxes": torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [40, 40, 50, 50], [21, 20, 31, 30]], dtype=torch.float32),
     "scores": torch.tensor([0.9, 0.8, 0.7, 0.4]), "labels": torch.tensor([0, 0, 0, 0])},
    {"boxes": torch.tensor([[100, 100, 110, 110], [0, 0, 10, 10]], dtype=torch.float32),
     "scores": torch.tensor([0.6, 0.5]), "labels": torch.tensor([0, 0])},
]


def test_voc_ap_matches_the_hand_worked_case():
    eleven = voc_ap(VOC_PREDICTIONS, VOC_TARGETS, num_classes=2)
    assert eleven["ap"][0] == pytest.approx(8.2 / 11) and math.isnan(eleven["ap"][1])
    assert eleven["map"] == pytest.approx(8.2 / 11)  # the class without ground truth is left out
    area = voc_ap(VOC_PREDICTIONS, VOC_TARGETS, num_classes=2, use_07_metric=False)
    assert area["ap"][0] == pytest.approx(2.2 / 3) and area["map"] == pytest.approx(2.2 / 3)
    # At IoU 0.85, d6 (IoU 0.818) is a false positive: recall tops at 2/3 with precision 1/2.
    #   11-point: 4 levels at 1, 3 levels (.4, .5, .6) at 1/2, 4 levels at 0 -> 5.5 / 11.
    #   area: 1/3 * 1 + 1/3 * 1/2 = 0.5.
    strict = voc_ap(VOC_PREDICTIONS, VOC_TARGETS, 2, iou_threshold=0.85)
    assert strict["ap"][0] == pytest.approx(5.5 / 11)
    assert voc_ap(VOC_PREDICTIONS, VOC_TARGETS, 2, iou_threshold=0.85, use_07_metric=False)["ap"][0] == pytest.approx(0.5)


def test_voc_ap_ignores_difficult_objects():
    # Without the difficult object and the detection on it, nothing changes.
    targets = [{"boxes": VOC_TARGETS[0]["boxes"][:2], "labels": VOC_TARGETS[0]["labels"][:2]}, VOC_TARGETS[1]]
    keep = torch.tensor([True, True, False, True])
    predictions = [{k: v[keep] for k, v in VOC_PREDICTIONS[0].items()}, VOC_PREDICTIONS[1]]
    for use_07 in (True, False):
        assert voc_ap(predictions, targets, 2, use_07_metric=use_07)["ap"][0] == pytest.approx(
            voc_ap(VOC_PREDICTIONS, VOC_TARGETS, 2, use_07_metric=use_07)["ap"][0])
    # Counted as an ordinary object, d3 becomes a TP and the AP changes.
    plain = [{**VOC_TARGETS[0], "difficult": torch.tensor([False, False, False])}, VOC_TARGETS[1]]
    assert voc_ap(VOC_PREDICTIONS, plain, 2)["ap"][0] != pytest.approx(8.2 / 11)
    # A class whose only objects are difficult has no AP.
    only_hard = [{"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([1]),
                  "difficult": torch.tensor([True])}]
    no_dets = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    result = voc_ap(no_dets, only_hard, 2)
    assert math.isnan(result["map"]) and all(math.isnan(v) for v in result["ap"])


def test_voc_ap_refuses_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"targets\[0\] has a label outside 0..0"):
        voc_ap(VOC_PREDICTIONS[:1], [{"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "labels": torch.tensor([1])}], 1)


def test_voc_ap_counts_the_objects_that_count():
    targets = [{"boxes": torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.], [40., 40., 50., 50.]]),
                "labels": torch.tensor([0, 0, 1]), "difficult": torch.tensor([False, True, False]),
                "iscrowd": torch.tensor([False, False, True])}]
    predictions = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    assert voc_ap(predictions, targets, num_classes=2)["objects"] == [1, 0]  # difficult and crowd do not count
