"""The export bundle: write, verify and read a model directory loadable with torch + safetensors alone.

    model.safetensors   weights under backend-neutral names (fp32)
    config.json         {"format", "version", "model_args", "tokenize", "vocab_hash", ...extra keys}
    vocab.json          the GeneVocab
    README.md           the model card
    SHA256SUMS          `sha256sum -c` compatible checksums of the four files above
No pickle anywhere: loading a bundle never runs code from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sclabel_dist.errors import SclabelError

BUNDLE_FORMAT = "sclabel-bundle"
BUNDLE_VERSION = 1
WEIGHTS, CONFIG, VOCAB, CARD, SUMS = (
    "model.safetensors",
    "config.json",
    "vocab.json",
    "README.md",
    "SHA256SUMS",
)
FILES = (WEIGHTS, CONFIG, VOCAB, CARD)


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
    def model_args(self):
        from sclabel_dist.model.args import ModelArgs

        return ModelArgs.from_dict(self.config["model_args"])

    def build_model(self, **overrides: Any) -> torch.nn.Module:
        """ScLabelNet with the bundle's weights (strict), in eval mode; `overrides` change model args first
        (e.g. num_classes for a new classification head, whose weights are then left freshly initialised)."""
        from sclabel_dist.model.args import ModelArgs
        from sclabel_dist.model.net import ScLabelNet

        args = ModelArgs.from_dict({**self.config["model_args"], **overrides})
        model = ScLabelNet(args)
        state = self.state_dict
        if args.num_classes != self.config["model_args"].get("num_classes", 0):
            state = {k: v for k, v in state.items() if not k.startswith("cls_head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in [*missing, *unexpected] if not k.startswith("cls_head.")]
        if bad:
            raise SclabelError(f"{self.path / WEIGHTS}: weights do not fit the model: {bad[:5]}")
        return model.eval()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        full = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "vocab_hash": vocab.hash, **config}
        (tmp / CONFIG).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        vocab.to_json(tmp / VOCAB)
        (tmp / CARD).write_text(card if card.endswith("\n") else card + "\n")
        sums = "".join(f"{sha256_file(tmp / name)}  {name}\n" for name in FILES)
        (tmp / SUMS).write_text(sums)
        # swap: the old bundle (if any) moves aside first, so `out` is never a half-written directory
        old = out.parent / f".{out.name}.old{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_checksums(path: Path) -> dict[str, str]:
    sums_file = path / SUMS
    if not sums_file.is_file():
        raise SclabelError(f"{path}: not a sclabel bundle (no {SUMS})")
    sums: dict[str, str] = {}
    for n, line in enumerate(sums_file.read_text().splitlines(), 1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise SclabelError(f"{sums_file}:{n}: malformed checksum line")
        sums[parts[1].lstrip("*")] = parts[0]
    return sums


def verify_bundle(path: str | Path) -> dict[str, str]:
    """Check that every bundle file is present and matches SHA256SUMS; returns the checksums."""
    path = Path(path)
    if not path.is_dir():
        raise SclabelError(f"{path}: bundle directory not found")
    sums = read_checksums(path)
    for name in FILES:
        file = path / name
        if name not in sums:
            raise SclabelError(f"{path / SUMS}: no checksum for {name}")
        if not file.is_file():
            raise SclabelError(f"{file}: missing from the bundle")
        if sha256_file(file) != sums[name]:
            raise SclabelError(f"{file}: checksum mismatch (corrupted or edited after export)")
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
    vocab = GeneVocab.from_json(path / VOCAB)
    if config.get("vocab_hash") and config["vocab_hash"] != vocab.hash:
        raise SclabelError(f"{path / VOCAB}: vocabulary hash differs from config.json's vocab_hash")
    try:
        state_dict = load_file(str(path / WEIGHTS), device=map_location)
    except (SafetensorError, OSError) as exc:
        raise SclabelError(f"{path / WEIGHTS}: unreadable safetensors file ({exc})") from None
    card = (path / CARD).read_text()
    return Bundle(path, state_dict, config, vocab, card, sums)
