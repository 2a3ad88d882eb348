"""Pure epoch plans: the global order of an epoch's row runs, each rank's equal share, and what remains on resume.

Vocabulary. A *unit* is a run of selected rows of one store: positions [start, stop) in that store's list of
selected rows (a chunk of `chunk_size` rows, or a shorter leftover run after an elastic resume). The epoch's
*global order* is a sequence of units (`shuffle.epoch_order`). A *segment* is a stretch of the epoch run at one
world size W: rank r takes units r, r + W, r + 2W, ... of the segment's units, reads them in *windows* of
`window_units` units (the shuffle buffer), and delivers each window's rows in a seeded permutation. All ranks
deliver exactly `num_batches` batches, so collective ops never hang.

Resume. After every rank has delivered c rows of a segment, the rows consumed are, per rank, the first c
positions of its stream: a pure function of (units, W, c, seeds). Resuming at the same W restarts each stream at
position c: the exact batches an uninterrupted run gives. Resuming at another W' turns what is left (the rest
of each rank's current window, every untouched unit, and the tails drop_last would have dropped) into the units
of a new segment split over W' ranks: nothing repeated, nothing skipped.

World-size-invariant order (data.elastic, `plan_slices`). The rank-local order above is fast (each rank reads
whole chunks) but after a world change each step sees other cells than the uninterrupted run. The
invariant order makes the epoch ONE global stream, independent of W: the units in windows of
`window_units`, each window's rows in a permutation drawn from (seed, epoch, window). Optimizer step s
consumes global positions [s*G, (s+1)*G) with G = cells per step (kept across world sizes); rank r takes
the slice [s*G + r*G/W, s*G + (r+1)*G/W), in micro-batches of G/(W*grad_accum). So the cells of a step are
the same set on any number of ranks, and with per-cell masks (keyed by global position) and a loss
normalised over the step (pretrain.py) so is the step's gradient. Resuming needs only the global position,
at any W. The cost: every rank reads a 1/W slice of every window's chunks (less I/O locality).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sclabel_dist.data import shuffle


@dataclass(frozen=True)
class Units:
    """Row runs: unit i is positions [start[i], stop[i]) of store[i]'s selected rows (int64 arrays)."""

    store: np.ndarray
    start: np.ndarray
    stop: np.ndarray

    def __len__(self) -> int:
        return len(self.store)

    @property
    def sizes(self) -> np.ndarray:
        return self.stop - self.start

    @property
    def num_rows(self) -> int:
        return int(self.sizes.sum())

    def take(self, idx: np.ndarray) -> Units:
        return Units(self.store[idx], self.start[idx], self.stop[idx])

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(store, position) of every row, units in order, each unit's positions ascending."""
        sizes = self.sizes
        total = int(sizes.sum())
        first = np.repeat(self.start - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
        return np.repeat(self.store, sizes), first + np.arange(total, dtype=np.int64)

    @staticmethod
    def concat(parts: Sequence[Units]) -> Units:
        return Units(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("store", "start", "stop")))

    @staticmethod
    def empty() -> Units:
        z = np.zeros(0, dtype=np.int64)
        return Units(z, z, z)


def make_chunks(num_rows: Sequence[int], chunk_size: int) -> Units:
    """Chunks of `chunk_size` consecutive selected rows, store after store (the last of each may be short)."""
    assert chunk_size > 0
    parts = []
    for s, n in enumerate(num_rows):
        start = np.arange(0, int(n), chunk_size, dtype=np.int64)
        parts.append(Units(np.full(len(start), s, np.int64), start, np.minimum(start + chunk_size, n)))
    return Units.concat(parts) if parts else Units.empty()


def epoch_units(
    chunks: Units, *, seed: int, epoch: int, weights: Sequence[float] | None = None, shuffle_: bool = True
) -> Units:
    """The epoch's global order of units: mixed by store weights, permuted from (seed, epoch) if shuffling."""
    per_store = np.bincount(chunks.store, minlength=int(chunks.store.max(initial=-1)) + 1)
    ids = shuffle.mix_chunks(per_store, weights, seed=seed, epoch=epoch)
    if shuffle_:
        ids = shuffle.epoch_order(ids, seed=seed, epoch=epoch)
    return chunks.take(ids)


@dataclass(frozen=True)
class RankPlan:
    """One rank's stream in one segment: its units, window boundaries and how many rows it delivers."""

    units: Units
    window_starts: np.ndarray  # int64 [num_windows + 1]: stream position where each window starts
    window_units: int
    num_samples: int
    num_batches: int

    @property
    def num_windows(self) -> int:
        return len(self.window_starts) - 1

    def window(self, w: int) -> Units:
        """The units of window w (read together, then permuted)."""
        lo = w * self.window_units
        return self.units.take(np.arange(lo, min(lo + self.window_units, len(self.units))))

    def window_of(self, position: int) -> int:
        """The window holding stream position `position`."""
        return int(np.searchsorted(self.window_starts, position, side="right")) - 1


def _rank_counts(units: Units, world: int) -> np.ndarray:
    """Rows each rank's round-robin share of the units holds."""
    owner = np.arange(len(units)) % world
    return np.bincount(owner, weights=units.sizes, minlength=world).astype(np.int64)


def plan_rank(
    units: Units, *, rank: int, world: int, batch_size: int, window_units: int, drop_last: bool = True
) -> RankPlan:
    """Rank `rank`'s share of a segment: units rank::world, delivering the same number of batches as every rank.

    drop_last: every rank delivers min_r(rows_r) // B full batches (the ragged tails, fewer than
    world * (chunk_size + batch_size) rows, wait for the next epoch). Otherwise every rank delivers all its
    rows in ceil(max_r(rows_r) / B) batches, its last ones short (possibly empty), still equal in number.
    """
    assert 0 <= rank < world and batch_size > 0 and window_units > 0
    counts = _rank_counts(units, world)
    mine = units.take(np.arange(rank, len(units), world))
    if drop_last:
        num_batches = int(counts.min()) // batch_size
        num_samples = num_batches * batch_size
    else:
        num_batches = -(-int(counts.max()) // batch_size)
        num_samples = int(counts[rank])
    sizes = mine.sizes
    win_rows = np.add.reduceat(sizes, np.arange(0, len(sizes), window_units)) if len(sizes) else sizes
    starts = np.concatenate([[0], np.cumsum(win_rows)]).astype(np.int64)
    return RankPlan(mine, starts, window_units, num_samples, num_batches)


def window_rows(
    plan: RankPlan | SlicePlan,
    w: int,
    *,
    seed: int,
    epoch: int,
    segment: int,
    rank: int,
    shuffle_: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(store, position) of window w's rows in delivery order (the shuffle buffer's permutation)."""
    if isinstance(plan, SlicePlan):
        return slice_rows(plan, w, seed=seed, epoch=epoch, shuffle_=shuffle_)
    store, pos = plan.window(w).rows()
    if shuffle_:
        perm = shuffle.window_permutation(
            len(pos), seed=seed, epoch=epoch, segment=segment, rank=rank, window=w
        )
        store, pos = store[perm], pos[perm]
    return store, pos


@dataclass(frozen=True)
class SlicePlan:
    """One rank's stream in the world-size-invariant order: its slice of every step of the global stream.

    The same interface as RankPlan for the loader (window_starts, window_of, num_samples, num_batches):
    window w of this rank = its positions inside global window w (possibly none)."""

    units: Units  # the epoch's units in global order
    global_starts: np.ndarray  # int64 [num_windows + 1]: global stream position where each window starts
    window_starts: np.ndarray  # int64 [num_windows + 1]: this rank's stream position at each window start
    window_units: int
    rank: int
    per_rank: int  # cells this rank takes per optimizer step (G / W)
    world: int
    num_samples: int
    num_batches: int

    @property
    def num_windows(self) -> int:
        return len(self.window_starts) - 1

    def window_of(self, position: int) -> int:
        """The window holding stream position `position` (empty windows are skipped over)."""
        return int(np.searchsorted(self.window_starts, position, side="right")) - 1

    def global_positions(self, lo: int, hi: int) -> np.ndarray:
        """Global stream positions of this rank's stream positions [lo, hi) (int64, ascending)."""
        c = np.arange(lo, hi, dtype=np.int64)
        step, off = np.divmod(c, self.per_rank)
        return step * (self.per_rank * self.world) + self.rank * self.per_rank + off


def _rank_positions_before(g: np.ndarray, *, rank: int, per_rank: int, world: int) -> np.ndarray:
    """How many of a rank's stream positions map to global positions below g."""
    full, rem = np.divmod(np.asarray(g, dtype=np.int64), per_rank * world)
    return full * per_rank + np.clip(rem - rank * per_rank, 0, per_rank)


def plan_slices(
    units: Units, *, rank: int, world: int, batch_size: int, grad_accum: int, window_units: int
) -> SlicePlan:
    """Rank `rank`'s slices of the epoch's global stream (module docstring): whole steps of
    G = batch_size * grad_accum * world cells only (the tail of fewer than G cells waits for no one: it is
    dropped, as drop_last does, and the next epoch's permutation shows those cells elsewhere)."""
    assert 0 <= rank < world and batch_size > 0 and grad_accum > 0 and window_units > 0
    per_rank = batch_size * grad_accum
    steps = units.num_rows // (per_rank * world)
    sizes = units.sizes
    win_rows = np.add.reduceat(sizes, np.arange(0, len(sizes), window_units)) if len(sizes) else sizes
    global_starts = np.concatenate([[0], np.cumsum(win_rows)]).astype(np.int64)
    num_samples = steps * per_rank
    local = np.minimum(
        _rank_positions_before(global_starts, rank=rank, per_rank=per_rank, world=world), num_samples
    )
    return SlicePlan(
        units, global_starts, local, window_units, rank, per_rank, world, num_samples, steps * grad_accum
    )


def slice_rows(
    plan: SlicePlan, w: int, *, seed: int, epoch: int, shuffle_: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(store, position) of this rank's rows of global window w, in its stream order."""
    lo = w * plan.window_units
    store, pos = plan.units.take(np.arange(lo, min(lo + plan.window_units, len(plan.units)))).rows()
    mine = plan.global_positions(int(plan.window_starts[w]), int(plan.window_starts[w + 1]))
    at = mine - plan.global_starts[w]
    if shuffle_:
        at = shuffle.step_window_permutation(len(pos), seed=seed, epoch=epoch, window=w)[at]
    return store[at], pos[at]


def _runs(store: np.ndarray, pos: np.ndarray) -> Units:
    """Sorted (store, position) pairs merged into maximal runs."""
    if len(pos) == 0:
        return Units.empty()
    order = np.lexsort((pos, store))
    store, pos = store[order], pos[order]
    breaks = np.flatnonzero((np.diff(store) != 0) | (np.diff(pos) != 1)) + 1
    first = np.concatenate([[0], breaks])
    last = np.concatenate([breaks, [len(pos)]])
    return Units(store[first], pos[first], pos[last - 1] + 1)


def remaining_units(
    units: Units,
    *,
    world: int,
    consumed: int,
    window_units: int,
    seed: int,
    epoch: int,
    segment: int,
    shuffle_: bool = True,
) -> Units:
    """The units left after every one of `world` ranks delivered `consumed` rows of this segment.

    Order: the leftovers of the ranks' current windows (merged into runs), then the untouched units in their
    global order. Rows past num_samples (drop_last tails) were never delivered, so they are left too.
    """
    leftovers_s, leftovers_p, untouched = [], [], []
    for rank in range(world):
        plan = plan_rank(
            units, rank=rank, world=world, batch_size=1, window_units=window_units, drop_last=False
        )
        own = np.arange(rank, len(units), world)
        if consumed >= int(plan.window_starts[-1]):
            continue
        w = plan.window_of(consumed)
        offset = consumed - int(plan.window_starts[w])
        if offset > 0:
            s, p = window_rows(plan, w, seed=seed, epoch=epoch, segment=segment, rank=rank, shuffle_=shuffle_)
            leftovers_s.append(s[offset:])
            leftovers_p.append(p[offset:])
            w += 1
        untouched.append(own[w * window_units :])
    left = _runs(
        np.concatenate(leftovers_s or [np.zeros(0, np.int64)]),
        np.concatenate(leftovers_p or [np.zeros(0, np.int64)]),
    )
    rest = units.take(np.sort(np.concatenate(untouched or [np.zeros(0, np.int64)])))
    return Units.concat([left, rest])


def segment_units(
    units: Units,
    history: Sequence[tuple[int, int]],
    *,
    window_units: int,
    seed: int,
    epoch: int,
    shuffle_: bool = True,
) -> Units:
    """The units of the current segment: the epoch's units minus what each past (world, samples) segment used."""
    for segment, (world, samples) in enumerate(history):
        assert samples % world == 0, "a segment's global samples are whole steps over its ranks"
        units = remaining_units(
            units,
            world=world,
            consumed=samples // world,
            window_units=window_units,
            seed=seed,
            epoch=epoch,
            segment=segment,
            shuffle_=shuffle_,
        )
    return units
