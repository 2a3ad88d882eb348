"""Ingest of real sets from ../shared/data: union vocabulary, case-insensitive and Ensembl matching, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from h1_builders import shard_rows

from data_tools.ingest import main as ingest
from data_tools.validate import validate_store
from sclabel_dist.data import format as fmt
from sclabel_dist.vocab import GeneVocab, remap_csr

pytestmark = pytest.mark.shared_data

SETS = ["baron_mouse1_pancreas", "zilionis_mouse_lung", "pbmc_facs_zheng_fasttopics"]


def test_real_sets_into_one_corpus(shared_data: Path, tmp_path: Path) -> None:
    store = tmp_path / "corpus"
    inputs = [str(shared_data / f"{s}.h5ad") for s in SETS]
    ingest([*inputs, "-o", str(store), "--obs-columns", "cell_type", "--min-cells", "3", "--no-progress"])
    index = fmt.read_index(store)
    assert [d.name for d in index.datasets] == SETS
    kinds = {d.name: d.value_kind for d in index.datasets}
    assert kinds == {
        "baron_mouse1_pancreas": "counts",
        "zilionis_mouse_lung": "lognorm",
        "pbmc_facs_zheng_fasttopics": "counts",
    }
    assert validate_store(store)[0] == []
    for name in SETS:
        report = json.loads((store / "reports" / f"{name}.json").read_text())
        assert report["fraction_counts"] > 0.99  # genes seen in < 3 cells carry almost nothing
    # rows read back == the .h5ad after vocabulary mapping
    vocab = GeneVocab.from_json(store / fmt.VOCAB_FILE)
    adata = ad.read_h5ad(shared_data / "pbmc_facs_zheng_fasttopics.h5ad")
    want = remap_csr(adata.X, vocab.match(list(adata.var_names), list(adata.var["ensembl"])))
    shards = [s for s in index.shards if s.dataset == "pbmc_facs_zheng_fasttopics"]
    got = [shard_rows(store, s) for s in shards]
    import scipy.sparse as sp

    assert abs(sp.vstack(got) - want).sum() == 0
    codes = np.concatenate([fmt.read_obs_codes(store, s, "cell_type") for s in shards])
    assert list(np.array(index.obs_columns["cell_type"])[codes]) == list(adata.obs["cell_type"].astype(str))


def test_upper_case_mouse_symbols_match_mouse_vocab(shared_data: Path, tmp_path: Path) -> None:
    """zilionis has upper-case mouse symbols: against a vocabulary built from baron (Xkr4 style) they still match."""
    ingest([str(shared_data / "baron_mouse1_pancreas.h5ad"), "-o", str(tmp_path / "b"), "--no-progress"])
    ingest(
        [
            str(shared_data / "zilionis_mouse_lung.h5ad"),
            "-o",
            str(tmp_path / "b"),
            "--append",
            "--min-match",
            "0.3",
            "--no-progress",
        ]
    )
    report = json.loads((tmp_path / "b" / "reports" / "zilionis_mouse_lung.json").read_text())
    assert report["matched_by_symbol"] > 10000 and report["fraction_counts"] > 0.6
