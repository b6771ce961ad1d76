"""Training runs of ``fba train task=detection`` side by side, in parallel processes.

docs/detection.md's tables of the built-in default (RetinaNet-R18 on shapes-det, 128 px):
each named run is the default plus its overrides; every run writes its run folder under
``OUT/runs`` and its epoch rows (``metrics.csv``); ``OUT/summary.csv`` has one row per run.

    python benchmarks/detection_sweep.py --out OUT [--jobs 4] [--only NAME,...] [KEY=VALUE ...]

The run list below is the learning-rate and optimiser sweep that was run on a GPU machine
(``docs/results/detection_lr_sweep_gpu.md``), when the built-in default was 20 epochs of 400
images; on today's default the same names train the new budget, so their figures are not
comparable with that file's. The tables that docs/detection.md took with the previous
default (SGD at 0.01, 256 wide, 5 epochs, no checkpointing) come back with the trailing items
``det.fpn_channels=256 optim.name=sgd optim.lr=0.01 optim.weight_decay=0.0001 train.epochs=5
checkpoint=false`` (:data:`PREVIOUS_DEFAULT`).

Trailing ``KEY=VALUE`` items go to every run (``device=cuda``, ``train.epochs=24``); a run's
own overrides come after them.
Each process uses one thread (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fba.bench.variants import train_in_subprocess

#: the built-in run's recipe before the recipe study (docs/detection.md, Results)
PREVIOUS_DEFAULT = ["det.fpn_channels=256", "optim.name=sgd", "optim.lr=0.01", "optim.weight_decay=0.0001",
                    "train.epochs=5", "checkpoint=false"]
SGD2 = ["optim.name=sgd", "optim.lr=0.02", "optim.weight_decay=0.0001"]
ADAMW = ["optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.05"]

SGD4 = ["optim.name=sgd", "optim.lr=0.04", "optim.weight_decay=0.0001"]
LONG = ["train.epochs=48", *SGD2]

RUNS: dict[str, list[str]] = {}
for seed in (0, 1):
    for method in ("bp", "fba", "dgl"):
        RUNS[f"{method}-s{seed}"] = [f"method={method}", f"seed={seed}"]
        RUNS[f"{method}-lr02-s{seed}"] = [f"method={method}", f"seed={seed}", *SGD2]
for method in ("bp", "fba"):
    RUNS[f"{method}-adamw-s0"] = [f"method={method}", "seed=0", *ADAMW]
    RUNS[f"{method}-lr04-s0"] = [f"method={method}", "seed=0", *SGD4]
    RUNS[f"{method}-long-s0"] = [f"method={method}", "seed=0", *LONG]
# Table 4 and the bank-source ablation, seed 0, default recipe.
RUNS["fba-nobank-s0"] = ["method=fba", "seed=0", "fba.bank.source=none"]
RUNS["fba-sharehead-s0"] = ["method=fba", "seed=0", "fba.share_head=true"]
RUNS["fba-nocoarser-s0"] = ["method=fba", "seed=0", "det.local_coarser=false"]
RUNS["yolo-bp-s0"] = ["method=bp", "seed=0", "model=yolov1_resnet18"]
RUNS["yolo-fba-s0"] = ["method=fba", "seed=0", "model=yolov1_resnet18"]


def run_one(name: str, overrides: list[str], common: list[str], out: Path) -> dict:
    start = time.time()
    code, summary = train_in_subprocess(["task=detection", *common, *overrides, f"train.runs_dir={out / 'runs'}",
                                         f"train.name={name}", "train.progress=false"], out / "logs" / f"{name}.log")
    row = {"name": name, "overrides": " ".join(overrides), "exit": code, "wall_seconds": round(time.time() - start, 1)}
    if summary is not None:
        row.update({k: summary.get(k) for k in ("map50", "map", "map75", "peak_memory_bytes", "seconds_per_epoch")})
    metrics = out / "runs" / name / "metrics.csv"
    if metrics.exists():
        rows = list(csv.DictReader(open(metrics)))
        row["best_map50"] = max(float(r["map50"]) for r in rows if r.get("map50") not in (None, "", "nan"))
        row["map50_curve"] = " ".join(f"{float(r['map50']):.3f}" for r in rows if r.get("map50") not in (None, ""))
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    parser.add_argument("common", nargs="*", help="KEY=VALUE overrides for every run")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda n: run_one(n, RUNS[n], args.common, out), names))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
