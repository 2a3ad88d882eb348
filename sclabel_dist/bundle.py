"""The export bundle: write, verify and read a model directory loadable with torch + safetensors alone.

    model.safetensors   weights under backend-neutral names (fp32)
    config.json         {"format", "version", "model_args", "tokenize", "vocab_hash", ...extra keys}
    vocab.json          the GeneVocab
    README.md           the model card
    SHA256SUMS          `sha256sum -c` compatible checksums of the four files above
No pickle anywhere: loading a bundle never runs code from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sclabel_dist.atomic import replaced_on_success
from sclabel_dist.checksums import SUMS, format_sums, mismatched, read_sums, sha256_file
from sclabel_dist.errors import SclabelError

BUNDLE_FORMAT = "sclabel-bundle"
BUNDLE_VERSION = 1
WEIGHTS, CONFIG, VOCAB, CARD = ("model.safetensors", "config.json", "vocab.json", "README.md")
FILES = (WEIGHTS, CONFIG, VOCAB, CARD)

if TYPE_CHECKING:
    from sclabel_dist.config import TokenizeConfig
    from sclabel_dist.model.args import ModelArgs


def tokenize_config(raw: dict) -> TokenizeConfig:
    """A bundle's tokenisation settings as a TokenizeConfig (strict: unknown keys are an error)."""
    from sclabel_dist.config import TokenizeConfig, from_dict

    # a bundle from before the gene bag existed has no such key, and its model reads no bag
    return from_dict(TokenizeConfig, {"gene_bag": False, **raw}, where="bundle config.json tokenize")


@dataclass
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    vocab: Any  # GeneVocab
    card: str = ""
    checksums: dict[str, str] = field(default_factory=dict)

    @property
    def model_args(self) -> ModelArgs:
        from sclabel_dist.model.args import ModelArgs

        return ModelArgs.from_dict(self.config["model_args"])

    @property
    def tokenize(self) -> TokenizeConfig:
        """How this model's cells are tokenised, as saved at export or fine-tuning (a fresh copy each call)."""
        return tokenize_config(self.config["tokenize"])

    @property
    def labels(self) -> list[str] | None:
        """The class names of a fine-tuned classifier (index = class id); None for a pretrained export."""
        labels = self.config.get("labels")
        return None if labels is None else [str(c) for c in labels]

    @property
    def input_genes(self) -> list[str] | None:
        """The genes the classifier reads, by name (None: every vocabulary gene)."""
        genes = self.config.get("input_genes")
        return None if genes is None else [str(g) for g in genes]

    @property
    def value_kind(self) -> str | None:
        """The value kind the classifier was fine-tuned on ('counts' / 'lognorm'); None if not fine-tuned."""
        return self.config.get("finetune", {}).get("value_kind")

    def classifier(self) -> torch.nn.Module:
        """The fine-tuned classifier exactly as saved (head included), in eval mode."""
        from sclabel_dist.annotate.classifier import load_classifier

        return load_classifier(self.config["model_args"], self.state_dict)

    def build_model(self, **overrides: Any) -> torch.nn.Module:
        """ScLabelNet with the bundle's weights (strict), in eval mode; `overrides` change model args first
        (e.g. num_classes for a new classification head, whose weights are then left freshly initialised)."""
        from sclabel_dist.model.load import build_from_weights

        return build_from_weights(
            self.config["model_args"], self.state_dict, self.path / WEIGHTS, **overrides
        ).eval()


def save_bundle(
    out_dir: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any], vocab: Any, card: str
) -> Path:
    """Write a bundle into a temp directory beside `out_dir`, then rename it into place.

    `config` must hold "model_args" (ModelArgs.to_dict()) and "tokenize" (the tokenize config section); any
    other keys (e.g. "labels" of a fine-tuned model) are kept. An existing `out_dir` is replaced only if it is
    empty or itself a bundle, never a directory holding other things.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    for key in ("model_args", "tokenize"):
        if key not in config:
            raise SclabelError(f"bundle config for {out}: missing key {key!r}")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / SUMS).is_file())):
        raise SclabelError(f"{out}: exists and is not a bundle; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # an old bundle moves aside first, so `out` is never a half-written directory
    with replaced_on_success(out) as tmp:
        tmp.mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        full = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "vocab_hash": vocab.hash, **config}
        (tmp / CONFIG).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        vocab.to_json(tmp / VOCAB)
        (tmp / CARD).write_text(card if card.endswith("\n") else card + "\n")
        (tmp / SUMS).write_text(format_sums({name: sha256_file(tmp / name) for name in FILES}))
    return out


def verify_bundle(path: str | Path) -> dict[str, str]:
    """Check that every bundle file is present and matches SHA256SUMS; returns the checksums."""
    path = Path(path)
    if not path.is_dir():
        raise SclabelError(f"{path}: bundle directory not found")
    sums = read_sums(path)
    for name in FILES:
        if name not in sums:
            raise SclabelError(f"{path / SUMS}: no checksum for {name}")
    problems = mismatched(path, sums, list(FILES), why="corrupted or edited after export")
    if problems:
        raise SclabelError(problems[0])
    return sums


def load_bundle(path: str | Path, map_location: str = "cpu") -> Bundle:
    """Verify and load a bundle; anything that is not one raises SclabelError naming the offending file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sclabel_dist.vocab import GeneVocab

    path = Path(path)
    sums = verify_bundle(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SclabelError(f"{path / CONFIG}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise SclabelError(f"{path / CONFIG}: not a sclabel bundle config (format != {BUNDLE_FORMAT!r})")
    if config.get("version", 0) > BUNDLE_VERSION:
        raise SclabelError(
            f"{path / CONFIG}: bundle version {config['version']} is newer than this sclabel-dist"
        )
    vocab = GeneVocab.from_json(path / VOCAB, config.get("vocab_hash"), path / CONFIG)
    try:
        state_dict = load_file(str(path / WEIGHTS), device=map_location)
    except (SafetensorError, OSError) as exc:
        raise SclabelError(f"{path / WEIGHTS}: unreadable safetensors file ({exc})") from None
    card = (path / CARD).read_text()
    return Bundle(path, state_dict, config, vocab, card, sums)
