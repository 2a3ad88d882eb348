"""The learning-rate schedule of pretraining and fine-tuning: linear warmup, then cosine decay, on torch's LambdaLR."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warmup to 1, then cosine down to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _held(step: int, hold_steps: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """warmup_cosine, but 0 for the first `hold_steps` steps (the schedule's clock keeps running meanwhile)."""
    if step < hold_steps:
        return 0.0
    return warmup_cosine(step, warmup_steps, max_steps, min_lr_ratio)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float,
    hold_steps: Sequence[int] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup-cosine LambdaLR over each param group's own lr; step it once per optimizer step.

    hold_steps: per param group, a number of first steps at LR 0 (fine-tuning's LP-FT freezes the encoder
    while a fresh head learns to read it); None: no group is held.
    """
    if hold_steps is None:
        schedule = partial(
            warmup_cosine, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio
        )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if len(hold_steps) != len(optimizer.param_groups):
        raise ValueError(f"hold_steps has {len(hold_steps)} entries for {len(optimizer.param_groups)} groups")
    schedules = [
        partial(
            _held, hold_steps=h, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio
        )
        for h in hold_steps
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
