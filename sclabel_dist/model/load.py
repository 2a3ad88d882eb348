"""The one way to build ScLabelNet from saved weights (a bundle's, a pretrained encoder's, a fine-tuned classifier's)."""

from __future__ import annotations

from typing import Any

import torch

from sclabel_dist.errors import SclabelError

HEAD_PREFIX = "cls_head."


def build_from_weights(
    model_args: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    where: object,
    *,
    new_head: bool = False,
    **overrides: Any,
) -> torch.nn.Module:
    """ScLabelNet of `model_args` (`overrides` applied first, e.g. num_classes, dropout) holding `state_dict`.

    The classification head is left freshly initialised (under the caller's torch seed) when `new_head` is
    set or the class count changes: a saved head's classes are not the new model's. Any other weight that is
    missing or left over is a SclabelError naming `where`. Returned in train mode; callers set eval.
    """
    from sclabel_dist.model.args import ModelArgs
    from sclabel_dist.model.net import ScLabelNet

    args = ModelArgs.from_dict({**model_args, **overrides})
    new_head = new_head or args.num_classes != model_args.get("num_classes", 0)
    if new_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}
    model = ScLabelNet(args)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if new_head:
        missing = [k for k in missing if not k.startswith(HEAD_PREFIX)]
    if missing or unexpected:
        raise SclabelError(
            f"{where}: weights do not fit the model args: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
