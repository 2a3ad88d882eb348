"""Exhaustive checks of the pure partition / shuffle functions: disjoint, covering, equal, resumable."""

from __future__ import annotations

import numpy as np
import pytest

from sclabel_dist.data import partition, shuffle

SIZES = [37, 5, 103, 1]  # uneven stores, one smaller than a chunk
CHUNK, WINDOW, BATCH = 4, 3, 3


def ids(store: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return store * 1_000_000 + pos


def all_ids(sizes=SIZES) -> np.ndarray:
    return np.concatenate([s * 1_000_000 + np.arange(n) for s, n in enumerate(sizes)])


def stream(units, rank, world, *, epoch=0, segment=0, drop_last=True, batch=BATCH):
    """Every row rank `rank` delivers in a segment, in order (what the dataset reads)."""
    plan = partition.plan_rank(
        units, rank=rank, world=world, batch_size=batch, window_units=WINDOW, drop_last=drop_last
    )
    out = [
        ids(*partition.window_rows(plan, w, seed=7, epoch=epoch, segment=segment, rank=rank))
        for w in range(plan.num_windows)
    ]
    rows = np.concatenate(out) if out else np.zeros(0, np.int64)
    return plan, rows[: plan.num_samples]


def epoch_units(epoch=0, weights=None):
    return partition.epoch_units(partition.make_chunks(SIZES, CHUNK), seed=7, epoch=epoch, weights=weights)


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_disjoint_equal_and_covering(world, drop_last):
    units = epoch_units()
    plans, streams = zip(*(stream(units, r, world, drop_last=drop_last) for r in range(world)), strict=True)
    assert len({p.num_batches for p in plans}) == 1  # equal batch counts: no collective hang
    got = np.concatenate(streams)
    assert len(np.unique(got)) == len(got)  # no cell on two ranks (or twice on one)
    assert set(got) <= set(all_ids())
    if drop_last:
        assert all(p.num_samples == p.num_batches * BATCH for p in plans)
        assert len(all_ids()) - len(got) < world * (CHUNK + BATCH)
    else:
        assert sorted(got) == sorted(all_ids())


@pytest.mark.parametrize("world", [1, 3, 8])
def test_epoch_orders_differ_and_are_reproducible(world):
    a = [stream(epoch_units(0), r, world)[1] for r in range(world)]
    b = [stream(epoch_units(1), r, world, epoch=1)[1] for r in range(world)]
    again = [stream(epoch_units(0), r, world)[1] for r in range(world)]
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))


def test_window_shuffle_mixes_chunks():
    _, rows = stream(epoch_units(), 0, 1)
    # Consecutive deliveries come from different chunks far more often than a chunk-ordered stream would.
    stores, pos = rows // 1_000_000, rows % 1_000_000
    same_chunk = (stores[1:] == stores[:-1]) & (pos[1:] // CHUNK == pos[:-1] // CHUNK)
    assert same_chunk.mean() < 0.6


@pytest.mark.parametrize("old,new", [(w, v) for w in range(1, 9) for v in range(1, 9) if w != v])
@pytest.mark.parametrize("steps", [0, 1, 5])
def test_elastic_remaining_is_exactly_the_rest(old, new, steps):
    units = epoch_units()
    consumed = []
    for r in range(old):
        plan, rows = stream(units, r, old)
        consumed.append(rows[: min(steps, plan.num_batches) * BATCH])
    done = min(steps, stream(units, 0, old)[0].num_batches) * BATCH
    left = partition.remaining_units(
        units, world=old, consumed=done, window_units=WINDOW, seed=7, epoch=0, segment=0
    )
    left_ids = ids(*left.rows())
    used = np.concatenate(consumed)
    assert len(np.intersect1d(used, left_ids)) == 0  # nothing repeated
    assert sorted(np.concatenate([used, left_ids])) == sorted(all_ids())  # nothing skipped
    # The new world's segment delivers from what is left only, equal batches on every rank.
    plans, streams = zip(*(stream(left, r, new, segment=1, drop_last=False) for r in range(new)), strict=True)
    assert len({p.num_batches for p in plans}) == 1
    assert sorted(np.concatenate(streams)) == sorted(left_ids)


def test_segment_chain_two_changes():
    units = epoch_units()
    hist = [(2, 2 * 2 * BATCH), (5, 5 * 1 * BATCH)]
    seg = partition.segment_units(units, hist, window_units=WINDOW, seed=7, epoch=0)
    used = []
    cur = units
    for i, (w, s) in enumerate(hist):
        for r in range(w):
            used.append(stream(cur, r, w, segment=i, drop_last=False)[1][: s // w])
        cur = partition.remaining_units(
            cur, world=w, consumed=s // w, window_units=WINDOW, seed=7, epoch=0, segment=i
        )
    used = np.concatenate(used)
    assert sorted(np.concatenate([used, ids(*seg.rows())])) == sorted(all_ids())


def test_weights_mix_stores():
    units = epoch_units(weights=[0.0, 0.0, 1.0, 1.0])
    counts = np.bincount(units.store, minlength=4)
    assert counts[0] == 0 and counts[1] == 0
    total_chunks = len(partition.make_chunks(SIZES, CHUNK))
    assert counts[3] == round(total_chunks / 2)  # a one-row store up-weighted: repeated
    assert counts[2] == round(total_chunks / 2)
    # A down-weighted store shows different chunks in different epochs.
    a = epoch_units(0, weights=[1.0, 0.0, 0.1, 0.0]).start
    b = epoch_units(1, weights=[1.0, 0.0, 0.1, 0.0]).start
    assert not np.array_equal(np.sort(a), np.sort(b)) or len(a) == 0


def test_val_chunks_fraction_and_seed():
    m = shuffle.val_chunks(100, 0.1, seed=3, store=0)
    assert m.sum() == 10
    assert np.array_equal(m, shuffle.val_chunks(100, 0.1, seed=3, store=0))
    assert not np.array_equal(m, shuffle.val_chunks(100, 0.1, seed=4, store=0))


def test_make_chunks_cover_each_store():
    ch = partition.make_chunks(SIZES, CHUNK)
    for s, n in enumerate(SIZES):
        sel = ch.store == s
        assert ch.sizes[sel].sum() == n and ch.sizes[sel].max() <= CHUNK


def slices(units, world, batch, accum):
    """The world-size-invariant order: each step's rows as the ranks deliver them, ranks in order."""
    per_rank = []
    for rank in range(world):
        plan = partition.plan_slices(
            units, rank=rank, world=world, batch_size=batch, grad_accum=accum, window_units=WINDOW
        )
        rows = [
            ids(*partition.window_rows(plan, w, seed=7, epoch=0, segment=0, rank=rank))
            for w in range(plan.num_windows)
        ]
        rows = np.concatenate(rows)
        assert len(rows) == plan.num_samples and plan.num_batches * batch == plan.num_samples
        per_rank.append(rows.reshape(-1, batch * accum))
    return np.concatenate(per_rank, axis=1)  # [steps, G]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8])
def test_invariant_order_gives_every_step_the_same_cells_on_any_world_size(world):
    """G = 24 cells per step as 1 x 24, or world x (24 / world) split into micro-batches: the same rows in
    the same places, every cell of the epoch at most once, only the tail of fewer than G cells left out."""
    units = epoch_units()
    reference = slices(units, 1, 24, 1)
    for accum in (1, 2, 3):
        if (24 // world) % accum == 0:
            np.testing.assert_array_equal(slices(units, world, 24 // world // accum, accum), reference)
    flat = reference.ravel()
    assert len(np.unique(flat)) == len(flat) and len(flat) == units.num_rows // 24 * 24
    assert len(flat) > 24 * 5  # several steps, windows crossed (WINDOW chunks of CHUNK rows = 12 < 24)


def test_invariant_order_positions_map_to_the_global_stream():
    plan = partition.plan_slices(
        epoch_units(), rank=1, world=3, batch_size=2, grad_accum=2, window_units=WINDOW
    )
    # rank 1 of 3, 4 cells per step: global positions 4..7, then 16..19, ...
    np.testing.assert_array_equal(plan.global_positions(0, 6), [4, 5, 6, 7, 16, 17])
    assert plan.num_samples == epoch_units().num_rows // 12 * 4
