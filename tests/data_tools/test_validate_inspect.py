"""validate finds and names corrupted, truncated or missing shards and index inconsistencies; inspect summarises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from h1_builders import make_adata, run_cli, write_h5ad

from data_tools.ingest import main as ingest
from data_tools.inspect import summarize
from data_tools.validate import validate_store
from sclabel_dist.data import format as fmt


@pytest.fixture
def store(tmp_path: Path) -> Path:
    src = write_h5ad(tmp_path / "a.h5ad", make_adata(60))
    out = tmp_path / "store"
    ingest(
        [str(src), "-o", str(out), "--rows-per-shard", "25", "--obs-columns", "cell_type", "--no-progress"]
    )
    return out


def _chunk_file(store: Path, shard: str, array: str) -> Path:
    return next(
        p for p in sorted((store / shard / array).rglob("*")) if p.is_file() and p.name != "zarr.json"
    )


def test_valid_store_and_inspect(store: Path) -> None:
    assert validate_store(store) == ([], [])
    s = summarize(store)
    assert (
        s["num_rows"] == 60
        and s["num_shards"] == 3
        and s["shard_rows"] == {"min": 10, "max": 25, "mean": 20.0}
    )
    assert s["obs_columns"] == {"cell_type": 3} and s["datasets"][0]["match"]["fraction_counts"] == 1.0
    proc = run_cli("inspect", str(store), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["nnz"] == s["nnz"]
    assert run_cli("validate", str(store)).returncode == 0


def test_flipped_byte_is_named(store: Path) -> None:
    f = _chunk_file(store, "shards/a/part_00001", "data")
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    problems, _ = validate_store(store)
    assert problems and all("shards/a/part_00001" in p for p in problems)
    assert any("checksum mismatch" in p for p in problems)
    proc = run_cli("validate", str(store))
    assert proc.returncode == 1 and "shards/a/part_00001" in proc.stdout


def test_truncated_and_missing_shard(store: Path) -> None:
    f = _chunk_file(store, "shards/a/part_00002", "indices")
    f.write_bytes(f.read_bytes()[:10])
    problems, _ = validate_store(store)
    assert any("part_00002" in p for p in problems)
    problems, _ = validate_store(store, checksums=False)  # structure alone also catches the truncation
    assert any("part_00002" in p and "unreadable" in p for p in problems)
    import shutil

    shutil.rmtree(store / "shards/a/part_00000")
    assert any("part_00000: missing" in p for p in validate_store(store)[0])


def test_index_inconsistency(store: Path) -> None:
    raw = json.loads((store / fmt.INDEX_FILE).read_text())
    raw["shards"][1]["num_rows"] += 1
    (store / fmt.INDEX_FILE).write_text(json.dumps(raw))
    problems, _ = validate_store(store, checksums=False)
    assert any("part_00001: indptr" in p for p in problems)
    assert any("num_rows/nnz" in p for p in problems)


def test_not_a_store(tmp_path: Path) -> None:
    problems, _ = validate_store(tmp_path)
    assert problems and "no index.json" in problems[0]
    assert run_cli("validate", str(tmp_path / "nothing")).returncode == 1
