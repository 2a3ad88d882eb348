"""Object-storage failures: a SIGKILLed ingest to S3, and a loopback proxy failing reads with 503 and delaying
the rest, under which an epoch is still covered exactly once (one process, and two under torchrun)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_tools.ingest import main as ingest
from data_tools.validate import validate_store
from sclabel_dist.config import DataConfig, TokenizeConfig
from sclabel_dist.data import format as fmt
from sclabel_dist.data.dataset import build_dataset
from sclabel_dist.data.stores import location
from sclabel_dist.data.stores.location import as_path
from sclabel_dist.data.stores.zarr_store import ZarrCellStore
from sclabel_dist.errors import SclabelError

from .conftest import write_h5ad
from .proxy import FaultyProxy


@pytest.fixture
def faulty(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """Reads through a proxy failing 20% of GETs with 503 and delaying every request by 5 ms."""
    proxy = FaultyProxy(moto_endpoint, delay_s=0.005, fail_rate=0.2, seed=1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.start())
    yield proxy
    proxy.stop()


def test_sigkilled_ingest_leaves_nothing_then_rerun(s3_bucket: str, tmp_path: Path) -> None:
    src = write_h5ad(tmp_path / "big.h5ad", 6000, 3)
    url = f"s3://{s3_bucket}/killed"
    cmd = [sys.executable, "-m", "data_tools", "ingest", str(src), "-o", url, "--no-progress"]
    cmd += ["--rows-per-shard", "100", "--tmp-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shards = as_path(url) / fmt.SHARDS_DIR
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not shards.is_dir():
        time.sleep(0.01)
    assert proc.poll() is None, "ingest finished before its upload could be killed; make the input bigger"
    os.kill(proc.pid, signal.SIGKILL)  # killed while uploading its shards
    proc.wait()
    assert shards.is_dir() and not (as_path(url) / fmt.INDEX_FILE).is_file()
    problems, _ = validate_store(url)
    assert problems and "not a cell store" in problems[0]
    with pytest.raises(SclabelError, match="not a cell store"):
        ZarrCellStore(url)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert fmt.read_index(url).num_rows == 6000
    assert validate_store(url) == ([], [])  # the killed run's uploads removed after the commit
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("sclabel-s3stage")]


def test_epoch_covered_once_under_503_and_delay(store_h5ad: list[Path], s3_bucket: str, faulty) -> None:
    url = f"s3://{s3_bucket}/faulty"
    ingest([str(store_h5ad[0]), "-o", url, "--no-progress", "--rows-per-shard", "100"])
    location.reset_stats()
    data = DataConfig(stores=[url], batch_size=32, chunk_size=16, shuffle_chunks=4, drop_last=False)
    raw = build_dataset(data, TokenizeConfig(max_len=16), rank=0, world_size=1, seed=3, raw=True)
    seen = []
    for block in raw:
        if raw.epoch != 0:
            break
        seen.append(block.ids)
    raw.close()
    assert faulty.failed > 0 and location.stats()["retries"] > 0
    assert sorted(np.concatenate(seen).tolist()) == list(range(600))


def test_permanent_error_fails_at_once_naming_the_object(store_h5ad: list[Path], s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/perm"
    ingest([str(store_h5ad[0]), "-o", url, "--no-progress", "--rows-per-shard", "100"])
    store = ZarrCellStore(url)
    index = fmt.read_index(url)
    victim = next(
        o for o in (as_path(url) / index.shards[2].path / fmt.DATA).rglob("*") if o.name != "zarr.json"
    )
    victim.unlink()
    location.reset_stats()
    with pytest.raises(SclabelError, match=rf"{victim}: shard file missing"):
        store.read_rows(np.arange(store.num_rows))
    assert location.stats()["retries"] == 0  # a missing key is not retried


@pytest.mark.parametrize("faults", [False, True], ids=["direct", "503-and-delay"])
def test_torchrun_two_ranks_cover_s3_epoch_once(
    store_h5ad: list[Path], s3_bucket: str, moto_endpoint: str, tmp_path: Path, faults: bool
) -> None:
    url = f"s3://{s3_bucket}/dist"
    ingest([str(store_h5ad[0]), "-o", url, "--no-progress", "--rows-per-shard", "100"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proxy = None
    if faults:
        proxy = FaultyProxy(moto_endpoint, delay_s=0.005, fail_rate=0.2, seed=2)
        env["AWS_ENDPOINT_URL"] = proxy.start()
    out = tmp_path / "result.json"
    worker = Path(__file__).parents[1] / "data" / "torchrun_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    try:
        proc = subprocess.run(
            [*cmd, str(worker), url, str(out)], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        if proxy is not None:
            proxy.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["batches"][0] == result["batches"][1] > 0
    assert sorted(result["ids"]) == list(range(600))
    if faults:
        assert proxy.failed > 0 and sum(result["retries"]) > 0
