"""Detection datasets on tiny fixtures written in the real VOC (XML + JPEG) and COCO (JSON) formats, and shapes-det."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fba.errors import DataError
from fba.tasks.detection.data import (
    DATASETS, SHAPES_DET_CLASSES, VOC_CLASSES, DetectionTransform, collate_detection, make_shapes_det,
)


def _write_image(path, width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _voc_xml(objects, width=100, height=80) -> str:
    """objects: (name, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based inclusive pixels."""
    body = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{int(d)}</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for n, x0, y0, x1, y1, d in objects)
    return (f"<annotation><folder>VOC</folder><filename>x.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{body}</annotation>")


VOC_FIXTURE = {
    # year: {image set: {id: (width, height, objects)}}
    "VOC2007": {
        "trainval": {"000005": (100, 80, [("chair", 1, 1, 100, 80, False), ("dog", 10, 20, 30, 40, True)]),
                     "000007": (64, 48, [])},  # no objects: valid
        "test": {"000001": (90, 70, [("person", 5, 6, 50, 60, False), ("tvmonitor", 2, 3, 4, 5, True)]),
                 "000002": (90, 70, [("aeroplane", 1, 1, 1, 1, False)])},  # one pixel: a valid box
    },
    "VOC2012": {"trainval": {"2008_000001": (72, 60, [("bird", 3, 4, 70, 58, False)])}},
}


def _voc(root, fixture=VOC_FIXTURE):
    devkit = root / "VOCdevkit"
    for year, sets in fixture.items():
        for image_set, images in sets.items():
            main = devkit / year / "ImageSets" / "Main"
            main.mkdir(parents=True, exist_ok=True)
            (main / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in images))
            for seed, (name, (width, height, objects)) in enumerate(images.items()):
                _write_image(devkit / year / "JPEGImages" / f"{name}.jpg", width, height, seed)
                (devkit / year / "Annotations").mkdir(parents=True, exist_ok=True)
                # The XML's <size> is deliberately wrong: the image file is the truth.
                (devkit / year / "Annotations" / f"{name}.xml").write_text(_voc_xml(objects, width + 7, height + 3))
    return devkit


def test_voc_reads_07_12_trainval_for_training_and_07_test_with_difficult_flags(tmp_path):
    _voc(tmp_path)
    train, test, info = DATASETS.get("voc")(root=str(tmp_path), augment=False, image_size=None)
    assert (info.num_classes, info.in_channels, info.num_train, len(test)) == (20, 3, 3, 2)
    assert info.class_names == VOC_CLASSES and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    image, target, index = train[0]
    assert index == 0 and image.shape == (3, 80, 100) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    # 1-based inclusive (1, 1, 100, 80) on a 100x80 image is the whole image; the difficult dog is dropped.
    assert target["boxes"].tolist() == [[0.0, 0.0, 100.0, 80.0]] and target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [VOC_CLASSES.index("chair")] and target["labels"].dtype == torch.int64
    assert target["difficult"].tolist() == [False] and target["iscrowd"].tolist() == [False]
    empty_image, empty, _ = train[1]
    assert empty_image.shape == (3, 48, 64) and empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert train[2][1]["labels"].tolist() == [VOC_CLASSES.index("bird")]  # VOC2012 comes after VOC2007
    assert len({train[i][1]["image_id"] for i in range(3)} | {test[i][1]["image_id"] for i in range(2)}) == 5
    _, kept, _ = test[0]
    assert kept["boxes"].tolist() == [[4.0, 5.0, 50.0, 60.0], [1.0, 2.0, 4.0, 5.0]]
    assert kept["labels"].tolist() == [14, 19] and kept["difficult"].tolist() == [False, True]
    assert test[1][1]["boxes"].tolist() == [[0.0, 0.0, 1.0, 1.0]]
    train_all, _, info_all = DATASETS.get("voc")(root=str(tmp_path / "VOCdevkit"), augment=False, image_size=None,
                                                keep_difficult=True)
    assert train_all[0][1]["difficult"].tolist() == [False, True] and train_all[0][1]["labels"].tolist() == [8, 11]


def test_voc_missing_folder_names_the_expected_path(tmp_path):
    with pytest.raises(DataError) as error:
        DATASETS.get("voc")(root=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "VOCdevkit" / "VOC2007") in message and "Annotations" in message and "\n" not in message
    with pytest.raises(DataError, match="cannot download"):
        DATASETS.get("voc")(root=str(tmp_path), download=True)
    fixture = {"VOC2007": VOC_FIXTURE["VOC2007"]}
    _voc(tmp_path, fixture)
    with pytest.raises(DataError, match="VOC2012"):
        DATASETS.get("voc")(root=str(tmp_path))


def _bad_voc(root, objects=None, xml=None, image="jpeg"):
    """A VOC folder whose 2007 test image 000009 has the given objects, raw XML, or image problem."""
    fixture = {"VOC2007": {**VOC_FIXTURE["VOC2007"], "test": {"000009": (100, 80, objects or [])}},
               "VOC2012": VOC_FIXTURE["VOC2012"]}
    devkit = _voc(root, fixture)
    xml_path = devkit / "VOC2007" / "Annotations" / "000009.xml"
    image_path = devkit / "VOC2007" / "JPEGImages" / "000009.jpg"
    if xml is not None:
        xml_path.write_text(xml)
    if image == "missing":
        image_path.unlink()
    elif image == "garbage":
        image_path.write_bytes(b"not a jpeg at all")
    return xml_path, image_path


@pytest.mark.parametrize("case,objects,xml,image,expected", [
    ("outside", [("cat", 1, 1, 20, 20, False), ("dog", 50, 40, 101, 80, False)], None, "jpeg",
     ["object #2 'dog'", "xmax=101", "outside the 100x80"]),
    ("zero-based", [("dog", 0, 5, 20, 20, False)], None, "jpeg", ["object #1 'dog'", "xmin=0", "outside"]),
    ("no area", [("cat", 1, 1, 20, 20, False), ("cow", 30, 30, 28, 40, False)], None, "jpeg",
     ["object #2 'cow'", "no area"]),
    ("unknown class", [("cat", 1, 1, 20, 20, False), ("unicorn", 2, 2, 9, 9, False)], None, "jpeg",
     ["object #2 'unicorn'", "unknown class 'unicorn'", "aeroplane"]),
    ("malformed xml", None, "<annotation><object><name>cat</name>", "jpeg", ["malformed XML"]),
    ("not a number", None, _voc_xml([("cat", "a", 1, 20, 20, False)]), "jpeg", ["object #1 'cat'", "<xmin>", "'a'"]),
    ("no bndbox", None, "<annotation><object><name>cat</name></object></annotation>", "jpeg",
     ["object #1 'cat'", "missing <bndbox>"]),
    ("missing image", [("cat", 1, 1, 20, 20, False)], None, "missing", ["000009.jpg", "not found"]),
    ("unreadable image", [("cat", 1, 1, 20, 20, False)], None, "garbage", ["000009.jpg", "cannot read image"]),
])
def test_voc_bad_annotations_are_one_line_naming_file_and_object(tmp_path, case, objects, xml, image, expected):
    xml_path, image_path = _bad_voc(tmp_path, objects, xml, image)
    with pytest.raises(DataError) as error:
        DATASETS.get("voc")(root=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message, message
    assert str(image_path if "image" in case else xml_path) in message, message
    for part in expected:
        assert part in message, message


def _coco(root, split="val2017", extra_annotations=(), image_overrides=None):
    """COCO fixture: categories 7, 1, 3 (listed unsorted), three images, one without objects, one crowd box."""
    images = [{"id": 42, "file_name": "a.jpg", "width": 100, "height": 80},
              {"id": 7, "file_name": "b.jpg", "width": 60, "height": 50},
              {"id": 9, "file_name": "c.png", "width": 40, "height": 30}]
    for image in images:
        _write_image(root / split / image["file_name"], image["width"], image["height"], seed=image["id"],
                     fmt="PNG" if image["file_name"].endswith("png") else "JPEG")
        image.update((image_overrides or {}).get(image["id"], {}))
    annotations = [
        {"id": 1, "image_id": 42, "category_id": 7, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 1, "bbox": [0, 0, 100, 80], "area": 8000, "iscrowd": 1},
        {"id": 3, "image_id": 42, "category_id": 3, "bbox": [50.5, 10.25, 49.9, 70.5], "area": 1.0, "iscrowd": 0},
        # Overshoots the 60-wide image by half a pixel: clipped, as rounded COCO floats may.
        {"id": 4, "image_id": 7, "category_id": 1, "bbox": [40, 5, 20.5, 10], "area": 205, "iscrowd": 0},
        *extra_annotations,
    ]
    categories = [{"id": 7, "name": "seven"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}]
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_coco_maps_category_ids_to_sorted_contiguous_labels_and_handles_crowd(tmp_path):
    _coco(tmp_path, "train2017")
    _coco(tmp_path, "val2017")
    train, test, info = DATASETS.get("coco")(root=str(tmp_path), augment=False, image_size=None)
    assert info.num_classes == 3 and info.class_names == ("one", "three", "seven") and info.num_train == 3
    image, target, index = test[0]
    assert image.shape == (3, 80, 100) and index == 0 and target["image_id"] == 42
    assert target["labels"].tolist() == [2, 0, 1]  # ids 7, 1, 3 -> labels in sorted id order
    # xywh -> xyxy; the third overshoots by 0.4 and 0.75 pixels, within the tolerance: clipped.
    assert target["boxes"].tolist() == [[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 100.0, 80.0], [50.5, 10.25, 100.0, 80.0]]
    assert target["iscrowd"].tolist() == [False, True, False] and target["difficult"].tolist() == [False] * 3
    assert test[1][1]["boxes"].tolist() == [[40.0, 5.0, 60.0, 15.0]]  # clipped to the image
    assert test[2][0].shape == (3, 30, 40) and test[2][1]["boxes"].shape == (0, 4)  # no objects: valid
    # Training drops crowd boxes.
    assert train[0][1]["labels"].tolist() == [2, 1] and train[0][1]["iscrowd"].tolist() == [False, False]


@pytest.mark.parametrize("extra,overrides,raw,expected", [
    ([{"id": 77, "image_id": 7, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 0}], None, None,
     ["annotation id 77", "b.jpg", "unknown category_id 5"]),
    ([{"id": 78, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, -2], "iscrowd": 0}], None, None,
     ["annotation id 78", "b.jpg", "h=-2", "no area"]),
    ([{"id": 82, "image_id": 7, "category_id": 1, "bbox": [1, 1, 0, float("nan")], "iscrowd": 0}], None, None,
     ["annotation id 82", "not finite"]),  # a zero width does not make it a droppable line
    ([{"id": 79, "image_id": 7, "category_id": 1, "bbox": [50, 10, 15, 5], "iscrowd": 0}], None, None,
     ["annotation id 79", "b.jpg", "outside the 60x50"]),
    ([{"id": 80, "image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}], None, None,
     ["annotation id 80", "unknown image_id 5"]),
    ([{"id": 81, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5], "iscrowd": 0}], None, None,
     ["annotation id 81", "not [x, y, width, height]"]),
    ([], {7: {"file_name": "gone.jpg"}}, None, ["gone.jpg", "not found"]),
    ([], None, '{"images": [', ["malformed JSON"]),
    ([], None, '{"images": []}', ["no 'annotations' list"]),
])
def test_coco_bad_annotations_are_one_line_naming_file_and_object(tmp_path, extra, overrides, raw, expected):
    _coco(tmp_path, "train2017")
    path = _coco(tmp_path, "val2017", extra, overrides)
    if raw is not None:
        path.write_text(raw)
    with pytest.raises(DataError) as error:
        DATASETS.get("coco")(root=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and (str(path) in message or str(tmp_path / "val2017") in message), message
    for part in expected:
        assert part in message, message


def test_coco_zero_width_or_height_boxes_are_dropped_with_one_warning(tmp_path):
    # COCO train2017 holds such lines (annotation 918: bbox [296.65, 388.33, 1.03, 0.0]); refusing
    # them would refuse the dataset.
    _coco(tmp_path, "train2017")
    lines = [{"id": 918, "image_id": 7, "category_id": 1, "bbox": [2.5, 3.0, 1.03, 0.0], "iscrowd": 0},
             {"id": 919, "image_id": 7, "category_id": 3, "bbox": [4, 4, 0, 6], "iscrowd": 0}]
    path = _coco(tmp_path, "val2017", lines)
    with pytest.warns(UserWarning) as caught:
        _, test, _ = DATASETS.get("coco")(root=str(tmp_path), augment=False, image_size=None)
    messages = [str(w.message) for w in caught if "zero-width" in str(w.message)]
    assert len(messages) == 1 and str(path) in messages[0] and "dropped 2 " in messages[0]
    assert "918" in messages[0] and "919" in messages[0]
    assert test[1][1]["boxes"].tolist() == [[40.0, 5.0, 60.0, 15.0]]  # the image's real box stays


def test_coco_unreadable_or_resized_image_fails_on_access_naming_it(tmp_path):
    _coco(tmp_path, "train2017")
    _coco(tmp_path, "val2017")
    (tmp_path / "val2017" / "b.jpg").write_bytes(b"garbage")
    _write_image(tmp_path / "val2017" / "a.jpg", 99, 80)
    _, test, _ = DATASETS.get("coco")(root=str(tmp_path), image_size=None)
    with pytest.raises(DataError, match=r"a\.jpg is 99x80 \(WxH\) but .*instances_val2017.json annotates it as 100x80"):
        test[0]
    with pytest.raises(DataError, match=r"cannot read image .*b\.jpg"):
        test[1]
    with pytest.raises(DataError) as error:
        DATASETS.get("coco")(root=str(tmp_path / "none"))
    assert str((tmp_path / "none" / "annotations" / "instances_train2017.json").resolve()) in str(error.value)


def _white_box_image(width: int, height: int, box) -> torch.Tensor:
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1] = 255
    return image


def _bright_extent(image: torch.Tensor) -> list[float]:
    grey = image.mean(0)
    rows, cols = torch.nonzero(grey > (grey.max() + grey.min()) / 2, as_tuple=True)
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


def test_train_transform_flips_and_distorts_with_the_box_following_the_pixels():
    box = (10, 20, 30, 44)
    transform = DetectionTransform(train=True, image_size=None)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        target = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([3]),
                  "difficult": torch.tensor([False]), "iscrowd": torch.tensor([False]), "image_id": 5}
        image, out = transform(_white_box_image(80, 60, box), target)
        assert image.dtype == torch.float32 and image.shape == (3, 60, 80) and type(image) is torch.Tensor
        assert type(out["boxes"]) is torch.Tensor and out["labels"].tolist() == [3] and out["image_id"] == 5
        assert out["boxes"][0].tolist() == _bright_extent(image)
        seen.add(tuple(out["boxes"][0].tolist()))
    assert seen == {(10.0, 20.0, 30.0, 44.0), (50.0, 20.0, 70.0, 44.0)}  # as is, and mirrored: 80 - 30, 80 - 10


def test_resize_scales_boxes_with_or_without_aspect():
    box = (20, 16, 60, 48)
    target = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([0]),
              "difficult": torch.tensor([False]), "iscrowd": torch.tensor([False]), "image_id": 0}
    image, out = DetectionTransform(train=False, image_size=40)(_white_box_image(100, 80, box), dict(target))
    assert image.shape == (3, 40, 40)
    assert out["boxes"][0].tolist() == pytest.approx([8.0, 8.0, 24.0, 24.0])  # x * 0.4, y * 0.5
    assert _bright_extent(image) == pytest.approx(out["boxes"][0].tolist(), abs=1)
    image, out = DetectionTransform(train=False, image_size=50, keep_aspect=True)(_white_box_image(100, 80, box),
                                                                                  dict(target))
    assert image.shape == (3, 40, 50) and out["boxes"][0].tolist() == pytest.approx([10.0, 8.0, 30.0, 24.0])


def test_degenerate_boxes_are_removed_with_their_labels_and_flags_in_training_only():
    boxes = torch.tensor([[10, 10, 60, 60], [100, 20, 102, 180], [120, 30, 190, 150]], dtype=torch.float32)
    target = {"boxes": boxes, "labels": torch.tensor([4, 5, 6]), "difficult": torch.tensor([False, True, False]),
              "iscrowd": torch.tensor([True, False, False]), "image_id": 1}
    image = torch.zeros(3, 200, 200, dtype=torch.uint8)
    _, out = DetectionTransform(train=True, image_size=50)(image, dict(target))  # the 2-pixel box becomes 0.5
    assert out["labels"].tolist() == [4, 6] and out["difficult"].tolist() == [False, False]
    assert out["iscrowd"].tolist() == [True, False] and out["boxes"].shape == (2, 4)
    _, kept = DetectionTransform(train=False, image_size=50)(image, dict(target))
    assert kept["labels"].tolist() == [4, 5, 6] and kept["boxes"][1].tolist() == pytest.approx([25, 5, 25.5, 45])


def test_collate_stacks_equal_sizes_and_lists_unequal_ones(tmp_path):
    _voc(tmp_path)
    train, test, _ = DATASETS.get("voc")(root=str(tmp_path), image_size=32)
    loader = torch.utils.data.DataLoader(train, batch_size=3, shuffle=True, collate_fn=collate_detection)
    images, targets, indices = next(iter(loader))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert sorted(indices.tolist()) == [0, 1, 2] and indices.dtype == torch.int64
    assert isinstance(targets, list) and len(targets) == 3
    for target, index in zip(targets, indices.tolist()):
        assert target["boxes"].shape[1] == 4 and target["labels"].shape == (target["boxes"].shape[0],)
        assert target["image_id"] == train.target(index)["image_id"]
    train, _, _ = DATASETS.get("voc")(root=str(tmp_path), image_size=None, augment=False)
    images, targets, indices = collate_detection([train[0], train[1]])
    assert isinstance(images, list) and [tuple(i.shape) for i in images] == [(3, 80, 100), (3, 48, 64)]
    assert indices.tolist() == [0, 1] and targets[1]["boxes"].shape == (0, 4)
    # DataLoader workers started by spawn pickle the dataset with its transform.
    copy = pickle.loads(pickle.dumps(DATASETS.get("voc")(root=str(tmp_path), image_size=32)[0]))
    assert copy[0][0].shape == (3, 32, 32)


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shapes_det_is_deterministic_and_its_voc_and_coco_forms_agree(tmp_path):
    small = dict(image_size=64, num_train=12, num_val=6)
    a = make_shapes_det(tmp_path / "a", **small)
    b = make_shapes_det(tmp_path / "b", **small)
    assert _tree(a) == _tree(b)
    c = make_shapes_det(tmp_path / "c", seed=1, **small)
    assert _tree(a) != _tree(c)
    voc_train, voc_test, voc_info = DATASETS.get("shapes-det")(root=str(tmp_path / "a"), augment=False, **small)
    coco_train, coco_test, coco_info = DATASETS.get("shapes-det")(root=str(tmp_path / "a"), augment=False,
                                                                  format="coco", **small)
    assert voc_info == coco_info and voc_info.class_names == SHAPES_DET_CLASSES and voc_info.num_train == 12
    assert (len(voc_train), len(voc_test), len(coco_test)) == (12, 6, 6)
    for voc_set, coco_set in ((voc_train, coco_train), (voc_test, coco_test)):
        for i in range(len(voc_set)):
            v_image, v, _ = voc_set[i]
            c_image, c, _ = coco_set[i]
            assert torch.equal(v_image, c_image) and v_image.shape == (3, 64, 64)
            assert v["image_id"] == c["image_id"]
            for key in ("boxes", "labels", "difficult", "iscrowd"):
                assert torch.equal(v[key], c[key]), (i, key)
    # The VOC XML went through the 1-based conversion and back, the COCO JSON through xywh.
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["counts"]["train"]["objects"] == sum(len(voc_train.target(i)["labels"]) for i in range(12))


def test_shapes_det_cache_is_reused_and_regenerated_when_incomplete(tmp_path):
    small = dict(image_size=48, num_train=5, num_val=3)
    folder = make_shapes_det(tmp_path, **small)
    assert folder.parent == tmp_path / "shapes-det"
    reference = _tree(folder)
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert make_shapes_det(tmp_path, **small) == folder and (folder / "manifest.json").stat().st_mtime_ns == stamp
    (folder / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    make_shapes_det(tmp_path, **small)
    assert _tree(folder) == reference
    (folder / "manifest.json").write_text("{")
    make_shapes_det(tmp_path, **small)
    assert _tree(folder) == reference
    assert sorted(p.name for p in (tmp_path / "shapes-det").iterdir()) == [folder.name]  # no leftovers
    with pytest.raises(DataError, match="format"):
        DATASETS.get("shapes-det")(root=str(tmp_path), format="yolo", **small)


def test_shapes_det_default_size_content_and_training_items(tmp_path):
    train, test, info = DATASETS.get("shapes-det")(root=str(tmp_path))
    assert (len(train), len(test), info.num_classes, info.image_size) == (1600, 200, 6, 128)
    counts = [len(train.target(i)["labels"]) for i in range(len(train))]
    assert 0 in counts and max(counts) == 4 and 1.5 < np.mean(counts) < 2.8
    labels = torch.cat([train.target(i)["labels"] for i in range(len(train))])
    assert torch.bincount(labels, minlength=6).min() > 320  # every class well represented
    boxes = torch.cat([train.target(i)["boxes"] for i in range(len(train))])
    sides = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert boxes.min() >= 0 and boxes.max() <= 128 and sides.min() >= 5 and sides.max() <= 60
    images, targets, indices = collate_detection([train[i] for i in range(4)])
    assert images.shape == (4, 3, 128, 128) and 0 <= images.min() and images.max() <= 1 and indices.tolist() == [0, 1, 2, 3]
