"""Direct sharded-array reads (stores/sharded.py) against zarr itself; the store's fallback; the row gather."""

from __future__ import annotations

import numpy as np
import pytest

from sclabel_dist.data.stores.sharded import _EMPTY, open_sharded
from sclabel_dist.errors import SclabelError


def _array(path, values, *, chunk=64, shard=256, shuffle="bitshuffle", compressor=True):
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    codec = BloscCodec(cname="lz4", clevel=5, shuffle=shuffle) if compressor else ZstdCodec()
    arr = zarr.create_array(
        str(path),
        shape=values.shape,
        chunks=(chunk,),
        shards=(shard,) if shard else None,
        dtype=values.dtype,
        compressors=codec,
        fill_value=0,
    )
    arr[:] = values
    return arr


@pytest.mark.parametrize(
    ("dtype", "shuffle"),
    [("uint8", "bitshuffle"), ("uint16", "shuffle"), ("uint32", "bitshuffle"), ("float32", "shuffle")],
)
def test_direct_reads_equal_zarr(tmp_path, dtype, shuffle):
    rng = np.random.default_rng(0)
    n = 1000  # 4 shard files of 4 chunks, the last shard and chunk partly past the end
    values = rng.integers(1, 200, n).astype(dtype)
    values[64:128] = 0  # an inner chunk of fill values: never written, (offset, nbytes) = EMPTY
    values[512:768] = 0  # a whole shard of fill values: no file at all
    arr = _array(tmp_path / "a", values, shuffle=shuffle)
    fast = open_sharded(tmp_path / "a")
    assert fast is not None and fast.dtype == np.dtype(dtype)
    assert not (tmp_path / "a" / "c" / "2").exists() and fast._shard_index(2) is None
    assert (fast._shard_index(0) == _EMPTY).all(axis=1).sum() == 1
    cuts = [
        (0, n),
        (0, 0),
        (64, 128),
        (128, 192),
        (100, 900),
        (255, 257),
        (500, 800),
        (960, 1000),
        (999, 1000),
    ]
    cuts += [tuple(sorted(rng.integers(0, n + 1, 2).tolist())) for _ in range(50)]
    for lo, hi in cuts:
        out = np.full(hi - lo, 7, dtype=dtype)
        fast.read_into(lo, hi, out)
        np.testing.assert_array_equal(out, arr[lo:hi], err_msg=f"[{lo}:{hi}]")


def test_will_need_hints_exactly_the_stored_bytes_of_a_slice(tmp_path, monkeypatch):
    """The cold-read hint covers, per shard file, the stored chunks a read of [lo, hi) decodes, and no more."""
    import os

    values = np.arange(1, 1001, dtype="uint16")
    values[64:128] = 0  # an unwritten inner chunk: nothing to hint
    values[512:768] = 0  # an absent shard file: no hint, no error
    _array(tmp_path / "a", values, shuffle="shuffle")
    fast = open_sharded(tmp_path / "a")
    hints = []
    real = os.posix_fadvise
    monkeypatch.setattr(
        os,
        "posix_fadvise",
        lambda fd, off, n, advice: hints.append((os.readlink(f"/proc/self/fd/{fd}"), off, n)),
    )
    for lo, hi in [(0, 1000), (70, 130), (100, 900), (600, 700), (999, 1000), (5, 5)]:
        hints.clear()
        fast.will_need(lo, hi)
        want = []
        for s in range(lo // 256, (hi - 1) // 256 + 1 if hi > lo else lo // 256):
            index = fast._shard_index(s)
            if index is None:
                continue
            c0, c1 = max(lo - 256 * s, 0) // 64, (min(hi, 256 * (s + 1)) - 1 - 256 * s) // 64 + 1
            stored = index[c0:c1][index[c0:c1, 0] != _EMPTY]
            if len(stored):
                start = int(stored[:, 0].min())
                want.append(
                    (
                        str(tmp_path / "a" / "c" / str(s)),
                        start,
                        int((stored[:, 0] + stored[:, 1]).max()) - start,
                    )
                )
        assert hints == want, (lo, hi)
    monkeypatch.setattr(os, "posix_fadvise", real)
    out = np.empty(1000, dtype="uint16")
    fast.will_need(0, 1000)
    fast.read_into(0, 1000, out)
    np.testing.assert_array_equal(out, values)


def test_other_layouts_are_left_to_zarr(tmp_path):
    values = np.arange(300, dtype=np.uint16)
    _array(tmp_path / "unsharded", values, shard=None)
    _array(tmp_path / "zstd", values, compressor=False)
    assert open_sharded(tmp_path / "unsharded") is None
    assert open_sharded(tmp_path / "zstd") is None
    assert open_sharded(tmp_path / "missing") is None


def test_corrupt_shard_index_is_refused(tmp_path):
    _array(tmp_path / "a", np.arange(1, 301, dtype=np.uint16))
    file = tmp_path / "a" / "c" / "0"
    raw = bytearray(file.read_bytes())
    raw[-10] ^= 0xFF  # inside the shard index, before its crc32c
    file.write_bytes(bytes(raw))
    with pytest.raises(SclabelError, match="checksum"):
        open_sharded(tmp_path / "a").read_into(0, 10, np.empty(10, np.uint16))


def test_store_reads_mixed_dtypes_and_falls_back(tmp_path, vocab, monkeypatch):
    """Shards of uint8 and uint16 counts in one read are promoted as np.concatenate would; a store written
    with another codec is read through zarr, with the same rows."""
    import scipy.sparse as sp
    from zarr.codecs import ZstdCodec

    from data_tools import writer
    from data_tools.writer import StoreWriter
    from sclabel_dist.data.stores.zarr_store import ZarrCellStore

    rng = np.random.default_rng(1)
    small = sp.random(40, len(vocab), density=0.3, format="csr", random_state=1, dtype=np.float32)
    small.data = rng.integers(1, 200, small.nnz).astype(np.float32)
    big = small.copy()
    big.data = big.data * 100  # > 255: uint16 counts
    m = sp.vstack([small, big]).tocsr()
    for name, patch in (("direct", False), ("zstd", True)):
        if patch:
            monkeypatch.setattr(writer, "_compressor", lambda name, kind: ZstdCodec())
        path = tmp_path / name
        for i, (ds, part) in enumerate((("small", small), ("big", big))):
            with StoreWriter(
                path, vocab, ds, value_kind="counts", mode="create" if i == 0 else "append"
            ) as w:
                w.write_block(part)
        store = ZarrCellStore(path)
        kinds = {type(a[1]).__name__ for a in store._arrays}
        assert kinds == ({"Array"} if patch else {"ShardedArray"})
        rows = np.concatenate([np.arange(30, 50), [0, 79]])
        rows.sort()
        block = store.read_rows(rows)
        assert block.data.dtype == np.uint16
        np.testing.assert_array_equal(block.to_scipy().toarray(), m[rows].toarray())


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "float32", "float64"])
def test_take_rows_kernel(dtype):
    from sclabel_dist.data.kernels import take_rows

    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 50, 200)
    lengths[[3, 7]] = 0
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, 255, indptr[-1]).astype(np.uint16)
    data = rng.integers(0, 100, indptr[-1]).astype(dtype)
    for rows in (rng.permutation(200), np.array([3, 5, 5, 199, 7, 0]), np.zeros(0, np.int64)):
        ip, ix, dt = take_rows(indptr, indices, data, rows)
        assert ix.dtype == indices.dtype and dt.dtype == data.dtype
        np.testing.assert_array_equal(np.diff(ip), lengths[rows])
        src = np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows] + [np.zeros(0, np.int64)])
        np.testing.assert_array_equal(ix, indices[src])
        np.testing.assert_array_equal(dt, data[src])


def test_read_whole_equals_zarr_for_the_writers_small_arrays(tmp_path):
    """indptr's layout (one chunk, bytes -> zstd -> crc32c) is read without zarr; anything else is left to it."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    from sclabel_dist.data.stores.sharded import read_whole

    values = np.cumsum(np.random.default_rng(0).integers(0, 3000, 5001)).astype(np.uint64)
    for name, chunks, compressors in (
        ("indptr", (5001,), (ZstdCodec(), Crc32cCodec())),
        ("two_chunks", (2600,), (ZstdCodec(), Crc32cCodec())),
        ("no_crc", (5001,), (ZstdCodec(),)),
    ):
        arr = zarr.create_array(
            str(tmp_path / name),
            shape=values.shape,
            chunks=chunks,
            dtype=values.dtype,
            compressors=compressors,
        )
        arr[:] = values
    np.testing.assert_array_equal(read_whole(tmp_path / "indptr"), values)
    assert read_whole(tmp_path / "two_chunks") is None and read_whole(tmp_path / "no_crc") is None
    assert read_whole(tmp_path / "missing") is None
    _array(tmp_path / "sharded", np.arange(300, dtype=np.uint16))
    assert read_whole(tmp_path / "sharded") is None
    file = tmp_path / "indptr" / "c" / "0"
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    file.write_bytes(bytes(raw))
    with pytest.raises(SclabelError, match=r"indptr/c/0: fails its crc32c check"):
        read_whole(tmp_path / "indptr")


def test_a_local_store_opens_and_reads_without_importing_zarr(store_a):
    """Opening a store in the writer's layout costs plain file reads only: importing zarr alone took ~0.2 s of
    the time to the first batch (benchmarks/RESULTS.md, issue 20 session 7)."""
    import os
    import subprocess
    import sys

    path, m = store_a
    code = (
        "import sys, numpy as np\n"
        "from sclabel_dist.data.stores import open_store\n"
        f"s = open_store({str(path)!r})\n"
        "b = s.read_rows(np.arange(0, s.num_rows, 3))\n"
        "print(b.nnz, 'zarr' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(m[::3].nnz), "False"]
