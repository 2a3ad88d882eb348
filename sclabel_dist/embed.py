"""`sclabel embed`: cell embeddings from a pretrained or fine-tuned bundle (for neighbours, UMAP, clustering).

Reads an .h5ad (backed), a cell store or a SOMA experiment in blocks and writes obsm["X_sclabel"] into a copy
of the .h5ad, or a .parquet table (cell, embedding). Several processes split the cells:
`torchrun --nproc_per_node=N -m sclabel_dist.embed --model ... --data ... --out ...`.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from sclabel_dist.predict import add_input_flags

    p = argparse.ArgumentParser(prog="sclabel embed", description=__doc__)
    p.add_argument(
        "--model", required=True, help="bundle (pretrained or fine-tuned), or a finetune run directory"
    )
    p.add_argument("--data", required=True, help=".h5ad, cell store or SOMA experiment (never modified)")
    p.add_argument(
        "--out",
        required=True,
        help="an .h5ad (a copy of the input with obsm['X_sclabel']) or a .parquet table (cell, embedding)",
    )
    add_input_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from sclabel_dist.annotate.runner import run_job
    from sclabel_dist.predict import honour_interrupts, job_from_args

    args = build_parser().parse_args(argv)
    honour_interrupts()
    return run_job(job_from_args(args, "embed"))


if __name__ == "__main__":  # `torchrun -m sclabel_dist.embed`: same error handling as `sclabel embed`
    from sclabel_dist.cli import main as sclabel_main

    sys.exit(sclabel_main(["embed", *sys.argv[1:]]))
