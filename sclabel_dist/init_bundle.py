"""`sclabel init-bundle`: write a bundle with fresh, seeded weights and a given model's architecture, vocabulary and tokenisation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sclabel_dist.errors import SclabelError

EXAMPLES = """examples:
  sclabel init-bundle --like runs/export --out runs/scratch          (the exported model, untrained)
  sclabel init-bundle --config configs/pretrain/debug.yaml --vocab corpus/vocab.json --out runs/scratch
  sclabel evaluate --model runs/scratch --data x.h5ad --label-key cell_type   (fine-tuned from scratch)
  (or in one command: sclabel evaluate --model runs/export ... --arms pretrained,scratch)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sclabel init-bundle",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--like", help="a bundle (export or fine-tuned run) whose model to copy untrained")
    source.add_argument("--config", help="a pretraining YAML config (its model and tokenize sections)")
    p.add_argument("--vocab", help="vocabulary JSON for --config (e.g. a cell store's vocab.json)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the initialisation (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    if args.config and not args.vocab:
        raise SclabelError("--vocab is required with --config")
    if args.like and (args.vocab or overrides):
        raise SclabelError("--vocab and --section.key=value overrides go with --config, not --like")
    bad = [a for a in overrides if not (a.startswith("--") and "." in a.split("=")[0] and "=" in a)]
    if bad:
        raise SclabelError(f"unrecognised arguments {bad}; config overrides look like --model.flavour=small")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SclabelError(f"{out}: exists; pass --overwrite to replace it")

    from sclabel_dist.fresh import fresh_bundle_from_config, fresh_bundle_like

    if args.like:
        from sclabel_dist.annotate.classifier import resolve_bundle_dir
        from sclabel_dist.bundle import load_bundle

        written = fresh_bundle_like(load_bundle(resolve_bundle_dir(args.like)), out, seed=args.seed)
    else:
        written = fresh_bundle_from_config(
            Path(args.config), Path(args.vocab), out, seed=args.seed, overrides=overrides
        )
    print(f"wrote {written}: fresh weights (seed {args.seed}) with the model of {args.like or args.config}")
    return 0


if __name__ == "__main__":
    from sclabel_dist.cli import main as sclabel_main

    sys.exit(sclabel_main(["init-bundle", *sys.argv[1:]]))
