"""Feature-bank ablation for classification (issue: choose the default by measurement).

Trains FBA ResNet-32 K=16 on the built-in `patches` set with one budget for every
variant: the bank off, each bank source as auxiliary input, and the deep-feature sources
(long-term, lookahead) as a feature-matching target instead of an input. BP is the
reference row. Writes docs/results/bank_ablation.{md,csv,json}.

    python benchmarks/bank_ablation.py            # about 35 minutes on 2 CPU cores
    python benchmarks/bank_ablation.py train.epochs=2 data.per_class_train=100   # smoke run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fba.bench.report import markdown_table, write_tables
from fba.bench.variants import train_variants

COMMON = ["model=resnet32", "K=16", "data.name=patches", "data.batch_size=128", "optim.lr=0.1",
          "train.epochs=8", "seed=0", "train.progress=false", "train.runs_dir=runs/bank_ablation"]
VARIANTS = {
    "bp (reference)": ["method=bp"],
    "bank off": ["method=fba", "fba.bank.source=none"],
    "in-pass, input": ["method=fba", "fba.bank.source=inpass", "fba.bank.usage=input"],
    "long-term, input": ["method=fba", "fba.bank.source=longterm", "fba.bank.usage=input"],
    "lookahead, input": ["method=fba", "fba.bank.source=lookahead", "fba.bank.usage=input"],
    "long-term, target": ["method=fba", "fba.bank.source=longterm", "fba.bank.usage=target"],
    "lookahead, target": ["method=fba", "fba.bank.source=lookahead", "fba.bank.usage=target"],
}
COLUMNS = ["variant", "top1", "seconds_per_epoch", "peak_memory_bytes", "bank_bytes"]


def main(argv: list[str]) -> None:
    rows = train_variants(None, VARIANTS, COMMON + argv, log=lambda m: print(m, flush=True))
    out = Path("docs/results")
    write_tables(rows, COLUMNS, out, "bank_ablation")
    (out / "bank_ablation.json").write_text(json.dumps(rows, indent=1, default=str))
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main(sys.argv[1:])
