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


def kernels_warming_up(monkeypatch) -> None:
    """This process as while a stream's kernel warm-up is under way in another thread."""
    import threading

    from sclabel_dist.data import kernel_warmup

    monkeypatch.setattr(kernel_warmup, "_started", threading.Event())
    monkeypatch.setattr(kernel_warmup, "_ready", threading.Event())
    assert kernel_warmup.start() and not kernel_warmup.compiled_ready()


@pytest.mark.parametrize("path", ["numba", "no numba", "warming up"])
def test_soma_runs_split_over_queries(store_a, soma_a, vocab, monkeypatch, path):
    """Runs and single rows over several queries (7 rows each), with the numba and the numpy conversion (no
    numba, or its kernels warming up); soma_a's var order is the vocabulary's reversed, so every row's genes
    need sorting."""
    from sclabel_dist.data import kernels
    from sclabel_dist.data.stores import soma_store

    monkeypatch.setattr(soma_store, "_ROWS_PER_QUERY", 7)
    monkeypatch.setattr(soma_store, "HAVE_NUMBA", path != "no numba")
    if path == "warming up":
        kernels_warming_up(monkeypatch)
        monkeypatch.setattr(kernels, "coo_to_csr", None)  # a call while warming up would fail
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


@pytest.mark.parametrize(("index_dtype", "data_dtype"), [(np.uint16, np.uint8), (np.uint32, np.float32)])
def test_numpy_row_gather_equals_the_kernel(index_dtype, data_dtype):
    """The raw path's numpy twin (taken while the kernels warm up) gives take_rows' arrays, dtypes included."""
    from sclabel_dist.data.kernels import take_rows
    from sclabel_dist.data.stores.base import take_rows_numpy

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, 300)
    lengths[::7] = 0
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, 5000, indptr[-1]).astype(index_dtype)
    data = rng.integers(1, 200, indptr[-1]).astype(data_dtype)
    for rows in (rng.permutation(300)[:77], np.array([5, 5, 0, 299, 7]), np.zeros(0, np.int64)):
        kernel_arrays = take_rows(indptr, indices, data, rows)
        for kernel, twin in zip(kernel_arrays, take_rows_numpy(indptr, indices, data, rows), strict=True):
            assert kernel.dtype == twin.dtype
            np.testing.assert_array_equal(kernel, twin)


def test_take_waits_for_no_kernel_while_they_warm_up(store_a, monkeypatch):
    """CSRBlock.take takes the numpy gather while a warm-up is under way, the kernel in the warm-up's own thread
    and once it has finished."""
    from sclabel_dist.data import kernel_warmup, kernels

    path, m = store_a
    block = open_store(str(path)).read_rows(np.arange(100))
    rows = np.array([30, 2, 2, 99])
    kernels_warming_up(monkeypatch)
    compiled, gathered = kernels.take_rows, []

    def counted(*args):
        gathered.append(args)
        return compiled(*args)

    monkeypatch.setattr(kernels, "take_rows", counted)
    np.testing.assert_array_equal(dense(block.take(rows)), m[rows].toarray())
    assert not gathered
    with kernel_warmup.warming():
        np.testing.assert_array_equal(dense(block.take(rows)), m[rows].toarray())
    assert len(gathered) == 1
    kernel_warmup.finish()
    np.testing.assert_array_equal(dense(block.take(rows)), m[rows].toarray())
    assert len(gathered) == 2


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
