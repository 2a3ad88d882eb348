"""StoreWriter and format.py: sizing, dtypes, shard splitting, obs categories, append / overwrite / abort."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from h1_builders import shard_rows

from data_tools.writer import StoreWriter
from sclabel_dist.data import format as fmt
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab

VOCAB = GeneVocab.from_genes([f"G{i}" for i in range(30)])


def _block(n: int, seed: int, scale: float = 10.0) -> sp.csr_matrix:
    m = sp.random(n, len(VOCAB), density=0.3, format="csr", random_state=seed)
    m.data = np.ceil(m.data * scale)
    return m


def test_sizing_and_dtypes() -> None:
    assert fmt.indices_dtype(65535) == np.uint16 and fmt.indices_dtype(65536) == np.uint32
    assert [fmt.counts_dtype(v) for v in (255, 256, 70000)] == [np.uint8, np.uint16, np.uint32]
    assert fmt.data_dtype("lognorm", 3.2) == np.float32
    assert fmt.chunk_elements(1500) == 1 << 17 and fmt.chunk_elements(1) == fmt.MIN_CHUNK
    assert fmt.shard_elements(1500) == fmt.chunk_elements(1500) * fmt.SHARD_CHUNKS
    assert fmt.rows_per_part(1500) == fmt.PART_NNZ // 1500


def test_blocks_split_into_parts_and_read_back(tmp_path: Path) -> None:
    blocks = [_block(n, s, 300.0) for s, n in enumerate([7, 30, 1, 12])]
    labels = [np.array(["x", "y", None][:1] * n, dtype=object) for n in (7, 30, 1, 12)]
    with StoreWriter(
        tmp_path / "s", VOCAB, "d", value_kind="counts", obs_columns=["t"], rows_per_shard=20
    ) as w:
        for b, lab in zip(blocks, labels, strict=True):
            w.write_block(b, {"t": lab})
    index = fmt.read_index(tmp_path / "s")
    assert [s.num_rows for s in index.shards] == [20, 20, 10] and index.shards[2].row_offset == 40
    assert all(s.data_dtype == "uint16" for s in index.shards)  # max 300 > 255
    got = sp.vstack([shard_rows(tmp_path / "s", s) for s in index.shards])
    assert abs(got - sp.vstack(blocks)).sum() == 0
    middle = shard_rows(tmp_path / "s", index.shards[1], 3, 9)
    assert abs(middle - sp.vstack(blocks)[23:29]).sum() == 0
    assert index.obs_columns == {"t": ["x"]}
    assert fmt.read_obs_codes(tmp_path / "s", index.shards[0], "t").tolist() == [0] * 20
    assert fmt.read_obs_codes(tmp_path / "s", index.shards[0], "absent").tolist() == [-1] * 20


def test_obs_missing_values_and_category_extension(tmp_path: Path) -> None:
    store = tmp_path / "s"
    with StoreWriter(store, VOCAB, "a", value_kind="counts", obs_columns=["t"]) as w:
        w.write_block(_block(3, 0), {"t": np.array(["B", None, "A"], dtype=object)})
    with StoreWriter(store, VOCAB, "b", value_kind="lognorm", obs_columns=["t"], mode="append") as w:
        w.write_block(_block(2, 1) / 7, {"t": np.array(["C", "A"], dtype=object)})
    index = fmt.read_index(store)
    assert index.obs_columns["t"] == ["B", "A", "C"]
    assert fmt.read_obs_codes(store, index.shards[0], "t").tolist() == [0, -1, 1]
    assert fmt.read_obs_codes(store, index.shards[1], "t").tolist() == [2, 1]
    assert index.shards[1].data_dtype == "float32" and index.datasets[1].value_kind == "lognorm"


def test_modes_and_abort(tmp_path: Path) -> None:
    store = tmp_path / "s"
    with StoreWriter(store, VOCAB, "a", value_kind="counts") as w:
        w.write_block(_block(4, 0))
    with pytest.raises(SclabelError, match="already exists"):
        StoreWriter(store, VOCAB, "b", value_kind="counts")
    with pytest.raises(SclabelError, match="vocabulary hash"):
        StoreWriter(store, GeneVocab.from_genes(["X"]), "b", value_kind="counts", mode="append")
    before = (store / fmt.INDEX_FILE).read_text()
    with pytest.raises(RuntimeError), StoreWriter(store, VOCAB, "b", value_kind="counts", mode="append") as w:
        w.write_block(_block(4, 1))
        raise RuntimeError("boom")
    assert (store / fmt.INDEX_FILE).read_text() == before
    assert sorted(p.name for p in (store / fmt.SHARDS_DIR).iterdir()) == ["a"]
    with StoreWriter(store, VOCAB, "new", value_kind="counts", mode="overwrite") as w:
        w.write_block(_block(2, 2))
    assert [d.name for d in fmt.read_index(store).datasets] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_wrong_columns_and_version(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s", VOCAB, "a", value_kind="counts") as w:
        with pytest.raises(SclabelError, match="columns"):
            w.write_block(sp.csr_matrix((2, 5)))
        w.write_block(_block(2, 0))
    raw = json.loads((tmp_path / "s" / fmt.INDEX_FILE).read_text())
    raw["format_version"] = 99
    (tmp_path / "s" / fmt.INDEX_FILE).write_text(json.dumps(raw))
    with pytest.raises(SclabelError, match="format_version 99 is not supported"):
        fmt.read_index(tmp_path / "s")
