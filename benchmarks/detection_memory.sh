#!/usr/bin/env bash
# docs/detection.md, memory: peak training memory of RetinaNet and YOLOv1 at the issue's
# shape (batch 8, 512x512, 20 classes), every method side by side per model and K.
# Usage: bash benchmarks/detection_memory.sh [cpu|cuda] [OUT_DIR] [GROUP ...]
#   cpu: the deterministic CPU tracker (slow: about 2 min per R34 row on 2 cores);
#   cuda: torch.cuda.max_memory_allocated.
#   GROUP: r34, yolo34, r34_k17, yolo34_k17, r50, r101, r152 (default: all of them), and
#   r34_light, yolo34_light: K=4 with det.local_min_stride=8 (module 0's SLM at stride 8);
#   r34_balanced, yolo34_balanced: K=4 by stage beside partition=balanced.
# Detection's defaults hold: local methods checkpoint module 0 (checkpoint=[0]); the rows
# METHOD+checkpoint=false show them without it, METHOD+checkpoint with every module checkpointed.
# The paper's recipe at this shape is set explicitly, whatever the built-in run's defaults: its
# FPN width (256) and its SGD with momentum (one state per parameter; the built-in 128 px run's
# AdamW keeps two, which adds the same weights-sized block to BP and FBA: docs/detection.md).
set -euo pipefail
cd "$(dirname "$0")/.."
FBA=${FBA:-.venv/bin/fba}  # a command, may be "python -m fba"
DEVICE=${1:-cpu}
OUT=${2:-docs/results}
shift $(( $# < 2 ? $# : 2 ))
GROUPS_WANTED=${*:-r34 yolo34 r34_k17 yolo34_k17 r50 r101 r152}
SHAPE=(--batch-size 8 --input-size 512 --num-classes 20 --num-samples 1000 "device=$DEVICE" det.fpn_channels=256
       optim.name=sgd)

run() {  # run NAME MODEL K METHODS [KEY=VALUE ...]
  echo "== $DEVICE $1: $2 K=$3 ${*:5}" >&2
  $FBA bench memory task=detection "model=$2" "K=$3" --methods "$4" "${SHAPE[@]}" "${@:5}" \
      --out "$OUT/detection_memory_${DEVICE}_$1" --quiet
}

for group in $GROUPS_WANTED; do
  case $group in
    r34) run r34_k4 retinanet_resnet34 4 bp,bp_checkpoint,dgl,dgl+checkpoint=false,fba,fba+checkpoint=false,fba+checkpoint ;;
    yolo34) run yolo34_k4 yolov1_resnet34 4 bp,bp_checkpoint,dgl,dgl+checkpoint=false,fba,fba+checkpoint=false,fba+checkpoint ;;
    r34_k17) run r34_k17 retinanet_resnet34 17 bp,dgl,fba,fba+checkpoint ;;
    yolo34_k17) run yolo34_k17 yolov1_resnet34 17 bp,dgl,fba ;;
    r50) run r50_k4 retinanet_resnet50 4 bp,bp_checkpoint,dgl,fba,fba+checkpoint
         run r50_k17 retinanet_resnet50 17 bp,dgl,fba ;;
    r101) run r101_k4 retinanet_resnet101 4 bp,bp_checkpoint,dgl,fba,fba+checkpoint
          run r101_k34 retinanet_resnet101 34 bp,dgl,fba ;;
    r152) run r152_k4 retinanet_resnet152 4 bp,bp_checkpoint,dgl,fba,fba+checkpoint
          run r152_k51 retinanet_resnet152 51 bp,dgl,fba ;;
    r34_light) run r34_k4_min_stride8 retinanet_resnet34 4 bp,dgl,fba,fba+checkpoint=false det.local_min_stride=8 ;;
    yolo34_light) run yolo34_k4_min_stride8 yolov1_resnet34 4 bp,dgl,fba,fba+checkpoint=false det.local_min_stride=8 ;;
    r34_balanced) run r34_k4_balanced retinanet_resnet34 4 \
        bp,dgl,dgl+partition=balanced,fba,fba+partition=balanced,fba+checkpoint=false,fba+partition=balanced+checkpoint=false ;;
    yolo34_balanced) run yolo34_k4_balanced yolov1_resnet34 4 \
        bp,dgl,dgl+partition=balanced,fba,fba+partition=balanced,fba+checkpoint=false,fba+partition=balanced+checkpoint=false ;;
    *) echo "unknown group $group" >&2; exit 2 ;;
  esac
done
