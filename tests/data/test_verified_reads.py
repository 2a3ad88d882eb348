"""The loader reads only what was written: bit flips and lost chunks are errors naming the shard (issue 19, item 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sclabel_dist.config import DataConfig, TokenizeConfig
from sclabel_dist.data.dataset import build_dataset
from sclabel_dist.data.stores.zarr_store import ZarrCellStore
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab

FLIPS = 40  # per file, as in the reproduction


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, sp.csr_matrix]:
    from data_tools.writer import StoreWriter

    rng = np.random.default_rng(0)
    m = sp.random(3000, 500, density=0.03, format="csr", random_state=0, dtype=np.float32)
    m.data = rng.integers(1, 300, m.nnz).astype(np.float32)  # uint16 counts: every byte of data matters
    path = tmp_path_factory.mktemp("verified") / "store"
    vocab = GeneVocab([f"G{i}" for i in range(500)])
    with StoreWriter(path, vocab, "ds", value_kind="counts", rows_per_shard=3000) as w:
        w.write_block(m)
    return path, m


def _read_all(path: Path) -> np.ndarray:
    s = ZarrCellStore(path)
    try:
        return s.read_rows(np.arange(s.num_rows)).to_scipy().toarray()
    finally:
        s.close()


@pytest.mark.parametrize("array", ["indices", "data", "indptr"])
def test_single_bit_flips_never_read_as_values(
    store: tuple[Path, sp.csr_matrix], tmp_path: Path, array: str
) -> None:
    src, m = store
    np.testing.assert_array_equal(_read_all(src), m.toarray())
    rel = Path("shards/ds/part_00000") / array / "c" / "0"
    size = (src / rel).stat().st_size
    rng = np.random.default_rng(1)
    wrong = []
    for k in range(FLIPS):
        copy = tmp_path / f"s{k}"
        shutil.copytree(src, copy)
        pos, bit = int(rng.integers(size)), int(rng.integers(8))
        raw = bytearray((copy / rel).read_bytes())
        raw[pos] ^= 1 << bit
        (copy / rel).write_bytes(bytes(raw))
        try:
            got = _read_all(copy)
        except SclabelError as exc:
            assert "part_00000" in str(exc)  # names the shard
            continue
        if not np.array_equal(got, m.toarray()):
            wrong.append((pos, bit))
        shutil.rmtree(copy)
    assert not wrong, f"{len(wrong)} of {FLIPS} flips in {array} read back as wrong values: {wrong[:5]}"


def test_deleted_chunk_file_is_an_error_naming_it(store: tuple[Path, sp.csr_matrix], tmp_path: Path) -> None:
    src, _ = store
    copy = tmp_path / "s"
    shutil.copytree(src, copy)
    (copy / "shards/ds/part_00000/data/c/0").unlink()
    with pytest.raises(SclabelError, match=r"part_00000/data/c/0: shard file missing"):
        _read_all(copy)


def test_training_loader_stops_on_a_corrupt_shard(store: tuple[Path, sp.csr_matrix], tmp_path: Path) -> None:
    """Through the reader threads: the epoch raises instead of training on garbage."""
    src, _ = store
    copy = tmp_path / "s"
    shutil.copytree(src, copy)
    f = copy / "shards/ds/part_00000/data/c/0"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    f.write_bytes(bytes(raw))
    data = DataConfig(stores=[str(copy)], batch_size=64, chunk_size=64, read_threads=2)
    ds = build_dataset(data, TokenizeConfig(max_len=64), rank=0, world_size=1, seed=0, raw=True)
    try:
        with pytest.raises(SclabelError, match="crc32c"):
            for i, _ in enumerate(ds):
                assert i < 100, "two epochs read without noticing the corrupt chunk"
    finally:
        ds.close()


def test_store_without_chunk_checksums_is_verified_whole_once(tmp_path: Path, monkeypatch) -> None:
    """A store from the writer before per-chunk crc32c: its shards' sha256 are checked at first open and
    remembered by size and mtime; a changed shard is hashed again and refused."""
    from zarr.codecs import BloscCodec

    from data_tools import writer
    from data_tools.writer import StoreWriter
    from sclabel_dist.data.stores import verify

    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(writer, "_compressor", lambda name, kind: BloscCodec(cname="lz4", shuffle="shuffle"))
    m = sp.random(500, 100, density=0.1, format="csr", random_state=0, dtype=np.float32)
    m.data = np.ceil(m.data * 50)
    path = tmp_path / "old"
    with StoreWriter(path, GeneVocab([f"G{i}" for i in range(100)]), "ds", value_kind="counts") as w:
        w.write_block(m)
    np.testing.assert_array_equal(_read_all(path), m.toarray())
    cached = verify.cache_file().read_text()
    assert "part_00000" in cached
    np.testing.assert_array_equal(_read_all(path), m.toarray())  # second open: from the cache
    f = path / "shards/ds/part_00000/data/c/0"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    f.write_bytes(bytes(raw))
    with pytest.raises(SclabelError, match=r"part_00000: shard checksum mismatch"):
        _read_all(path)
