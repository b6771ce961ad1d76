#!/usr/bin/env bash
# docs/scaling.md: per model, one memory run and one time run with every option side by side.
# Rows: bp, bp_checkpoint, fba, fba with checkpoint=true, fba on 2 DDP processes, fba on a
# 2-stage pipeline. Single-process rows use torch's default threads (all cores); each of the 2
# processes of a +ddp or +pipeline row uses one thread, so both share the same cores.
# Usage: bash benchmarks/scaling.sh [memory|time|all]   (about 40 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
FBA=${FBA:-.venv/bin/fba}
WHAT=${1:-all}
OUT=docs/results
ROWS=bp,bp_checkpoint,fba,fba+checkpoint,fba+ddp,fba+pipeline
# EDSR's global skip crosses module boundaries outside the activations: no pipeline row.
SR_ROWS=bp,bp_checkpoint,fba,fba+checkpoint,fba+ddp

run() {  # run WHAT NAME ARGS...
  local what=$1 name=$2; shift 2
  if [[ $WHAT == all || $WHAT == "$what" ]]; then
    echo "== $what $name" >&2
    "$FBA" bench "$what" "$@" --out "$OUT/scaling_${name}_${what}" --quiet
  fi
}

for what in memory time; do
  steps=$([[ $what == memory ]] && echo 2 || echo 6)
  run "$what" resnet32_k16 model=resnet32 K=16 --batch-size 128 --input-size 32 --num-samples 50000 \
      --methods "$ROWS" --steps "$steps"
  run "$what" resnet101_k4 model=resnet101 K=4 --batch-size 16 --input-size 224 --num-classes 1000 \
      --num-samples 1000 --methods "$ROWS" --steps "$([[ $what == memory ]] && echo 2 || echo 3)" --warmup 1
  for scale in 2 4; do
    run "$what" "edsr_x$scale" task=super_resolution "sr.scale=$scale" --batch-size 16 --input-size 48 \
        --num-samples 1000 --methods "$SR_ROWS" --steps "$steps"
  done
  # The built-in default run's model and batch (fba train): digits, 8x8 grey, batch 64.
  run "$what" default_run model=resnet32 K=16 --batch-size 64 --input-size 8 --in-channels 1 \
      --num-samples 1437 --methods fba,fba+ddp,fba+pipeline --steps "$([[ $what == memory ]] && echo 2 || echo 20)"
done
