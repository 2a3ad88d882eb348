"""The one LR schedule (sclabel_dist/optim.py) gives, step for step, the LRs of the two schedules it replaced."""

from __future__ import annotations

import math

import pytest
import torch

from sclabel_dist.optim import build_lr_scheduler


def _old_pretrain(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """distributed/ds_config.warmup_cosine before issue 17, verbatim."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _old_finetune(step: int, total: int, warmup: int) -> float:
    """annotate/trainer.lr_factor before issue 17, verbatim (it multiplied each group's 'peak_lr')."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> list[list[float]]:
    """The LR of every group at each optimizer step 0..steps-1, as the training loops use them."""
    optimizer = scheduler.optimizer
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(("warmup", "max_steps", "min_ratio"), [(10, 110, 0.1), (0, 50, 0.0), (3, 7, 0.25)])
def test_pretraining_lrs_equal_the_old_schedule(warmup: int, max_steps: int, min_ratio: float) -> None:
    lr = 3e-4
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    scheduler = build_lr_scheduler(
        optimizer, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=min_ratio
    )
    got = [g[0] for g in _lrs(scheduler, max_steps + 5)]
    assert got == [lr * _old_pretrain(s, warmup, max_steps, min_ratio) for s in range(max_steps + 5)]


def test_finetuning_lrs_equal_the_old_schedule_with_the_encoder_held() -> None:
    total, warmup, probe = 40, 4, 6
    groups = [
        {"name": "encoder", "params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-4},
        {"name": "head", "params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    scheduler = build_lr_scheduler(
        optimizer, warmup_steps=warmup, max_steps=total, min_lr_ratio=0.1, hold_steps=[probe, 0]
    )
    got = _lrs(scheduler, total + 3)
    for step, (enc, head) in enumerate(got):
        assert enc == (0.0 if step < probe else 1e-4 * _old_finetune(step, total, warmup))
        assert head == 1e-3 * _old_finetune(step, total, warmup)
    assert got[probe][0] > 0.0 and got[probe - 1][0] == 0.0
