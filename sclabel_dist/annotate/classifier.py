"""Build a classifier from a pretrained bundle: ScLabelNet with a class head, weights loaded, layers frozen by mode."""

from __future__ import annotations

import re
from typing import Any

import torch

from sclabel_dist.errors import SclabelError
from sclabel_dist.model.load import HEAD_PREFIX, build_from_weights

# Not on the classification path (MLM and MVC heads, masked-value vector): never trained here, and DDP requires
# every trainable parameter to get a gradient.
UNUSED = ("mlm_head.", "mask_embed", "mvc_query.", "mvc_head.", "contrast_head.")


def parse_train_mode(mode: str, depth: int) -> int:
    """Number of trainable encoder blocks: 'full' = all, 'frozen' = 0, 'top:N' = N (1 <= N <= depth)."""
    if mode == "full":
        return depth
    if mode == "frozen":
        return 0
    m = re.fullmatch(r"top:(\d+)", mode)
    if not m or not 1 <= int(m.group(1)) <= depth:
        raise SclabelError(f"train mode {mode!r}: use 'full', 'frozen' or 'top:N' with 1 <= N <= {depth}")
    return int(m.group(1))


def build_classifier(
    model_args: dict, state_dict: dict[str, torch.Tensor], num_classes: int, seed: int, dropout: float = 0.0
) -> Any:
    """ScLabelNet(num_classes, dropout) with the pretrained encoder weights; the head is always new.

    A pretrained model's own head (from an earlier fine-tune) is dropped: its classes are not ours.
    """
    torch.manual_seed(seed)  # the new head's init is part of the run's seed
    return build_from_weights(
        model_args, state_dict, "bundle", new_head=True, num_classes=num_classes, dropout=dropout
    )


def load_classifier(model_args: dict, state_dict: dict[str, torch.Tensor]) -> Any:
    """A fine-tuned ScLabelNet exactly as saved (head included), in eval mode."""
    if not model_args.get("num_classes", 0):
        raise SclabelError(
            "this bundle has no classification head: fine-tune it first with `sclabel finetune`"
        )
    return build_from_weights(model_args, state_dict, "bundle").eval()


def set_trainable(model: Any, mode: str) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Freeze by mode; return (encoder parameters left trainable, head parameters).

    'top:N' trains the last N blocks and the final norm (the cell embedding is the normed CLS output);
    the MLM head and mask vector are never trained here, since fine-tuning has no MLM loss.
    """
    n = parse_train_mode(mode, len(model.blocks))
    first = len(model.blocks) - n
    encoder, head = [], []
    for name, p in model.named_parameters():
        if name.startswith(HEAD_PREFIX):
            head.append(p)
            continue
        trainable = False
        if mode == "full":
            trainable = not name.startswith(UNUSED)
        elif n > 0:
            m = re.match(r"blocks\.(\d+)\.", name)
            trainable = (m is not None and int(m.group(1)) >= first) or name.startswith("norm.")
        p.requires_grad_(trainable)
        if trainable:
            encoder.append(p)
    return encoder, head


def resolve_bundle_dir(path: str) -> Any:
    """A bundle directory from `path`: the path itself, or RUN_DIR/model as `sclabel finetune` writes it."""
    from pathlib import Path

    from sclabel_dist.checksums import SUMS

    p = Path(path)
    if not (p / SUMS).is_file() and (p / "model" / SUMS).is_file():
        return p / "model"
    return p
