"""Cell stores in object storage, against moto's S3 server on loopback: ingest -o s3://, append, round trip,
validate / inspect, the loader, conditional commits, and no secret written anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.ingest import main as ingest
from data_tools.inspect import summarize
from data_tools.validate import validate_store
from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores.location import as_path
from sclabel_dist.data.stores.zarr_store import ZarrCellStore
from sclabel_dist.errors import SclabelError

from .conftest import SECRET

SMALL = ["baron_mouse1_pancreas", "tabula_muris_immune_actinn"]


def _all_rows(store: ZarrCellStore):
    return store.read_rows(np.arange(store.num_rows)).to_scipy()


def _objects(url: str) -> list:
    return list(as_path(url).rglob("*"))


@pytest.mark.shared_data
def test_round_trip_real_sets_equal_to_local(shared_data: Path, tmp_path: Path, s3_bucket: str) -> None:
    inputs = [str(shared_data / f"{s}.h5ad") for s in SMALL]
    args = ["--obs-columns", "cell_type", "--no-progress", "--rows-per-shard", "300"]
    local, url = tmp_path / "local", f"s3://{s3_bucket}/stores/real"
    ingest([*inputs, "-o", str(local), *args])
    ingest([*inputs, "-o", url, *args])
    a, b = ZarrCellStore(local), ZarrCellStore(url)
    assert b.num_rows == a.num_rows == 1822 and b.index.num_shards == a.index.num_shards > 2
    ma, mb = _all_rows(a), _all_rows(b)
    assert (ma != mb).nnz == 0 and ma.nnz > 0
    assert list(a.obs_values("cell_type")) == list(b.obs_values("cell_type"))
    # a random scatter of rows (the loader's access pattern): the same rows, row for row
    rows = np.unique(np.random.default_rng(0).choice(a.num_rows, 500, replace=False))
    assert (a.read_rows(rows).to_scipy() != b.read_rows(rows).to_scipy()).nnz == 0
    assert validate_store(url) == ([], [])
    s = summarize(url)
    assert s["num_rows"] == 1822 and s["disk_bytes"] > 0


def test_append_conditional_commit_and_rerun(store_h5ad: list[Path], s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/s"
    ingest([str(store_h5ad[0]), "-o", url, "--no-progress", "--dataset-name", "one"])
    with pytest.raises(SclabelError, match="already exists"):
        ingest([str(store_h5ad[1]), "-o", url, "--no-progress"])
    ingest([str(store_h5ad[1]), "-o", url, "--append", "--no-progress", "--dataset-name", "two"])
    index = fmt.read_index(url)
    assert [d.name for d in index.datasets] == ["one", "two"]
    assert all(s.path.rsplit(".", 1)[-1] for s in index.shards)
    assert validate_store(url) == ([], [])


def test_losing_writer_commits_nothing(store_h5ad: list[Path], s3_bucket: str, tmp_path: Path) -> None:
    """Two appends read the same index.json; the one committing second gets the conditional put's 412."""
    from data_tools import remote_store
    from data_tools.ingest import IngestOptions, build_parser
    from data_tools.ingest import ingest as run_ingest

    url = f"s3://{s3_bucket}/race"
    ingest([str(store_h5ad[0]), "-o", url, "--no-progress", "--dataset-name", "base"])
    stale_index, stale_version = remote_store.read_index_versioned(as_path(url))
    ingest([str(store_h5ad[1]), "-o", url, "--append", "--no-progress", "--dataset-name", "winner"])
    before = (as_path(url) / fmt.INDEX_FILE).read_bytes()
    # The loser: an append that read index.json before the winner committed (its version is stale).
    real = remote_store.read_index_versioned
    remote_store.read_index_versioned = lambda store: (stale_index, stale_version)
    try:
        args = build_parser().parse_args(
            [str(store_h5ad[1]), "-o", url, "--append", "--no-progress", "--dataset-name", "loser"]
        )
        with pytest.raises(SclabelError, match="another writer committed"):
            run_ingest(IngestOptions(**vars(args)))
    finally:
        remote_store.read_index_versioned = real
    assert (as_path(url) / fmt.INDEX_FILE).read_bytes() == before
    assert not list((as_path(url) / fmt.SHARDS_DIR / "loser").rglob("*"))  # its uploads removed
    assert validate_store(url) == ([], [])


def test_validate_names_corrupted_and_missing_objects(store_h5ad: list[Path], s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/bad"
    ingest([str(store_h5ad[0]), "-o", url, "--no-progress", "--rows-per-shard", "100"])
    index = fmt.read_index(url)
    root = as_path(url)
    data_file = next(o for o in (root / index.shards[0].path / fmt.DATA).rglob("*") if o.name != "zarr.json")
    raw = bytearray(data_file.read_bytes())
    raw[20] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    gone = next(o for o in (root / index.shards[1].path / fmt.INDICES).rglob("*") if o.name != "zarr.json")
    gone.unlink()
    problems, _ = validate_store(url)
    text = "\n".join(problems)
    assert index.shards[0].path in text and "checksum mismatch" in text
    assert index.shards[1].path in text
    r = subprocess.run(
        [sys.executable, "-m", "data_tools", "validate", url], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and "INVALID" in r.stdout and "Traceback" not in r.stderr
    # the loader names the object: the corrupt chunk on read, the missing shard file
    store = ZarrCellStore(url)
    with pytest.raises(SclabelError, match=r"crc32c|missing"):
        _all_rows(store)


def test_missing_key_is_one_line_naming_it(s3_bucket: str) -> None:
    with pytest.raises(SclabelError, match=rf"s3://{s3_bucket}/nothing: not a cell store"):
        ZarrCellStore(f"s3://{s3_bucket}/nothing")
    with pytest.raises(SclabelError, match="credentials"):
        as_path("s3://KEY:SECRET@bucket/x")


def test_no_secret_written_anywhere(store_h5ad: list[Path], s3_bucket: str, tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}/nosecret"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools",
            "ingest",
            str(store_h5ad[0]),
            "-o",
            url,
            "--tmp-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert SECRET not in r.stdout + r.stderr
    for obj in _objects(url):
        assert SECRET.encode() not in obj.read_bytes(), obj
    for f in tmp_path.rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f
    assert "AWS" not in json.dumps(fmt.read_index(url).to_dict())


def test_overwrite_replaces_and_removes_old_objects(store_h5ad: list[Path], s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/ow"
    ingest(
        [str(store_h5ad[0]), "-o", url, "--no-progress", "--dataset-name", "old", "--rows-per-shard", "200"]
    )
    ingest([str(store_h5ad[1]), "-o", url, "--no-progress", "--dataset-name", "new", "--overwrite"])
    assert [d.name for d in fmt.read_index(url).datasets] == ["new"]
    assert not list((as_path(url) / fmt.SHARDS_DIR / "old").rglob("*"))
    assert not (as_path(url) / fmt.REPORTS_DIR / "old.json").is_file()
    assert validate_store(url) == ([], [])
    (as_path(url) / "notes.txt").write_bytes(b"someone else's")
    with pytest.raises(SclabelError, match="did not write"):
        ingest([str(store_h5ad[1]), "-o", url, "--no-progress", "--overwrite"])


def test_concurrent_readers_fetch_each_shard_index_once(
    store_h5ad: list[Path], s3_bucket: str, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reader threads starting together on cold shard indexes (a stream's first windows) share the fetches."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from sclabel_dist.data.stores import location

    from .proxy import FaultyProxy

    url = f"s3://{s3_bucket}/shared-index"
    ingest([str(store_h5ad[0]), "-o", url, "--no-progress", "--rows-per-shard", "100"])
    shard_files = [o for o in _objects(url) if f"/{fmt.INDICES}/c" in str(o) or f"/{fmt.DATA}/c" in str(o)]
    # 50 ms per request: the three readers all look for the indexes before the first one arrives
    proxy = FaultyProxy(moto_endpoint, delay_s=0.05)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.start())
    try:
        store = ZarrCellStore(url)
        rows = np.arange(store.num_rows)
        start = threading.Barrier(3)

        def read(_: int):
            start.wait()
            return store.read_rows(rows).to_scipy()

        location.reset_stats()
        with ThreadPoolExecutor(3) as pool:
            blocks = list(pool.map(read, range(3)))
        requests = location.stats()["requests"]
    finally:
        proxy.stop()
    assert len(shard_files) >= 12 and all((b != blocks[0]).nnz == 0 for b in blocks)
    # each shard file: its index fetched once, its byte ranges once per reader (one get_ranges each)
    assert requests == len(shard_files) * (1 + 3), (requests, len(shard_files))
