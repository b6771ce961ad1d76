"""Super-resolution ablation: FBA against BP, the bank on and off, the tail copied or shared.

EDSR baseline x2 on the built-in `photos-sr`, every variant with the built-in run's budget
(24 epochs x 25 steps, batch 16, 32x32 LR patches, Adam 5e-4 with cosine decay, seed 0;
`fba train task=super_resolution` runs 30 such epochs), so the rows differ only by the
method options. "tail 64" is a full-width copy of the reconstruction tail in each SLM,
"tail 32" (the default, `fba.reduction=2`) a copy at half the width. The
validation PSNR/SSIM are on the Y channel of the three held-out photos (256x256 HR centre
crops), beside bicubic upscaling. Rows are kept in docs/results/sr_ablation.json as each
variant finishes; the table goes to docs/results/sr_ablation.{md,csv}.

    python benchmarks/sr_ablation.py                          # all variants: about 45 minutes on 2 CPU cores
    python benchmarks/sr_ablation.py --variants "bp,fba tail 32 (default)"
    python benchmarks/sr_ablation.py train.epochs=1 sr.patches_per_epoch=32   # smoke run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fba.bench.report import markdown_table, write_tables
from fba.bench.variants import train_variants

COMMON = ["task=super_resolution", "model=edsr_baseline", "sr.scale=2", "data.name=photos-sr", "train.epochs=24",
          "train.progress=false", "train.runs_dir=runs/sr_ablation"]
VARIANTS = {
    "bp": ["method=bp"],
    "fba tail 64": ["method=fba", "fba.reduction=1"],
    "fba tail 32 (default)": ["method=fba", "fba.reduction=2"],
    "fba bank off": ["method=fba", "fba.reduction=2", "fba.bank.source=none"],
    "fba shared tail": ["method=fba", "fba.reduction=2", "fba.share_head=true"],
}
COLUMNS = ["variant", "K", "psnr", "psnr_gap_to_bp", "ssim", "psnr_bicubic", "seconds_per_epoch", "peak_memory_bytes"]
OUT = Path("docs/results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated variant names (default: all): " + ", ".join(VARIANTS))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    store = OUT / "sr_ablation.json"
    runs = json.loads(store.read_text()) if store.exists() else []
    for name in args.variants.split(","):
        row = train_variants(None, {name: VARIANTS[name]}, COMMON + args.overrides, log=lambda m: print(m, flush=True))[0]
        runs = [r for r in runs if r["variant"] != name] + [row]
        OUT.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(runs, indent=1, default=str))
    runs.sort(key=lambda r: list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS else len(VARIANTS))
    bp = next((r["psnr"] for r in runs if r["variant"] == "bp"), None)
    for run in runs:
        run["psnr_gap_to_bp"] = (bp - run["psnr"]) if bp is not None else None
    write_tables(runs, COLUMNS, OUT, "sr_ablation")
    print(markdown_table(runs, COLUMNS))


if __name__ == "__main__":
    main()
