"""`sclabel predict`: annotate an `.h5ad` with a fine-tuned bundle (labels, confidence, embeddings, CSV)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sclabel_dist.annotate.genes import MIN_INPUT_GENES, WARN_INPUT_GENES
from sclabel_dist.errors import SclabelError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sclabel predict", description=__doc__)
    p.add_argument(
        "--model", required=True, help="fine-tuned bundle, or the run directory of `sclabel finetune`"
    )
    p.add_argument("--data", required=True, help=".h5ad to annotate (labels not needed; never modified)")
    p.add_argument("--out", required=True, help="annotated .h5ad to write (a .csv is written beside it)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="confidence under which a cell is 'Unassigned' (default 0.5; 0 = always assign)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="cells per batch (results do not depend on it)")
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
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


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
    import numpy as np
    import torch

    from sclabel_dist.annotate.classifier import load_classifier, resolve_bundle_dir
    from sclabel_dist.annotate.genes import (
        check_input_genes,
        classifier_input,
        genes_from_names,
        input_gene_coverage,
    )
    from sclabel_dist.annotate.h5ad import read_h5ad
    from sclabel_dist.annotate.inference import run_model, tokenize_config
    from sclabel_dist.annotate.output import assign_labels, check_output, write_annotated
    from sclabel_dist.annotate.prepare import check_value_kind, format_match_report, match_to_vocab
    from sclabel_dist.bundle import load_bundle

    args = build_parser().parse_args(argv)
    honour_interrupts()
    if not 0.0 <= args.threshold <= 1.0:
        raise SclabelError(f"--threshold {args.threshold}: must be between 0 and 1")
    if args.batch_size < 1:
        raise SclabelError(f"--batch-size {args.batch_size}: must be >= 1")
    if not 0.0 <= args.min_input_genes <= args.warn_input_genes <= 1.0:
        raise SclabelError(
            f"--min-input-genes {args.min_input_genes} and --warn-input-genes {args.warn_input_genes}: "
            "need 0 <= min <= warn <= 1"
        )
    t0 = time.perf_counter()
    out, data = Path(args.out), Path(args.data)
    check_output(out, data, args.overwrite)
    bundle = load_bundle(resolve_bundle_dir(args.model))
    classes = bundle.config.get("labels")
    if not classes:
        raise SclabelError(
            f"{bundle.path}: a pretrained bundle without labels; fine-tune it with `sclabel finetune`"
        )
    model = load_classifier(bundle.config["model_args"], bundle.state_dict)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)

    inp = read_h5ad(data, layer=args.layer)
    print(
        f"data: {inp.path} ({inp.X.shape[0]:,} cells x {inp.X.shape[1]:,} genes, {inp.value_kind}); "
        f"model: {bundle.path} ({len(classes)} classes)"
    )
    csr, report, present = match_to_vocab(
        inp, bundle.vocab, min_genes=args.min_matched_genes, min_fraction=args.min_matched_fraction
    )
    print(format_match_report(report))
    # the genes the classifier was fine-tuned on (None = all): anything else was never in its input
    genes = genes_from_names(bundle.vocab, bundle.config.get("input_genes"), str(bundle.path))
    coverage = None
    if genes is not None:
        # The vocabulary match above can look fine while the classifier's own genes are missing. A classifier
        # reading every gene (data.genes=all) has no such list: the vocabulary match is its check.
        coverage = input_gene_coverage(bundle.vocab, genes, present)
        print(
            check_input_genes(
                coverage,
                warn_below=args.warn_input_genes,
                refuse_below=args.min_input_genes,
                where=str(inp.path),
            )
        )
    print(check_value_kind(inp.X, inp.value_kind, bundle.config["tokenize"], str(inp.path)))
    csr = classifier_input(csr, inp.value_kind, genes)
    tok_cfg = tokenize_config(bundle.config["tokenize"])
    embedding, prob = run_model(model, csr, tok_cfg, "lognorm", batch_size=args.batch_size, device=device)
    label, confidence, top_label = assign_labels(prob, classes, args.threshold)
    uns = {
        "model": str(bundle.path),
        "threshold": args.threshold,
        "classes": list(classes),
        "gene_match": {k: v for k, v in report.items() if isinstance(v, int | float | str)},
    }
    if coverage is not None:
        uns["input_genes"] = coverage.to_dict()
    csv = write_annotated(
        inp.adata, out, label=label, confidence=confidence, top_label=top_label, embedding=embedding, uns=uns
    )
    values, counts = np.unique(label.astype(str), return_counts=True)
    summary = ", ".join(f"{v} {c}" for v, c in sorted(zip(values, counts, strict=True), key=lambda x: -x[1]))
    print(f"labels: {summary}")
    print(
        f"wrote {out} (obs sclabel_label / sclabel_confidence, obsm X_sclabel) and {csv} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":  # `python -m` / `accelerate launch -m`: same error handling as `sclabel predict`
    from sclabel_dist.cli import main as sclabel_main

    sys.exit(sclabel_main(["predict", *sys.argv[1:]]))
