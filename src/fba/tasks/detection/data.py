"""Detection datasets: PASCAL VOC (XML), COCO (instances JSON) and the built-in ``shapes-det``.

Every item is ``(image, target, index)``:

- ``image``: float32 ``(3, H, W)`` in [0, 1];
- ``target``: ``{"boxes": float32 (M, 4) xyxy in pixels of the returned image, "labels": int64
  (M,) 0-based contiguous, "difficult": bool (M,), "iscrowd": bool (M,), "image_id": int}``;
  an image with no objects has ``boxes`` of shape ``(0, 4)``;
- ``index``: the dataset index (the long-term bank's key; the trainer passes it to
  ``learner.train_step(images, targets, indices)``).

Batches are made by :func:`collate_detection`.

Builders (registry :data:`DATASETS`), all called as ``builder(root, download=False,
augment=True, image_size=..., keep_aspect=False, **ignored) -> (train_set, test_set,
DetectionDataInfo)``:

- ``voc``: ``root/VOCdevkit/VOC2007`` and ``VOC2012`` (``root`` may also be the VOCdevkit
  folder itself), each with ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and
  ``ImageSets/Main/{trainval,test}.txt``. Train = 2007 trainval + 2012 trainval, test =
  2007 test; the 20 classes of :data:`VOC_CLASSES` in the standard order. Boxes are
  converted from VOC's 1-based inclusive pixel indices to 0-based continuous xyxy
  (``x0 = xmin - 1``, ``x1 = xmax``, so the whole image is ``(0, 0, W, H)``). Image sizes are
  read from the image files, not from the XML's ``<size>``. ``difficult`` objects are kept
  with their flag in the test split (evaluation ignores them) and dropped from the training
  split by default (``keep_difficult=True`` keeps them), as the Fast/Faster R-CNN and SSD
  recipes do.
- ``coco``: ``root/annotations/instances_{train2017,val2017}.json`` with images in
  ``root/{train2017,val2017}/``. Category ids are mapped to contiguous 0-based labels in
  sorted id order (``info.class_names`` in that order); ``bbox`` ``[x, y, w, h]`` becomes
  xyxy. Crowd annotations (``iscrowd=1``) are dropped from the training split and kept with
  their flag in the test split (evaluation ignores them). Images without annotations are
  kept in both splits.
- ``shapes-det``: built in and offline, see :func:`make_shapes_det`; written once under
  ``root/shapes-det/`` in both the VOC and the COCO layout and read back through the same
  readers as real VOC (default, ``format="voc"``) or COCO (``format="coco"``).

Transforms (torchvision v2, boxes as ``tv_tensors.BoundingBoxes``): the training split gets
SSD's photometric distortion, a horizontal flip (p = 0.5), the resize, and the removal of
boxes left smaller than a pixel (``SanitizeBoundingBoxes``); the test split gets the resize
only. The resize warps every image to ``image_size x image_size`` (aspect not kept, as
YOLO and SSD do), so all images of a split share a size and :func:`collate_detection`
stacks them; ``keep_aspect=True`` scales the longer side to ``image_size`` instead, and
batches of different sizes are collated as lists. ``image_size=None`` keeps the files'
sizes. Randomness comes from torch's global generator.

Bad annotations raise :class:`~fba.errors.DataError` with one line naming the file and the
object: a box outside the image or with no area, an unknown class, malformed XML or JSON, a
missing or unreadable image. COCO stores rounded floats, so a COCO box that overshoots the
image by at most :data:`COCO_BORDER_TOLERANCE` pixels is clipped rather than refused; VOC
coordinates are integers and are checked exactly. A COCO box of zero width or height (a line
or a point, as two of train2017's are) is dropped with a warning instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fba.errors import DataError
from fba.registry import Registry
from fba.tasks.image_files import image_size, read_image

__all__ = [
    "DATASETS", "DetectionDataInfo", "DetectionDataset", "DetectionRecord", "DetectionTransform",
    "collate_detection", "read_voc", "read_coco", "make_shapes_det", "VOC_CLASSES", "SHAPES_DET_CLASSES",
    "COCO_BORDER_TOLERANCE",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: pixels by which a COCO box may overshoot the image and be clipped instead of refused
COCO_BORDER_TOLERANCE = 1.0

DEFAULT_IMAGE_SIZE = 512


@dataclass(frozen=True)
class DetectionDataInfo:
    """What the task and model need to know about a detection dataset."""

    num_classes: int
    in_channels: int = 3
    num_train: int = 0
    class_names: tuple[str, ...] = ()
    image_size: int | None = None  #: side of the square the images are resized to (None: as stored)


#: name -> ``builder(root, download, augment, image_size, keep_aspect, **ignored)`` returning
#: ``(train_set, test_set, DetectionDataInfo)``.
DATASETS: Registry[Callable[..., tuple[Dataset, Dataset, DetectionDataInfo]]] = Registry("dataset")


# --------------------------------------------------------------------------- records and images

@dataclass
class DetectionRecord:
    """One annotated image on disk. Boxes are 0-based xyxy in the stored image's pixels."""

    image: Path
    image_id: int
    height: int
    width: int
    boxes: Tensor  # float32 (M, 4)
    labels: Tensor  # int64 (M,)
    difficult: Tensor  # bool (M,)
    iscrowd: Tensor  # bool (M,)
    source: str  # the annotation file, for error messages

    def select(self, keep: Tensor) -> "DetectionRecord":
        return DetectionRecord(self.image, self.image_id, self.height, self.width, self.boxes[keep],
                               self.labels[keep], self.difficult[keep], self.iscrowd[keep], self.source)


def _make_record(image: Path, image_id: int, height: int, width: int, boxes: list, labels: list, difficult: list,
                 iscrowd: list, source: str) -> DetectionRecord:
    return DetectionRecord(
        image, image_id, height, width,
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64),
        torch.tensor(difficult, dtype=torch.bool), torch.tensor(iscrowd, dtype=torch.bool), source)


def _check_box(box: Sequence[float], width: int, height: int, where: str, shown: str) -> None:
    """Refuse a 0-based xyxy box with no area or outside the image; ``shown`` is the box as the file has it."""
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box):
        raise DataError(f"{where}: box {shown} is not finite")
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{where}: box {shown} has no area")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise DataError(f"{where}: box {shown} lies outside the {width}x{height} (WxH) image")


# --------------------------------------------------------------------------- PASCAL VOC

def _xml_text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _xml_number(node: ET.Element, tag: str, where: str) -> float:
    text = _xml_text(node, tag, where)
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{where}: <{tag}> is {text!r}, not a number") from None


def parse_voc_xml(path: Path, class_index: Mapping[str, int]) -> list[tuple[int, list[float], bool, str]]:
    """The objects of one VOC annotation file: ``[(label, [xmin, ymin, xmax, ymax] as in the file, difficult, where)]``.

    ``where`` names the file and the object (``file: object #k 'name'``, k from 1) for later errors.
    """
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"annotation {path} not found") from None
    except ET.ParseError as error:
        raise DataError(f"{path}: malformed XML: {error}") from None
    except OSError as error:
        raise DataError(f"cannot read annotation {path}: {error}") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: malformed VOC annotation: the root element is <{root.tag}>, not <annotation>")
    objects = []
    for k, node in enumerate(root.findall("object"), start=1):
        name_node = node.find("name")
        name = (name_node.text or "").strip() if name_node is not None else ""
        where = f"{path}: object #{k} {name!r}" if name else f"{path}: object #{k}"
        if not name:
            raise DataError(f"{where}: missing <name>")
        if name not in class_index:
            raise DataError(f"{where}: unknown class {name!r}; expected one of: {', '.join(class_index)}")
        difficult_node = node.find("difficult")
        difficult_text = (difficult_node.text or "0").strip() if difficult_node is not None else "0"
        if difficult_text not in ("0", "1"):
            raise DataError(f"{where}: <difficult> is {difficult_text!r}, not 0 or 1")
        box_node = node.find("bndbox")
        if box_node is None:
            raise DataError(f"{where}: missing <bndbox>")
        box = [_xml_number(box_node, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((class_index[name], box, difficult_text == "1", where))
    return objects


def _voc_record(xml: Path, image: Path, image_id: int, class_index: Mapping[str, int]) -> DetectionRecord:
    objects = parse_voc_xml(xml, class_index)
    height, width = image_size(image, f" (of {xml})")
    boxes, labels, difficult = [], [], []
    for label, (xmin, ymin, xmax, ymax), hard, where in objects:
        shown = f"(xmin={xmin:g}, ymin={ymin:g}, xmax={xmax:g}, ymax={ymax:g})"
        # VOC indexes pixels from 1 and includes xmax: pixel xmin..xmax is [xmin - 1, xmax) in
        # continuous 0-based coordinates, so the areas equal the devkit's (xmax - xmin + 1).
        box = [xmin - 1, ymin - 1, xmax, ymax]
        _check_box(box, width, height, where, shown)
        boxes.append(box)
        labels.append(label)
        difficult.append(hard)
    return _make_record(image, image_id, height, width, boxes, labels, difficult, [False] * len(labels), str(xml))


def _voc_ids(image_set: Path) -> list[str]:
    try:
        lines = image_set.read_text().split("\n")
    except FileNotFoundError:
        raise DataError(f"image set {image_set} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read image set {image_set}: {error}") from None
    # Class-specific set files carry a second column ("<id> -1"); the id is the first.
    return [line.split()[0] for line in lines if line.strip()]


def read_voc(year_dir: str | Path, image_set: str, class_names: Sequence[str] = VOC_CLASSES,
             first_id: int = 0) -> list[DetectionRecord]:
    """Records of ``year_dir/ImageSets/Main/<image_set>.txt`` (e.g. ``VOC2007``, ``"test"``).

    ``image_id`` numbers the images from ``first_id`` in the set file's order; all objects are
    kept, with their ``difficult`` flags.
    """
    year_dir = Path(year_dir)
    class_index = {name: i for i, name in enumerate(class_names)}
    records = []
    for i, name in enumerate(_voc_ids(year_dir / "ImageSets" / "Main" / f"{image_set}.txt")):
        records.append(_voc_record(year_dir / "Annotations" / f"{name}.xml", year_dir / "JPEGImages" / f"{name}.jpg",
                                   first_id + i, class_index))
    return records


def _voc_layout(devkit: Path) -> str:
    return (f"{devkit}/VOC2007 and {devkit}/VOC2012, each with Annotations/<id>.xml, JPEGImages/<id>.jpg and "
            f"ImageSets/Main/trainval.txt (and test.txt for VOC2007)")


# --------------------------------------------------------------------------- COCO

def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise DataError(f"annotation file {path} not found") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: malformed JSON: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read annotation file {path}: {error}") from None


def _coco_list(data: Any, key: str, path: Path) -> list:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise DataError(f"{path}: malformed COCO annotations: no {key!r} list at the top level")
    return value


def _coco_field(entry: Any, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where}: missing {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: {key!r} is {value!r}")
    return value


def read_coco(annotation_file: str | Path, image_dir: str | Path,
              categories: Sequence[int] | None = None) -> tuple[list[DetectionRecord], list[int], list[str]]:
    """Records of a COCO instances file, in the order of its ``images`` list.

    Returns ``(records, category_ids, class_names)``: label ``i`` is ``category_ids[i]``, the
    ids in sorted order (or ``categories`` when given, so that a test split keeps the labels
    of its training split). All annotations are kept, crowd ones flagged in ``iscrowd``,
    except boxes of zero width or height (lines and points), which are dropped with one
    warning per file; a negative size is an error.
    """
    path, image_dir = Path(annotation_file), Path(image_dir)
    data = _load_json(path)
    images, annotations = _coco_list(data, "images", path), _coco_list(data, "annotations", path)
    names: dict[int, str] = {}
    for k, category in enumerate(_coco_list(data, "categories", path)):
        cat_id = _coco_field(category, "id", int, f"{path}: category #{k + 1}")
        names[cat_id] = str(category.get("name", cat_id))
    category_ids = sorted(names) if categories is None else list(categories)
    label_of = {cat_id: i for i, cat_id in enumerate(category_ids)}
    info: dict[int, tuple[str, int, int]] = {}
    order: list[int] = []
    for k, image in enumerate(images):
        where = f"{path}: image #{k + 1}"
        image_id = _coco_field(image, "id", int, where)
        file_name = _coco_field(image, "file_name", str, where)
        where = f"{path}: image id {image_id} ({file_name})"
        width, height = _coco_field(image, "width", int, where), _coco_field(image, "height", int, where)
        if image_id in info:
            raise DataError(f"{where}: image id {image_id} appears twice")
        info[image_id] = (file_name, height, width)
        order.append(image_id)
    objects: dict[int, tuple[list, list, list]] = {image_id: ([], [], []) for image_id in order}
    zero_size: list[Any] = []
    for k, ann in enumerate(annotations):
        ann_id = ann.get("id", f"#{k + 1}") if isinstance(ann, dict) else f"#{k + 1}"
        where = f"{path}: annotation id {ann_id}"
        image_id = _coco_field(ann, "image_id", int, where)
        if image_id not in info:
            raise DataError(f"{where}: unknown image_id {image_id}")
        file_name, height, width = info[image_id]
        where = f"{path}: annotation id {ann_id} (image {file_name})"
        category_id = _coco_field(ann, "category_id", int, where)
        if category_id not in label_of:
            raise DataError(f"{where}: unknown category_id {category_id}; the categories are "
                            f"{', '.join(map(str, category_ids))}")
        bbox = _coco_field(ann, "bbox", list, where)
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise DataError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
        x, y, w, h = (float(v) for v in bbox)
        if (w == 0 or h == 0) and w >= 0 and h >= 0 and all(math.isfinite(v) for v in (x, y, w, h)):
            # A line or point: COCO train2017 itself holds two (annotation 918 is one), so refusing
            # them would refuse COCO. Dropped, as torchvision's and mmdetection's loaders drop them.
            zero_size.append(ann_id)
            continue
        box = [x, y, x + w, y + h]
        if all(math.isfinite(v) for v in box) and w > 0 and h > 0:
            # Rounded floats and polygon-derived boxes may overshoot by a hair: clip those.
            tol = COCO_BORDER_TOLERANCE
            if -tol <= box[0] and -tol <= box[1] and box[2] <= width + tol and box[3] <= height + tol:
                box = [max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(width)), min(box[3], float(height))]
        _check_box(box, width, height, where, f"[x={x:g}, y={y:g}, w={w:g}, h={h:g}]")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1, False, True):
            raise DataError(f"{where}: iscrowd is {crowd!r}, not 0 or 1")
        boxes, labels, crowds = objects[image_id]
        boxes.append(box)
        labels.append(label_of[category_id])
        crowds.append(bool(crowd))
    if zero_size:
        shown = ", ".join(map(str, zero_size[:5])) + (", ..." if len(zero_size) > 5 else "")
        warnings.warn(f"{path}: dropped {len(zero_size)} annotation(s) with a zero-width or zero-height box "
                      f"(ids {shown})", stacklevel=2)
    records = []
    for image_id in order:
        file_name, height, width = info[image_id]
        file = image_dir / file_name
        if not file.is_file():
            raise DataError(f"image {file} (image id {image_id} of {path}) not found")
        boxes, labels, crowds = objects[image_id]
        records.append(_make_record(file, image_id, height, width, boxes, labels, [False] * len(labels), crowds,
                                    str(path)))
    return records, category_ids, [names.get(i, str(i)) for i in category_ids]


# --------------------------------------------------------------------------- datasets and transforms

def _per_box_fields(inputs: tuple[Any, dict[str, Any]]) -> tuple[Tensor, Tensor, Tensor]:
    # A module-level function, not a lambda: DataLoader workers may need to pickle the transform.
    target = inputs[1]
    return target["labels"], target["difficult"], target["iscrowd"]


class DetectionTransform:
    """``(uint8 image (3, H, W), target) -> (float32 image (3, H', W') in [0, 1], target)``, boxes kept aligned.

    ``train``: photometric distortion, horizontal flip, resize, removal of boxes narrower or
    lower than a pixel (with their labels and flags). Otherwise: the resize only.
    ``image_size`` None keeps the size; ``keep_aspect`` scales the longer side to ``image_size``
    instead of warping to a square.
    """

    def __init__(self, train: bool, image_size: int | None, keep_aspect: bool = False) -> None:
        from torchvision.transforms import v2

        self.train, self.image_size, self.keep_aspect = train, image_size, keep_aspect
        ops: list = []
        if train:
            ops += [v2.RandomPhotometricDistort(p=0.5), v2.RandomHorizontalFlip(p=0.5)]
        if image_size is not None:
            size = None if keep_aspect else [image_size, image_size]
            ops.append(v2.Resize(size, max_size=image_size if keep_aspect else None, antialias=True))
        ops.append(v2.ToDtype(torch.float32, scale=True))
        if train:
            ops.append(v2.SanitizeBoundingBoxes(labels_getter=_per_box_fields))
        self.ops = v2.Compose(ops)

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        from torchvision import tv_tensors

        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
        image, target = self.ops(tv_tensors.Image(image), {**target, "boxes": boxes})
        # Plain tensors downstream: tv_tensor subclasses leak their metadata into torch ops.
        target["boxes"] = target["boxes"].as_subclass(Tensor)
        return image.as_subclass(Tensor), target

    def __repr__(self) -> str:
        return f"DetectionTransform(train={self.train}, image_size={self.image_size}, keep_aspect={self.keep_aspect})"


class DetectionDataset(Dataset):
    """Annotated images decoded on access: item ``i`` -> ``(image (3, H, W) float32, target, i)`` (module docstring)."""

    def __init__(self, records: Sequence[DetectionRecord], class_names: Sequence[str],
                 transform: Callable[[Tensor, dict], tuple[Tensor, dict]] | None = None) -> None:
        self.records = list(records)
        self.class_names = tuple(class_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, index: int) -> str:
        """The image file of item ``index``, for messages and for writing outputs."""
        return str(self.records[index].image)

    def target(self, index: int) -> dict[str, Any]:
        """The annotation of item ``index`` in the stored image's pixels, without decoding it."""
        r = self.records[index]
        return {"boxes": r.boxes.clone(), "labels": r.labels.clone(), "difficult": r.difficult.clone(),
                "iscrowd": r.iscrowd.clone(), "image_id": r.image_id}

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any], int]:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} images")
        record = self.records[index]
        image = read_image(record.image)
        if tuple(image.shape[-2:]) != (record.height, record.width):
            raise DataError(f"image {record.image} is {image.shape[-1]}x{image.shape[-2]} (WxH) but {record.source} "
                            f"annotates it as {record.width}x{record.height}")
        target = self.target(index)
        if self.transform is not None:
            image, target = self.transform(image, target)
        else:
            image = image.float() / 255
        return image, target, index


def collate_detection(batch: Sequence[tuple[Tensor, dict[str, Any], int]]
                      ) -> tuple[Tensor | list[Tensor], list[dict[str, Any]], Tensor]:
    """Batch detection items as torchvision detection models take them.

    Returns ``(images, targets, indices)``: ``images`` stacked into ``(N, 3, H, W)`` when every
    image has the same size (the default square resize), else a list of N ``(3, H_i, W_i)``
    tensors; ``targets`` the list of N target dicts; ``indices`` int64 ``(N,)``.
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    indices = torch.tensor([int(item[2]) for item in batch], dtype=torch.int64)
    if images and all(image.shape == images[0].shape for image in images):
        return torch.stack(images), targets, indices
    return images, targets, indices


def _split(records: list[DetectionRecord], class_names: Sequence[str], augment: bool, image_size: int | None,
           keep_aspect: bool, train: bool) -> DetectionDataset:
    return DetectionDataset(records, class_names, DetectionTransform(train and augment, image_size, keep_aspect))


def _drop(records: list[DetectionRecord], flag: str) -> list[DetectionRecord]:
    return [r.select(~getattr(r, flag)) if bool(getattr(r, flag).any()) else r for r in records]


def _check_size(image_size: Any) -> int | None:
    if image_size is None:
        return None
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise DataError(f"image_size must be an int of at least 8 (or None to keep the files' sizes), got {image_size!r}")
    return image_size


@DATASETS.register("voc")
def voc(root: str = "./data", download: bool = False, augment: bool = True, image_size: int | None = DEFAULT_IMAGE_SIZE,
        keep_aspect: bool = False, keep_difficult: bool = False, **_: Any
        ) -> tuple[DetectionDataset, DetectionDataset, DetectionDataInfo]:
    """PASCAL VOC 07+12 trainval for training, 07 test for testing (module docstring)."""
    image_size = _check_size(image_size)
    base = Path(root)
    devkit = base if (base / "VOC2007").is_dir() else base / "VOCdevkit"
    if download:
        raise DataError(f"fba cannot download PASCAL VOC (it runs offline): put it in {_voc_layout(devkit)} "
                        f"and set data.download=false")
    for year in ("VOC2007", "VOC2012"):
        if not (devkit / year).is_dir():
            raise DataError(f"PASCAL VOC folder {(devkit / year).resolve()} not found: expected {_voc_layout(devkit)}")
    train = read_voc(devkit / "VOC2007", "trainval")
    train += read_voc(devkit / "VOC2012", "trainval", first_id=len(train))
    test = read_voc(devkit / "VOC2007", "test", first_id=len(train))
    if not keep_difficult:
        train = _drop(train, "difficult")
    return (_split(train, VOC_CLASSES, augment, image_size, keep_aspect, True),
            _split(test, VOC_CLASSES, augment, image_size, keep_aspect, False),
            DetectionDataInfo(len(VOC_CLASSES), 3, len(train), VOC_CLASSES, image_size))


@DATASETS.register("coco")
def coco(root: str = "./data/coco", download: bool = False, augment: bool = True,
         image_size: int | None = DEFAULT_IMAGE_SIZE, keep_aspect: bool = False, **_: Any
         ) -> tuple[DetectionDataset, DetectionDataset, DetectionDataInfo]:
    """COCO 2017: train2017 for training, val2017 for testing (module docstring)."""
    image_size = _check_size(image_size)
    base = Path(root)
    layout = (f"{base}/annotations/instances_train2017.json, {base}/annotations/instances_val2017.json, "
              f"{base}/train2017/*.jpg and {base}/val2017/*.jpg")
    if download:
        raise DataError(f"fba cannot download COCO (it runs offline): put it in {layout} and set data.download=false")
    for path in (base / "annotations" / "instances_train2017.json", base / "annotations" / "instances_val2017.json",
                 base / "train2017", base / "val2017"):
        if not path.exists():
            raise DataError(f"COCO {'file' if path.suffix else 'folder'} {path.resolve()} not found: expected {layout}")
    train, category_ids, names = read_coco(base / "annotations" / "instances_train2017.json", base / "train2017")
    test, _, _ = read_coco(base / "annotations" / "instances_val2017.json", base / "val2017", categories=category_ids)
    train = _drop(train, "iscrowd")
    return (_split(train, names, augment, image_size, keep_aspect, True),
            _split(test, names, augment, image_size, keep_aspect, False),
            DetectionDataInfo(len(names), 3, len(train), tuple(names), image_size))


# --------------------------------------------------------------------------- shapes-det

SHAPES = ("circle", "square", "triangle", "cross")
SHAPES_DET_DIGITS = (2, 7)
#: the classes of ``shapes-det``, in label order: four filled shapes and two handwritten digits
SHAPES_DET_CLASSES = SHAPES + tuple(f"digit-{d}" for d in SHAPES_DET_DIGITS)
#: bump when the generator changes, so that old caches are regenerated
SHAPES_DET_VERSION = 1
SHAPES_DET_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "stereo_motorcycle",
                     "brick", "grass", "gravel", "camera", "immunohistochemistry", "coins")
_OBJECTS_PER_IMAGE = (0, 1, 2, 3, 4)
_OBJECTS_P = (0.08, 0.22, 0.30, 0.25, 0.15)
_MAX_OVERLAP = 0.15  # of the smaller box: objects may touch but not hide each other


def _backgrounds(short_side: int) -> list[np.ndarray]:
    """The bundled photos as uint8 ``(H, W, 3)``, grey ones repeated to RGB, short side ``short_side``."""
    from PIL import Image
    from skimage import data as skdata

    out = []
    for name in SHAPES_DET_PHOTOS:
        image = getattr(skdata, name)()
        if isinstance(image, tuple):  # stereo pairs: the left view
            image = image[0]
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
        scale = short_side / min(pil.size)
        pil = pil.resize((max(short_side, round(pil.size[0] * scale)), max(short_side, round(pil.size[1] * scale))),
                         Image.BILINEAR)
        out.append(np.asarray(pil))
    return out


def _shape_alpha(kind: str, height: int, width: int) -> np.ndarray:
    """Coverage in [0, 1] of a filled shape spanning a ``height x width`` patch (2x2 supersampled)."""
    v = (np.arange(2 * height) + 0.5)[:, None] / (2 * height)
    u = (np.arange(2 * width) + 0.5)[None, :] / (2 * width)
    if kind == "circle":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif kind == "square":
        inside = np.ones((2 * height, 2 * width), dtype=bool)
    elif kind == "triangle":  # apex at the top centre
        inside = np.abs(u - 0.5) <= 0.5 * v
    elif kind == "cross":  # a plus sign, arms a third wide
        inside = (np.abs(u - 0.5) <= 1 / 6) | (np.abs(v - 0.5) <= 1 / 6)
    else:
        raise ValueError(kind)
    return inside.reshape(height, 2, width, 2).mean(axis=(1, 3))


def _digit_alpha(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """An 8x8 scikit-learn digit (0..16) upscaled to ``height x width``, strokes as coverage in [0, 1]."""
    from PIL import Image

    image = Image.fromarray((digit.astype(np.float32) / 16).astype(np.float32), mode="F")
    up = np.asarray(image.resize((width, height), Image.BILINEAR))
    return np.clip((up - 0.2) * 2.5, 0, 1)


def _tight_box(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
    """0-based xyxy pixel box of the pixels at least half covered, or None when there are none."""
    rows, cols = np.nonzero(alpha >= 0.5)
    if rows.size == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    for o in others:
        iw = min(box[2], o[2]) - max(box[0], o[0])
        ih = min(box[3], o[3]) - max(box[1], o[1])
        if iw > 0 and ih > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (o[2] - o[0]) * (o[3] - o[1]))
            if iw * ih > _MAX_OVERLAP * smaller:
                return True
    return False


def _contrasting_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    # Dark where the background is light and the reverse, channel by channel: always visible,
    # yet of varied hue, so colour alone never tells the class.
    low, high = rng.uniform(0, 80, 3), rng.uniform(175, 255, 3)
    return np.where(background_mean > 127, low, high)


def _render_split(rng: np.random.Generator, count: int, size: int, photos: list[np.ndarray],
                  digits: dict[int, np.ndarray]) -> list[tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int]]]]]:
    """``count`` images ``(size, size, 3)`` uint8 with their objects ``[(label, (x0, y0, x1, y1))]``."""
    lo, hi = max(8, size // 8), max(12, 3 * size // 8)  # object sides: an eighth to three eighths of the image
    out = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        crop = int(rng.integers(size, min(2 * size, *photo.shape[:2]) + 1))
        y, x = int(rng.integers(photo.shape[0] - crop + 1)), int(rng.integers(photo.shape[1] - crop + 1))
        background = photo[y:y + crop, x:x + crop]
        if crop != size:
            from PIL import Image

            background = np.asarray(Image.fromarray(background).resize((size, size), Image.BILINEAR))
        canvas = background.astype(np.float32)
        wanted = int(rng.choice(_OBJECTS_PER_IMAGE, p=_OBJECTS_P))
        objects: list[tuple[int, tuple[int, int, int, int]]] = []
        for _attempt in range(20 * wanted):
            if len(objects) == wanted:
                break
            label = int(rng.integers(len(SHAPES_DET_CLASSES)))
            side = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(math.log(0.75), math.log(4 / 3)))
            h, w = max(6, round(side * math.sqrt(aspect))), max(6, round(side / math.sqrt(aspect)))
            h, w = min(h, size), min(w, size)
            if label < len(SHAPES):
                alpha = _shape_alpha(SHAPES[label], h, w)
            else:
                samples = digits[SHAPES_DET_DIGITS[label - len(SHAPES)]]
                alpha = _digit_alpha(samples[rng.integers(len(samples))], h, w)
            tight = _tight_box(alpha)
            if tight is None:
                continue
            oy, ox = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
            box = (ox + tight[0], oy + tight[1], ox + tight[2], oy + tight[3])
            if _overlaps(box, [b for _, b in objects]):
                continue
            region = canvas[oy:oy + h, ox:ox + w]
            colour = _contrasting_colour(rng, region.reshape(-1, 3).mean(axis=0))
            a = alpha[..., None].astype(np.float32)
            canvas[oy:oy + h, ox:ox + w] = region * (1 - a) + colour * a
            objects.append((label, box))
        out.append((np.clip(np.round(canvas), 0, 255).astype(np.uint8), objects))
    return out


def _voc_xml(file_name: str, size: int, objects: list[tuple[int, tuple[int, int, int, int]]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "shapes-det"
    ET.SubElement(root, "filename").text = file_name
    size_node = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(size_node, tag).text = str(value)
    for label, (x0, y0, x1, y1) in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = SHAPES_DET_CLASSES[label]
        ET.SubElement(node, "difficult").text = "0"
        box = ET.SubElement(node, "bndbox")
        # Back to VOC's 1-based inclusive pixel indices.
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def _shapes_det_params(image_size: int, num_train: int, num_val: int, seed: int) -> dict[str, Any]:
    return {"version": SHAPES_DET_VERSION, "image_size": image_size, "num_train": num_train, "num_val": num_val,
            "seed": seed, "classes": list(SHAPES_DET_CLASSES)}


def _write_shapes_det(folder: Path, image_size: int, num_train: int, num_val: int, seed: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    digits = {d: bunch.images[bunch.target == d] for d in SHAPES_DET_DIGITS}
    photos = _backgrounds(2 * image_size)
    voc_dir = folder / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "digit" if name.startswith("digit") else "shape"}
                  for i, name in enumerate(SHAPES_DET_CLASSES)]
    counts: dict[str, dict[str, int]] = {}
    next_id = 0
    for split, image_set, count, stream in (("train", "trainval", num_train, 0), ("val", "test", num_val, 1)):
        # One generator per split: the validation images do not change when num_train does.
        rng = np.random.default_rng([seed, stream])
        images, annotations, ids = [], [], []
        for pixels, objects in _render_split(rng, count, image_size, photos, digits):
            next_id += 1
            name = f"{next_id:06d}"
            Image.fromarray(pixels).save(voc_dir / "JPEGImages" / f"{name}.jpg", quality=95)
            (voc_dir / "Annotations" / f"{name}.xml").write_bytes(_voc_xml(f"{name}.jpg", image_size, objects))
            ids.append(name)
            images.append({"id": next_id, "file_name": f"{name}.jpg", "width": image_size, "height": image_size})
            for label, (x0, y0, x1, y1) in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": next_id, "category_id": label + 1,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                    "iscrowd": 0})
        (voc_dir / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in ids))
        with open(folder / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as file:
            json.dump({"info": {"description": "fba shapes-det", "version": SHAPES_DET_VERSION},
                       "images": images, "annotations": annotations, "categories": categories}, file)
        counts[split] = {"images": len(images), "objects": len(annotations)}
    manifest = {**_shapes_det_params(image_size, num_train, num_val, seed), "counts": counts}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _shapes_det_valid(folder: Path, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if {k: manifest.get(k) for k in params} != params:
        return False
    voc_dir = folder / "VOC2007"
    total = params["num_train"] + params["num_val"]
    try:
        if (len(os.listdir(voc_dir / "JPEGImages")) != total or len(os.listdir(voc_dir / "Annotations")) != total):
            return False
    except OSError:
        return False
    return all((p).is_file() for p in (voc_dir / "ImageSets/Main/trainval.txt", voc_dir / "ImageSets/Main/test.txt",
                                       folder / "annotations/instances_train.json",
                                       folder / "annotations/instances_val.json"))


def make_shapes_det(root: str | Path, image_size: int = 128, num_train: int = 1600, num_val: int = 200,
                    seed: int = 0) -> Path:
    """Write ``shapes-det`` once under ``root/shapes-det/`` and return its folder.

    ``image_size`` x ``image_size`` JPEGs of crops of the photos bundled with scikit-image
    (:data:`SHAPES_DET_PHOTOS`, random crops of 1-2x the image size, resized), each with 0-4
    objects (probabilities 8/22/30/25/15 %) of the classes :data:`SHAPES_DET_CLASSES`: filled
    circles, squares, triangles and crosses, and scikit-learn's handwritten 2s and 7s upscaled
    from 8x8. Objects span an eighth to three eighths of the image side with an aspect of
    3:4 to 4:3, in a colour that contrasts with the background under them, overlapping at
    most 15 % of the smaller box. The box is the tight box of the object's at least half
    covered pixels. Everything follows from ``seed``.

    The folder holds the VOC layout ``VOC2007/{Annotations,JPEGImages,ImageSets/Main/{trainval,test}.txt}``
    and the COCO files ``annotations/instances_{train,val}.json`` (category ids 1..6, the images
    shared with the VOC layout), and a ``manifest.json`` written last. A folder whose manifest
    or file counts do not match is regenerated. The cache is built in a temporary folder and
    renamed into place, so concurrent processes (DDP ranks) never see half a dataset.
    """
    for name, value, least in (("image_size", image_size, 32), ("num_train", num_train, 1), ("num_val", num_val, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise DataError(f"shapes-det: {name} must be an int of at least {least}, got {value!r}")
    base = Path(root) / "shapes-det"
    folder = base / f"{image_size}px-{num_train}-{num_val}-seed{seed}"
    params = _shapes_det_params(image_size, num_train, num_val, seed)
    if _shapes_det_valid(folder, params):
        return folder
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_shapes_det(staging, image_size, num_train, num_val, seed)
        if folder.exists():
            if _shapes_det_valid(folder, params):  # another process finished first
                return folder
            stale = base / f".{folder.name}.stale-{os.getpid()}"
            folder.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:
            if not _shapes_det_valid(folder, params):
                raise
    except OSError as error:
        raise DataError(f"cannot write the shapes-det cache under {base.resolve()}: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@DATASETS.register("shapes-det")
def shapes_det(root: str = "./data", download: bool = False, augment: bool = True, image_size: int = 128,
               keep_aspect: bool = False, num_train: int = 1600, num_val: int = 200, seed: int = 0,
               format: str = "voc", **_: Any) -> tuple[DetectionDataset, DetectionDataset, DetectionDataInfo]:
    """Built-in offline detection set (:func:`make_shapes_det`), read back as VOC or COCO.

    ``image_size`` is the generated size, so the resize is a no-op; ``download`` is ignored.
    """
    folder = make_shapes_det(root, image_size, num_train, num_val, seed)
    if format == "voc":
        # Ids from 1 in file order, as the COCO form numbers them.
        train = read_voc(folder / "VOC2007", "trainval", SHAPES_DET_CLASSES, first_id=1)
        test = read_voc(folder / "VOC2007", "test", SHAPES_DET_CLASSES, first_id=len(train) + 1)
        names = SHAPES_DET_CLASSES
    elif format == "coco":
        images = folder / "VOC2007" / "JPEGImages"
        train, category_ids, coco_names = read_coco(folder / "annotations" / "instances_train.json", images)
        test, _, _ = read_coco(folder / "annotations" / "instances_val.json", images, categories=category_ids)
        names = tuple(coco_names)
    else:
        raise DataError(f"shapes-det: format must be 'voc' or 'coco', got {format!r}")
    return (_split(train, names, augment, image_size, keep_aspect, True),
            _split(test, names, augment, image_size, keep_aspect, False),
            DetectionDataInfo(len(names), 3, len(train), tuple(names), image_size))
