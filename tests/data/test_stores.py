"""CellStore implementations: Zarr and SOMA give the same rows; runs, shard crossings, obs, datasets."""

from __future__ import annotations

import numpy as np
import pytest

from sclabel_dist.data.stores import open_store
from sclabel_dist.data.stores.base import CellStore, CSRBlock
from sclabel_dist.errors import SclabelError


def dense(block: CSRBlock) -> np.ndarray:
    return block.to_scipy().toarray()


@pytest.mark.parametrize(("zarrs", "direct"), [(False, False), (True, False), (True, True)])
def test_zarr_reads_runs_and_scattered_rows(store_a, zarrs, direct):
    from sclabel_dist.data.stores.sharded import ShardedArray
    from sclabel_dist.data.stores.zarr_store import ZarrCellStore

    path, m = store_a
    store = ZarrCellStore(path, zarrs=zarrs, direct=direct)
    assert isinstance(store, CellStore)
    assert all(isinstance(a, ShardedArray) == direct for pair in store._arrays for a in pair)
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


@pytest.mark.parametrize("compiled", [True, False])
def test_soma_runs_split_over_queries(store_a, soma_a, vocab, monkeypatch, compiled):
    """Runs and single rows over several queries (7 rows each), with the numba and the numpy conversion;
    soma_a's var order is the vocabulary's reversed, so every row's genes need sorting."""
    from sclabel_dist.data.stores import soma_store

    monkeypatch.setattr(soma_store, "_ROWS_PER_QUERY", 7)
    monkeypatch.setattr(soma_store, "HAVE_NUMBA", compiled)
    _, m = store_a
    store = open_store(str(soma_a), vocab=vocab)
    rows = np.concatenate([np.arange(0, 40), np.arange(120, 140), [200, 469]])
    block = store.read_rows(rows)
    assert block.indices.dtype == np.uint16 and block.data.dtype == np.float32
    np.testing.assert_array_equal(block.indptr, m[rows].indptr)
    np.testing.assert_array_equal(dense(block), m[rows].toarray())
    store.close()


@pytest.mark.parametrize("order", ["by_row", "shuffled"])
def test_coo_to_csr_kernel(order):
    """Rows in joinid order (one pass) or not (counting sort), genes permuted, some outside the vocabulary."""
    import scipy.sparse as sp

    from sclabel_dist.data.kernels import coo_to_csr

    rng = np.random.default_rng(0)
    coo = sp.random(50, 30, density=0.2, format="coo", random_state=2, dtype=np.float32)
    joinids = np.arange(50, dtype=np.int64) * 3 + 7  # sorted, with gaps
    gene_of_col = rng.permutation(30).astype(np.int64)
    gene_of_col[[4, 9]] = -1
    perm = np.lexsort((coo.col, coo.row)) if order == "by_row" else rng.permutation(coo.nnz)
    dim0, dim1, values = joinids[coo.row[perm]], coo.col[perm].astype(np.int64), coo.data[perm]
    indptr, indices, data = coo_to_csr(dim0, dim1, values, joinids, gene_of_col, np.uint16)
    keep = gene_of_col[coo.col] >= 0
    expected = sp.csr_matrix((coo.data[keep], (coo.row[keep], gene_of_col[coo.col[keep]])), shape=(50, 30))
    expected.sort_indices()
    np.testing.assert_array_equal(indptr, expected.indptr)
    np.testing.assert_array_equal(indices, expected.indices)
    np.testing.assert_array_equal(data, expected.data)
    empty = coo_to_csr(dim0[:0], dim1[:0], values[:0], joinids, gene_of_col, np.uint16)
    assert (empty[0] == 0).all() and len(empty[1]) == 0


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
