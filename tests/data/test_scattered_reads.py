"""Rows scattered over chunks (the elastic order's slices of a window) decode each chunk once, not once a row."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sclabel_dist.data.stores.zarr_store import ZarrCellStore, coalesce


def test_coalesce_joins_slices_that_share_a_chunk_and_nothing_else():
    chunk = [10, 10]
    slices = [(0, 0, 3), (0, 5, 8), (0, 9, 12), (0, 25, 27), (0, 27, 27), (1, 3, 4), (1, 4, 15), (1, 15, 30)]
    assert coalesce(slices, chunk) == [
        (0, 0, 12, [0, 1, 2]),  # 0-3, 5-8 and 9-12 share chunk 0
        (0, 25, 27, [3]),  # chunk 2: chunk 1 would be decoded for nothing
        (0, 27, 27, [4]),  # an empty slice joins nothing
        (1, 3, 30, [5, 6, 7]),  # another shard: its own spans
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("scattered") / "store"
    subprocess.run(
        [sys.executable, "-m", "data_tools", "synth", "--quiet", "--cells", "3000", "--genes", "400"]
        + ["--nnz-per-cell", "60", "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return ZarrCellStore(out)


def test_scattered_rows_read_right_and_decode_each_chunk_once(store, monkeypatch):
    from numcodecs import blosc

    rows = np.sort(np.random.default_rng(0).choice(store.num_rows, store.num_rows // 2, replace=False))
    whole = store.read_rows(np.arange(store.num_rows)).to_scipy()
    calls = []
    decompress = blosc.decompress
    monkeypatch.setattr(blosc, "decompress", lambda *a: calls.append(1) or decompress(*a))
    got = store.read_rows(rows).to_scipy()
    assert (got != whole[rows]).nnz == 0
    # every chunk of both arrays holds some of the rows: each decoded once (before: about once per row)
    chunks = sum(
        -(-int(store._indptr[s][-1]) // arrays[k].chunk)
        for s, arrays in enumerate(store._arrays)
        for k in (0, 1)
    )
    assert len(calls) <= chunks, (len(calls), chunks)
