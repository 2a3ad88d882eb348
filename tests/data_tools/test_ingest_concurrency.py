"""Appends that overlap or fail half way: real ingest processes on a real store (issue 19, items 1 and 4)."""

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


def _h5ad(path: Path, n: int, seed: int) -> Path:
    import anndata as ad
    import pandas as pd

    X = sp.random(n, 300, density=0.05, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 20)
    ad.AnnData(X=X, var=pd.DataFrame(index=[f"G{i}" for i in range(300)])).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("inputs")
    return [_h5ad(d / f"in{i}.h5ad", 4000, i) for i in range(3)]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "data_tools", "ingest", *args, "--no-progress", "--rows-per-shard", "200"]


def _base_store(tmp_path: Path, src: Path) -> Path:
    store = tmp_path / "store"
    subprocess.run(
        _cmd(str(src), "-o", str(store), "--dataset-name", "base"), check=True, capture_output=True
    )
    return store


def _together(*cmds: list[str]) -> list[subprocess.CompletedProcess]:
    """Start every command at once and wait for all."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate(timeout=300) for p in procs]
    return [
        subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs, strict=True)
    ]


def test_two_concurrent_appends_keep_both_datasets(tmp_path: Path, inputs: list[Path]) -> None:
    store = _base_store(tmp_path, inputs[0])
    runs = _together(
        _cmd(str(inputs[1]), "-o", str(store), "--append", "--dataset-name", "left"),
        _cmd(str(inputs[2]), "-o", str(store), "--append", "--dataset-name", "right"),
    )
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    index = fmt.read_index(store)
    assert sorted(d.name for d in index.datasets) == ["base", "left", "right"]
    assert index.num_rows == 12000
    assert validate_store(store) == ([], [])
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # the lock file goes with its holder


def test_two_concurrent_appends_same_name_one_clear_refusal(tmp_path: Path, inputs: list[Path]) -> None:
    store = _base_store(tmp_path, inputs[0])
    runs = _together(
        *(_cmd(str(inputs[i]), "-o", str(store), "--append", "--dataset-name", "dup") for i in (1, 2))
    )
    assert sorted(r.returncode for r in runs) == [0, 2], [r.stderr[-2000:] for r in runs]
    failed = next(r for r in runs if r.returncode)
    assert "'dup'" in failed.stderr and "already in the store" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert sorted(d.name for d in fmt.read_index(store).datasets) == ["base", "dup"]
    assert validate_store(store) == ([], [])


def test_multi_input_append_killed_half_way_commits_nothing_and_reruns(
    tmp_path: Path, inputs: list[Path]
) -> None:
    store = _base_store(tmp_path, inputs[0])
    before = (store / fmt.INDEX_FILE).read_text()
    cmd = _cmd(str(inputs[1]), str(inputs[2]), "-o", str(store), "--append")
    cmd += ["--dataset-name", "one", "--dataset-name", "two"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Kill while the SECOND input is being written: the first one is finished by then.
    while time.time() < deadline and proc.poll() is None:
        if list((store / fmt.SHARDS_DIR).glob("*two*/part_00003")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "ingest finished before it could be killed; make the inputs bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (store / fmt.INDEX_FILE).read_text() == before  # all or nothing: "one" was not committed alone
    assert validate_store(store)[0] == []
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    index = fmt.read_index(store)
    assert [d.name for d in index.datasets] == ["base", "one", "two"] and index.num_rows == 12000
    assert validate_store(store) == ([], [])
