"""Pure seeded randomness of the loader: epoch chunk order, store mixing, validation chunks, window shuffles.

Every function takes its seeds explicitly and derives a numpy Generator from a tuple of integers, so the same
arguments give the same arrays on every rank, every process and every resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Stream tags keep the random streams of different purposes independent for the same (seed, epoch).
_ORDER, _MIX, _VAL, _WINDOW, _TOKENS, _STEP_WINDOW, _CELL_TOKENS = 1, 2, 3, 4, 5, 6, 7


def rng_for(*keys: int) -> np.random.Generator:
    """A Generator seeded by a tuple of non-negative integers (SeedSequence entropy: no collisions by sum)."""
    return np.random.default_rng([int(k) for k in keys])


def token_rng(seed: int, epoch: int, segment: int, rank: int, batch: int) -> np.random.Generator:
    """The Generator for gene subsets and masks of one batch: a function of its place in the run only."""
    return rng_for(seed, _TOKENS, epoch, segment, rank, batch)


def cell_token_rng(seed: int, epoch: int) -> np.random.Generator:
    """The Generator whose two seeds, with each cell's epoch position as key, draw its gene subset and mask
    in the world-size-invariant order: the same for a cell on any rank, in any batch."""
    return rng_for(seed, _CELL_TOKENS, epoch)


def mix_chunks(
    num_chunks: Sequence[int], weights: Sequence[float] | None, *, seed: int, epoch: int
) -> np.ndarray:
    """Global chunk ids (chunks numbered store after store) drawn for one epoch, before the permutation.

    No weights: every chunk once. With weights, store s contributes round(w_s / sum(w) * total) chunks: whole
    passes over its chunks, then a seeded subset for the fraction, so an up-weighted store repeats cells
    within an epoch and a down-weighted one shows a different part of itself each epoch.
    """
    counts = np.asarray(num_chunks, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    if not weights:
        return np.arange(offsets[-1], dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    assert len(w) == len(counts) and (w >= 0).all() and w.sum() > 0
    targets = np.rint(w / w.sum() * counts.sum()).astype(np.int64)
    parts = []
    for s, (n, k) in enumerate(zip(counts, targets, strict=True)):
        if n == 0 or k == 0:
            continue
        rng = rng_for(seed, _MIX, epoch, s)
        full, frac = divmod(int(k), int(n))
        ids = [np.arange(n)] * full + [np.sort(rng.choice(n, size=frac, replace=False))]
        parts.append(offsets[s] + np.concatenate(ids))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def epoch_order(chunk_ids: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """The epoch's chunk ids in a permutation drawn from (seed, epoch): a new order every epoch."""
    return chunk_ids[rng_for(seed, _ORDER, epoch).permutation(len(chunk_ids))]


def val_chunks(num_chunks: int, fraction: float, *, seed: int, store: int) -> np.ndarray:
    """Bool [num_chunks]: the chunks held out for validation, round(fraction * n) of them, fixed by the seed."""
    k = int(round(fraction * num_chunks))
    out = np.zeros(num_chunks, dtype=bool)
    out[rng_for(seed, _VAL, store).choice(num_chunks, size=k, replace=False)] = True
    return out


def window_permutation(
    size: int, *, seed: int, epoch: int, segment: int, rank: int, window: int
) -> np.ndarray:
    """The shuffle-buffer order of one window: stream position q of the window delivers window row perm[q]."""
    return rng_for(seed, _WINDOW, epoch, segment, rank, window).permutation(size)


def step_window_permutation(size: int, *, seed: int, epoch: int, window: int) -> np.ndarray:
    """The order of one window of the world-size-invariant stream (no rank, no segment: the same for any W)."""
    return rng_for(seed, _STEP_WINDOW, epoch, window).permutation(size)
