"""An ingest killed with SIGKILL half way leaves nothing validate accepts (or the old store intact); rerun succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from data_tools.validate import validate_store
from sclabel_dist.data import format as fmt


@pytest.fixture(scope="module")
def big_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import anndata as ad
    import pandas as pd

    n, g = 6000, 300
    X = sp.random(n, g, density=0.05, format="csr", random_state=0, dtype=np.float32)
    X.data = np.ceil(X.data * 20)
    path = tmp_path_factory.mktemp("crash") / "big.h5ad"
    ad.AnnData(X=X, var=pd.DataFrame(index=[f"G{i}" for i in range(g)])).write_h5ad(path)
    return path


def _part_written(watch: Path, name: str) -> bool:
    return any(name in dirs for _, dirs, _ in os.walk(watch))


def _ingest_and_kill(args: list[str], watch: Path, part: str) -> None:
    """Start an ingest, SIGKILL it as soon as shard `part` appears anywhere under `watch` (mid-write)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_tools", "ingest", *args, "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if _part_written(watch, part):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "ingest finished before it could be killed; make the input bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _run(args: list[str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "data_tools", "ingest", *args, "--no-progress"],
        check=True,
        capture_output=True,
    )


def test_sigkill_new_store_then_rerun(big_h5ad: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = [str(big_h5ad), "-o", str(store), "--rows-per-shard", "100"]
    _ingest_and_kill(args, tmp_path, "part_00003")
    assert not store.exists()
    assert validate_store(store)[0]  # nothing there that validate accepts
    assert any(p.name.startswith(".store.tmp-") for p in tmp_path.iterdir()), list(tmp_path.iterdir())
    _run(args)
    assert validate_store(store) == ([], [])
    assert fmt.read_index(store).num_rows == 6000
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # stale temp dirs of the dead run removed


def test_sigkill_append_keeps_old_store(big_h5ad: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    _run([str(big_h5ad), "-o", str(store), "--dataset-name", "first", "--rows-per-shard", "3000"])
    index_before = (store / fmt.INDEX_FILE).read_text()
    args = [
        str(big_h5ad),
        "-o",
        str(store),
        "--append",
        "--dataset-name",
        "second",
        "--rows-per-shard",
        "100",
    ]
    _ingest_and_kill(args, store / "shards", "part_00003")
    assert (store / fmt.INDEX_FILE).read_text() == index_before
    problems, warnings = validate_store(store)
    assert problems == [] and warnings  # old store valid; the half-written dir is only a warning
    _run(args)
    index = fmt.read_index(store)
    assert [d.name for d in index.datasets] == ["first", "second"] and index.num_rows == 12000
    assert validate_store(store) == ([], [])
