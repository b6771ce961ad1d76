"""Feature-bank ablation for classification: the measurements behind the default.

Trains FBA ResNet-32 K=16 on the built-in `patches` set with one budget for every
variant: the bank off, each bank source as auxiliary input, and the deep-feature sources
(long-term, lookahead) as a feature-matching target instead of an input. BP is the
reference row. Every (variant, seed) run is kept in docs/results/bank_ablation.json; the
table in docs/results/bank_ablation.{md,csv} aggregates all seeds there.

    python benchmarks/bank_ablation.py                    # seed 0: about 40 minutes on 2 CPU cores
    python benchmarks/bank_ablation.py --seeds 1,2        # more seeds, merged into the table
    python benchmarks/bank_ablation.py --seeds 0 train.epochs=1 data.per_class_train=20   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fba.bench.report import markdown_table, write_tables
from fba.bench.variants import runs_by_variant, train_variants

COMMON = ["model=resnet32", "K=16", "data.name=patches", "data.batch_size=128", "optim.lr=0.1",
          "train.epochs=8", "train.progress=false", "train.runs_dir=runs/bank_ablation"]
VARIANTS = {
    "bp (reference)": ["method=bp"],
    "bank off": ["method=fba", "fba.bank.source=none"],
    "in-pass input": ["method=fba", "fba.bank.source=inpass", "fba.bank.usage=input"],
    "long-term input": ["method=fba", "fba.bank.source=longterm", "fba.bank.usage=input"],
    "lookahead input": ["method=fba", "fba.bank.source=lookahead", "fba.bank.usage=input"],
    "long-term target": ["method=fba", "fba.bank.source=longterm", "fba.bank.usage=target"],
    "lookahead target": ["method=fba", "fba.bank.source=lookahead", "fba.bank.usage=target"],
}
COLUMNS = ["variant", "seeds", "top1_per_seed", "top1_mean", "seconds_per_epoch", "peak_memory_bytes", "bank_bytes"]
OUT = Path("docs/results")


def aggregate(runs: list[dict]) -> list[dict]:
    rows = []
    for name, mine in runs_by_variant(runs, VARIANTS):
        rows.append({
            "variant": name,
            "seeds": ",".join(str(r["seed"]) for r in mine),
            "top1_per_seed": " / ".join(f"{r['top1']:.3f}" for r in mine),
            "top1_mean": statistics.fmean(r["top1"] for r in mine),
            "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in mine),
            "peak_memory_bytes": mine[0]["peak_memory_bytes"],
            "bank_bytes": mine[0].get("bank_bytes"),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    chosen = {name: VARIANTS[name] for name in args.variants.split(",")}
    store = OUT / "bank_ablation.json"
    runs = json.loads(store.read_text()) if store.exists() else []
    for run in runs:
        run.setdefault("seed", 0)
    for seed in (int(s) for s in args.seeds.split(",")):
        new = train_variants(None, chosen, COMMON + [f"seed={seed}"] + args.overrides, log=lambda m: print(m, flush=True))
        for row in new:
            row["seed"] = seed
            runs = [r for r in runs if (r["variant"], r["seed"]) != (row["variant"], seed)] + [row]
            OUT.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(runs, indent=1, default=str))
    table = aggregate(runs)
    write_tables(table, COLUMNS, OUT, "bank_ablation")
    print(markdown_table(table, COLUMNS))


if __name__ == "__main__":
    main()
