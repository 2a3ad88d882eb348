"""The streaming dataset end to end: coverage, exact resume, elastic resume, splits, filters, mixing, SOMA."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sclabel_dist.config import DataConfig, TokenizeConfig
from sclabel_dist.data.dataset import build_dataset
from sclabel_dist.errors import SclabelError

TOK = TokenizeConfig(max_len=16, num_bins=8, mask_ratio=0.2)


def dcfg(stores, **kw) -> DataConfig:
    base = {"batch_size": 16, "chunk_size": 8, "shuffle_chunks": 4, "read_threads": 2, "read_ahead": 2}
    return DataConfig(stores=[str(s) for s in stores], **{**base, **kw})


def take_epoch(ds) -> list:
    """The batches of the dataset's current epoch (stops before the first batch of the next one)."""
    out, epoch = [], ds.epoch
    for b in ds:
        if ds.epoch != epoch:
            break
        out.append(b)
    return out


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("gene_ids", "values", "masked", "targets"))


def test_raw_epoch_covers_every_cell_once(store_a):
    path, m = store_a
    ds = build_dataset(dcfg([path], drop_last=False), TOK, rank=0, world_size=1, seed=1, raw=True)
    blocks = take_epoch(ds)
    ids = np.concatenate([b.ids for b in blocks])
    assert sorted(ids) == list(range(470))
    b = blocks[0]
    np.testing.assert_array_equal(b.to_scipy().toarray(), m[b.ids].toarray())
    ds.close()


def test_resume_mid_epoch_gives_identical_batches(store_a):
    path, _ = store_a
    data = dcfg([path])
    ds = build_dataset(data, TOK, rank=1, world_size=2, seed=3)
    per_epoch = ds.num_batches_per_epoch
    it = iter(ds)
    for _ in range(per_epoch - 3):
        next(it)
    state = ds.state_dict()
    assert state["samples_seen"] == (per_epoch - 3) * 16 * 2 and state["epoch"] == 0
    expected = list(itertools.islice(it, 8))  # crosses into epoch 1
    assert ds.epoch == 1
    ds.close()
    again = build_dataset(data, TOK, rank=1, world_size=2, seed=99)  # the state's seed wins
    again.load_state_dict(state)
    got = list(itertools.islice(iter(again), 8))
    assert all(same(a, b) for a, b in zip(expected, got, strict=True))
    again.close()


@pytest.mark.parametrize("drop_last", [False, True])
def test_elastic_resume_two_to_three_ranks(store_a, drop_last):
    path, _ = store_a
    data = dcfg([path], drop_last=drop_last)
    olds = [build_dataset(data, TOK, rank=r, world_size=2, seed=5, raw=True) for r in range(2)]
    its = [iter(d) for d in olds]
    seen = [next(it).ids for _ in range(5) for it in its]
    state = olds[0].state_dict()
    assert state == olds[1].state_dict()
    news = [build_dataset(data, TOK, rank=r, world_size=3, seed=5, raw=True) for r in range(3)]
    for d in news:
        d.load_state_dict(state)
    rest = [take_epoch(d) for d in news]
    assert len({len(r) for r in rest}) == 1  # equal batches on the new ranks
    ids = np.concatenate(seen + [b.ids for r in rest for b in r])
    assert len(np.unique(ids)) == len(ids)  # nothing repeated
    missing = 470 - len(ids)
    assert missing == 0 if not drop_last else 0 <= missing < 3 * (16 + 8)
    assert news[0].state_dict()["history"] == []  # a new epoch starts clean
    for d in olds + news:
        d.close()


def test_val_split_by_fraction_and_by_dataset(store_a):
    path, _ = store_a
    for kw in ({"val_fraction": 0.25}, {"val_datasets": ["dsB"]}):
        data = dcfg([path], drop_last=False, **kw)
        tr = build_dataset(data, TOK, rank=0, world_size=1, seed=2, raw=True)
        va = build_dataset(data, TOK, rank=0, world_size=1, seed=2, split="val", raw=True)
        t = np.concatenate([b.ids for b in take_epoch(tr)])
        v1 = np.concatenate([b.ids for b in va])
        v2 = np.concatenate([b.ids for b in va])  # a second pass is the same pass
        assert np.array_equal(v1, v2) and len(np.intersect1d(t, v1)) == 0
        assert sorted(np.concatenate([t, v1])) == list(range(470))
        if "val_datasets" in kw:
            assert sorted(v1) == list(range(300, 470))
        tr.close()
        va.close()
    val = build_dataset(dcfg([path], val_fraction=0.25), TOK, rank=0, world_size=1, seed=2, split="val")
    first = [b.gene_ids for b in val]
    assert all(torch.equal(a, b.gene_ids) for a, b in zip(first, val, strict=True))
    # pretraining builds the validation stream once and reads its first batches at every validation: a
    # stream left half way restarts at its first batch, masks included
    whole = list(val)
    for _ in range(2):
        head = list(itertools.islice(iter(val), 2))
        assert all(same(a, b) for a, b in zip(whole[:2], head, strict=True))
    val.close()


def test_obs_filter_keeps_one_tissue(store_a):
    path, _ = store_a
    ds = build_dataset(
        dcfg([path], obs_filter={"tissue": ["lung"]}, drop_last=False),
        TOK,
        rank=0,
        world_size=1,
        seed=0,
        raw=True,
    )
    ids = np.concatenate([b.ids for b in take_epoch(ds)])
    assert sorted(ids % (1 << 40)) == [i for i in range(470) if (i if i < 300 else i - 300) % 3 == 0]
    with pytest.raises(SclabelError):
        build_dataset(dcfg([path], obs_filter={"tissue": ["liver"]}), TOK, rank=0, world_size=1, seed=0)


def test_two_stores_with_weights_and_lognorm(store_a, store_ln):
    (pa, _), (pl, ml) = store_a, store_ln
    data = dcfg([pa, pl], weights=[1.0, 1.0], drop_last=False)
    ds = build_dataset(data, TOK, rank=0, world_size=1, seed=0, raw=True)
    assert ds.value_kinds == ["counts", "lognorm"]
    blocks = take_epoch(ds)
    ids = np.concatenate([b.ids for b in blocks])
    from_ln = (ids >> 40) == 1
    assert abs(from_ln.mean() - 0.5) < 0.1  # mixed half and half despite 470 vs 130 cells
    lognorm = np.concatenate([b.lognorm for b in blocks])
    assert np.array_equal(lognorm, from_ln)
    ds.close()
    tok = build_dataset(
        data,
        TokenizeConfig(max_len=64, value_encoding="continuous", mask_ratio=0.1),
        rank=0,
        world_size=1,
        seed=0,
    )
    raw = build_dataset(data, TOK, rank=0, world_size=1, seed=0, raw=True)
    for b, r in itertools.islice(zip(tok, raw, strict=True), 4):
        for i in np.flatnonzero(r.lognorm):
            row = ml[int(r.ids[i] % (1 << 40))]
            np.testing.assert_allclose(
                np.sort(b.targets[i][b.attention_mask[i]][1:].numpy()), np.sort(row.data)
            )
    tok.close()
    raw.close()


def test_soma_stream_equals_zarr_stream(store_a, soma_a):
    path, _ = store_a
    z = build_dataset(dcfg([path]), TOK, rank=0, world_size=1, seed=4)
    s = build_dataset(dcfg([soma_a], vocab=str(path / "vocab.json")), TOK, rank=0, world_size=1, seed=4)
    assert all(same(a, b) for a, b in itertools.islice(zip(z, s, strict=True), 6))
    z.close()
    s.close()


def test_bad_state_is_a_clear_error(store_a):
    path, _ = store_a
    ds = build_dataset(dcfg([path]), TOK, rank=0, world_size=1, seed=0)
    bad = ds.state_dict() | {"epoch_samples": 3}
    with pytest.raises(SclabelError, match="changed"):
        ds.load_state_dict(bad)
    with pytest.raises(SclabelError):
        ds.load_state_dict({"seed": 1})


def test_too_small_corpus_is_a_clear_error(store_ln):
    path, _ = store_ln
    ds = build_dataset(dcfg([path], batch_size=100), TOK, rank=0, world_size=2, seed=0)
    with pytest.raises(SclabelError, match="no full batch"):
        next(iter(ds))


def test_reads_run_ahead_into_the_next_epoch(store_a, monkeypatch):
    """Near an epoch's end the next epoch's first windows are read ahead, each window is read once, and the
    batches equal those of a stream resumed at the start of each epoch."""
    from sclabel_dist.data.dataset import StreamingCellDataset

    path, _ = store_a
    data = dcfg([path], read_ahead=3)
    reads, events = [], []
    original = StreamingCellDataset._read_window

    def counted(self, plan, w, epoch, segment):
        reads.append((epoch, segment, w))
        events.append(("read", epoch))
        return original(self, plan, w, epoch, segment)

    monkeypatch.setattr(StreamingCellDataset, "_read_window", counted)
    ds = build_dataset(data, TOK, rank=0, world_size=1, seed=5, raw=True)
    n = ds.num_batches_per_epoch
    got = []
    for batch in itertools.islice(iter(ds), 3 * n):
        events.append(("batch", len(got)))
        got.append(batch)
    ds.close()
    assert len(reads) == len(set(reads))  # no window read twice
    # The pool is FIFO: the next epoch's first read starts before the epoch's last batch is handed over.
    assert events.index(("read", 1)) < events.index(("batch", n - 1))
    for epoch in range(3):
        fresh = build_dataset(data, TOK, rank=0, world_size=1, seed=5, raw=True)
        fresh.load_state_dict({"seed": 5, "epoch": epoch, "samples_seen": 0, "world_size": 1})
        want = list(itertools.islice(iter(fresh), n))
        fresh.close()
        for a, b in zip(got[epoch * n : (epoch + 1) * n], want, strict=True):
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.indptr, b.indptr)
            np.testing.assert_array_equal(a.indices, b.indices)


def step_cells(batches: list) -> list[tuple]:
    """Each cell of a step's micro-batches (ranks in order) as its real tokens: padding depends on the batch."""
    out = []
    for b in batches:
        for i in range(b.num_cells):
            n = int(b.attention_mask[i].sum())
            out.append(tuple(tuple(getattr(b, f)[i, :n].tolist()) for f in ("gene_ids", "values", "masked")))
    return out


def elastic_steps(path, state, world: int, batch: int, accum: int, steps: int) -> tuple[list, dict]:
    """`steps` optimizer steps of data.elastic on `world` ranks (from `state`), each as step_cells."""
    data = dcfg([path], elastic=True, batch_size=batch)
    ranks = [
        build_dataset(data, TOK, rank=r, world_size=world, seed=5, grad_accum=accum) for r in range(world)
    ]
    for d in ranks:
        if state is not None:
            d.load_state_dict(state)
    its = [iter(d) for d in ranks]
    out = [step_cells([next(it) for it in its for _ in range(accum)]) for _ in range(steps)]
    state = ranks[0].state_dict()
    for d in ranks:
        d.close()
    return out, state


def test_elastic_order_gives_each_step_the_same_cells_and_masks_on_any_world_size(store_a):
    """data.elastic: 2 ranks x 12 cells for 6 steps, then the rest of the epoch (and into the next) on 1 rank
    (12 x 2 micro-batches), 3 ranks (8 x 1) and 4 ranks (3 x 2): every step's cells, gene order, values and
    masks are those of the uninterrupted 2-rank stream."""
    path, _ = store_a
    reference, _ = elastic_steps(path, None, 2, 12, 1, 24)  # 470 cells: 19 steps of 24 per epoch
    _, state = elastic_steps(path, None, 2, 12, 1, 6)
    assert state["samples_seen"] == 6 * 24 and state["elastic"] is True
    for world, batch, accum in ((1, 12, 2), (3, 8, 1), (4, 3, 2)):
        got, _ = elastic_steps(path, state, world, batch, accum, 18)
        for step, (a, b) in enumerate(zip(reference[6:], got, strict=True)):
            assert sorted(a) == sorted(b), (world, step)  # the same cells, tokens and masks
    # the masks really are drawn: about mask_ratio of the real genes, and not the same for all cells
    masked = [sum(c[2]) / len(c[2]) for step in reference for c in step]
    assert 0.1 < np.mean(masked) < 0.3 and len(set(tuple(c[2]) for step in reference for c in step)) > 10
