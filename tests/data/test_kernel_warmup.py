"""`sclabel-data compile-kernels` leaves a later process nothing to compile (a fresh numba cache)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

STREAM_AND_COUNT = """
import sys
from numba.core.registry import CPUDispatcher
from sclabel_dist.config import DataConfig, TokenizeConfig
from sclabel_dist.data import kernels
from sclabel_dist.data.dataset import build_dataset

for store in sys.argv[1:]:
    data = DataConfig(stores=[store], batch_size=16, chunk_size=16, shuffle_chunks=4, val_fraction=0.3)
    for encoding in ("binned", "continuous"):
        for split, raw in (("train", False), ("val", False), ("train", True)):
            tok = TokenizeConfig(max_len=64, value_encoding=encoding, gene_bag=True)
            ds = build_dataset(data, tok, rank=0, world_size=1, seed=0, split=split, raw=raw)
            batches = iter(ds)
            for _ in range(3):
                next(batches)
            ds.close()
dispatchers = [d for d in vars(kernels).values() if isinstance(d, CPUDispatcher)]
print(sum(sum(d.stats.cache_hits.values()) for d in dispatchers),
      sum(sum(d.stats.cache_misses.values()) for d in dispatchers))
"""


@pytest.mark.slow
def test_compile_kernels_leaves_nothing_to_compile(store_a, store_ln, tmp_path):
    """Counts and log-normalised stores, binned and continuous tokens, training and validation streams, raw
    streams: after the command, every kernel they call comes from the cache."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    done = subprocess.run(
        [sys.executable, "-m", "data_tools", "compile-kernels"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "compiled kernels: uint8 binned" in done.stdout
    streamed = subprocess.run(
        [sys.executable, "-c", STREAM_AND_COUNT, str(store_a[0]), str(store_ln[0])],
        env=env,
        capture_output=True,
        text=True,
    )
    assert streamed.returncode == 0, streamed.stderr
    hits, misses = map(int, streamed.stdout.split()[-2:])
    assert hits > 0 and misses == 0
