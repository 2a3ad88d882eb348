"""Random up-sampling of rare classes, applied to training indices only (after the split)."""

from __future__ import annotations

import numpy as np


def upsample_indices(
    train: np.ndarray, y: np.ndarray, *, seed: int, target: str = "max", cap: int = 1000
) -> np.ndarray:
    """Training indices with rare classes repeated (drawn with replacement) up to a target count per class.

    target: "max" = the largest class's count, or an integer string; `cap` bounds the target so a huge class
    does not blow up the epoch; classes already at or above the target keep their cells unchanged.
    Only `train` is read: validation and test cells can never be duplicated by this function.
    """
    rng = np.random.default_rng([seed, 2])
    labels = y[train]
    counts = np.bincount(labels[labels >= 0])
    goal = int(counts.max()) if target == "max" else int(target)
    goal = min(goal, cap) if cap > 0 else goal
    parts = [train]
    for k, n in enumerate(counts):
        if n == 0:
            continue
        if goal > n:
            members = train[labels == k]
            parts.append(rng.choice(members, size=goal - n, replace=True))
    return np.concatenate(parts)
