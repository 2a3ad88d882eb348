"""Fresh-weight bundles: a model's architecture, vocabulary and tokenisation with new, seeded weights.

The from-scratch arm of "does pretraining help on my data?": the same network fine-tuned from a random start.
Built from a bundle (its model, vocabulary and tokenisation) or from a pretraining config and a vocabulary
(what pretraining would start from). Used by `sclabel init-bundle`, `sclabel evaluate --arms` and the
annotation benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sclabel_dist.errors import SclabelError

FRESH_CARD = """# ScLabel-Net, freshly initialised (no pretraining)

- architecture, vocabulary and tokenisation of: {source}
- weights: random initialisation, torch seed {seed}

A from-scratch baseline: fine-tune it as a pretrained bundle (`sclabel finetune --model THIS_DIR ...`) to see
what pretraining adds.
"""


def write_fresh_bundle(
    model_args: dict[str, Any], tokenize: dict[str, Any], vocab: Any, out: Path, *, seed: int, source: str
) -> Path:
    """Write a bundle of ScLabelNet(model_args) initialised under `torch.manual_seed(seed)`.

    A pretrained-shaped bundle: no classification head, labels or input genes (a fine-tuned source's are
    dropped), so it fine-tunes exactly as a pretrained export does.
    """
    import torch

    from sclabel_dist.bundle import save_bundle
    from sclabel_dist.model.args import ModelArgs
    from sclabel_dist.model.net import ScLabelNet

    args = ModelArgs.from_dict({**model_args, "num_classes": 0})
    # The benchmark's from-scratch arm has always been seeded this way; keep it, so figures stay comparable.
    torch.manual_seed(seed)
    model = ScLabelNet(args)
    config = {"model_args": args.to_dict(), "tokenize": tokenize, "init": {"seed": seed, "like": source}}
    return save_bundle(out, model.state_dict(), config, vocab, FRESH_CARD.format(source=source, seed=seed))


def fresh_bundle_like(bundle: Any, out: Path, *, seed: int) -> Path:
    """A fresh-weight copy of a loaded bundle's model, vocabulary and tokenisation."""
    return write_fresh_bundle(
        bundle.config["model_args"],
        bundle.config["tokenize"],
        bundle.vocab,
        out,
        seed=seed,
        source=str(bundle.path),
    )


def fresh_bundle_from_config(
    config: Path, vocab_path: Path, out: Path, *, seed: int, overrides: list[str] | None = None
) -> Path:
    """The model a pretraining config would start from (its model and tokenize sections) over a vocabulary."""
    from sclabel_dist.config import PretrainConfig, load_config, to_dict
    from sclabel_dist.model.args import build_model_args
    from sclabel_dist.vocab import NUM_SPECIAL, GeneVocab

    if not Path(config).is_file():
        raise SclabelError(f"{config}: no such config file")
    cfg = load_config(PretrainConfig, config, overrides or [])
    vocab = GeneVocab.from_json(vocab_path)
    args = build_model_args(cfg.model, cfg.tokenize, vocab_size=vocab.num_genes + NUM_SPECIAL)
    return write_fresh_bundle(
        args.to_dict(), to_dict(cfg.tokenize), vocab, out, seed=seed, source=str(config)
    )
