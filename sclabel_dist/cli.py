"""The `sclabel` command: export, convert-checkpoint, init-bundle, finetune, predict, embed, evaluate,
quickstart."""

from __future__ import annotations

from collections.abc import Sequence

from sclabel_dist.cli_common import dispatch

COMMANDS = {
    "export": ("sclabel_dist.export", "consolidate a DeepSpeed checkpoint into a shareable bundle"),
    "convert-checkpoint": (
        "sclabel_dist.universal",
        "convert a ZeRO checkpoint to DeepSpeed's universal format (resume on another world size)",
    ),
    "init-bundle": (
        "sclabel_dist.init_bundle",
        "write a fresh-weight bundle of a model (the from-scratch arm)",
    ),
    "finetune": ("sclabel_dist.finetune", "fine-tune a bundle on a labelled .h5ad"),
    "predict": (
        "sclabel_dist.predict",
        "annotate an .h5ad, cell store or SOMA experiment with a fine-tuned bundle",
    ),
    "embed": ("sclabel_dist.embed", "cell embeddings from a pretrained or fine-tuned bundle"),
    "evaluate": ("sclabel_dist.evaluate", "fine-tune and test against the logistic-regression baseline"),
    "quickstart": ("sclabel_dist.quickstart", "the whole loop on an embedded dataset, in minutes"),
}


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("sclabel", COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
