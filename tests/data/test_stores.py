"""CellStore implementations: Zarr and SOMA give the same rows; runs, shard crossings, obs, datasets."""

from __future__ import annotations

import numpy as np
import pytest

from sclabel_dist.data.stores.base import CellStore, CSRBlock, open_store
from sclabel_dist.errors import SclabelError


def dense(block: CSRBlock) -> np.ndarray:
    return block.to_scipy().toarray()


@pytest.mark.parametrize("zarrs", [False, True])
def test_zarr_reads_runs_and_scattered_rows(store_a, zarrs):
    from sclabel_dist.data.stores.zarr_store import ZarrCellStore

    path, m = store_a
    store = ZarrCellStore(path, zarrs=zarrs)
    assert isinstance(store, CellStore)
    assert store.num_rows == 470 and store.num_genes == m.shape[1]
    # Runs crossing shard (128 rows) and dataset (300) boundaries, plus isolated rows.
    rows = np.concatenate([np.arange(120, 140), np.arange(290, 310), [0, 5, 469]])
    rows = np.unique(rows)
    np.testing.assert_array_equal(dense(store.read_rows(rows)), m[rows].toarray())
    assert store.read_rows(np.zeros(0, np.int64)).num_rows == 0
    assert set(store.datasets()) == {"dsA", "dsB"}
    assert (store.obs_values("tissue")[:3] == ["lung", "kidney", "kidney"]).all()
    with pytest.raises(SclabelError):
        store.obs_values("nope")
    with pytest.raises(SclabelError):
        store.read_rows(np.array([470]))


def test_soma_and_zarr_give_identical_rows(store_a, soma_a, vocab):
    path, m = store_a
    z = open_store(str(path))
    s = open_store(str(soma_a), vocab=vocab)
    assert type(s).__name__ == "SomaCellStore" and s.value_kinds() == [(0, 470, "counts")]
    rows = np.unique(np.random.default_rng(3).choice(470, 200, replace=False))
    a, b = z.read_rows(rows), s.read_rows(rows)
    for field in ("indptr", "indices", "data", "lognorm"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(s.obs_values("tissue"), z.obs_values("tissue"))


def test_lognorm_flag_and_take(store_ln):
    path, m = store_ln
    store = open_store(str(path))
    block = store.read_rows(np.arange(10))
    assert block.lognorm.all() and block.data.dtype == np.float32
    picked = block.take(np.array([3, 1, 3]))
    np.testing.assert_array_equal(dense(picked), m[[3, 1, 3]].toarray())


def test_open_store_errors(tmp_path):
    with pytest.raises(SclabelError):
        open_store(str(tmp_path))
