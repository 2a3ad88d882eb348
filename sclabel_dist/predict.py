"""`sclabel predict`: annotate cells with a fine-tuned bundle (labels, confidence, top-k, embeddings).

Reads an .h5ad (backed), a cell store or a SOMA experiment in blocks; several processes split the cells:
`torchrun --nproc_per_node=N -m sclabel_dist.predict --model ... --data ... --out ...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sclabel_dist.annotate.genes import MIN_INPUT_GENES, WARN_INPUT_GENES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sclabel predict", description=__doc__)
    p.add_argument(
        "--model", required=True, help="fine-tuned bundle, or the run directory of `sclabel finetune`"
    )
    p.add_argument(
        "--data",
        required=True,
        help=".h5ad (read backed, in blocks), cell store or SOMA experiment to annotate (never modified)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="annotated .h5ad to write (a .csv beside it for small inputs, a .parquet table for large ones), "
        "or a .parquet table",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="confidence under which a cell is 'Unassigned' (default 0.5; 0 = always assign)",
    )
    p.add_argument(
        "--top-k", type=int, default=3, help="top labels with probabilities in the table (default 3)"
    )
    p.add_argument("--table", default=None, help="also write the columnar table here (.parquet)")
    p.add_argument(
        "--output",
        choices=("auto", "memory", "stream"),
        default="auto",
        help="memory: the annotated .h5ad built in memory + CSV (auto for inputs up to --memory-max-cells); "
        "stream: the input copied as it is with the results added, + a .parquet table (auto above)",
    )
    p.add_argument(
        "--memory-max-cells",
        type=int,
        default=200_000,
        help="largest input written in memory (default 200,000)",
    )
    add_input_flags(p)
    return p


def add_input_flags(p: argparse.ArgumentParser) -> None:
    """The flags predict and embed share: batching, blocks, layer, gene checks, device."""
    p.add_argument("--batch-size", type=int, default=64, help="cells per batch (results do not depend on it)")
    p.add_argument(
        "--block-size",
        type=int,
        default=8192,
        help="cells read per block: sets peak memory (results do not depend on it; default 8,192)",
    )
    p.add_argument(
        "--in-memory",
        action="store_true",
        help="read the .h5ad whole instead of in blocks (e.g. CSC-stored X)",
    )
    p.add_argument("--layer", default=None, help="layer to read instead of X")
    p.add_argument("--min-matched-genes", type=int, default=100, help="refuse data with fewer matching genes")
    p.add_argument(
        "--min-matched-fraction",
        type=float,
        default=0.5,
        help="refuse data whose matching genes carry less of the expression",
    )
    p.add_argument(
        "--warn-input-genes",
        type=float,
        default=WARN_INPUT_GENES,
        help="warn when the data holds less than this fraction of the classifier's input genes "
        f"(default {WARN_INPUT_GENES})",
    )
    p.add_argument(
        "--min-input-genes",
        type=float,
        default=MIN_INPUT_GENES,
        help="refuse data holding less than this fraction of the classifier's input genes "
        f"(default {MIN_INPUT_GENES})",
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda (this rank's GPU) when available, else cpu)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto (default): bf16 autocast on a GPU, exact fp32 on CPU; bf16 on a CPU with AMX or "
        "AVX512-BF16 runs about 2x faster (labels can differ on near-ties; slower on CPUs without them)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def honour_interrupts() -> None:
    """A job started with `&` by a non-interactive shell inherits SIGINT ignored, so an explicit interrupt was
    swallowed; predict runs long, so it takes SIGINT back (outputs go to temp names, removed on the way out)."""
    import signal
    import threading

    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    from sclabel_dist.annotate.runner import run_job

    args = build_parser().parse_args(argv)
    honour_interrupts()
    return run_job(job_from_args(args, "predict"))


def job_from_args(args: argparse.Namespace, command: str) -> Any:
    """The parsed flags as a typed Job (predict and embed share the flags they have in common)."""
    from sclabel_dist.annotate.runner import Job

    return Job(
        command=command,
        model=args.model,
        data=args.data,
        out=Path(args.out),
        layer=args.layer,
        threshold=getattr(args, "threshold", 0.5),
        batch_size=args.batch_size,
        block_size=args.block_size,
        top_k=getattr(args, "top_k", 3),
        min_matched_genes=args.min_matched_genes,
        min_matched_fraction=args.min_matched_fraction,
        warn_input_genes=args.warn_input_genes,
        min_input_genes=args.min_input_genes,
        device=args.device,
        precision=args.precision,
        overwrite=args.overwrite,
        in_memory=args.in_memory,
        table=Path(args.table) if getattr(args, "table", None) else None,
        output=getattr(args, "output", "auto"),
        memory_max_cells=getattr(args, "memory_max_cells", 200_000),
    )


if __name__ == "__main__":  # `python -m` / `accelerate launch -m`: same error handling as `sclabel predict`
    from sclabel_dist.cli import main as sclabel_main

    sys.exit(sclabel_main(["predict", *sys.argv[1:]]))
