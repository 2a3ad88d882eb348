"""GeneVocab: token ids, JSON and hash, matching rules (case, Ensembl versions, both columns, duplicates), remap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from data_tools.vocab_build import build_vocab_from_union
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import CLS_ID, NUM_SPECIAL, PAD_ID, GeneVocab, remap_csr


def test_special_tokens_json_and_hash(tmp_path: Path) -> None:
    assert (PAD_ID, CLS_ID, NUM_SPECIAL) == (0, 1, 2)
    v = GeneVocab.from_genes(["A", "B", "C"], ["ENSG00000000001", None, None])
    assert len(v) == 3 and v.num_tokens == 5 and v.token_id("b") == 3
    v.to_json(tmp_path / "v.json")
    w = GeneVocab.from_json(tmp_path / "v.json")
    assert w.hash == v.hash and w.genes == v.genes and w.ensembl == v.ensembl
    assert GeneVocab.from_genes(["A", "C", "B"]).hash != v.hash
    with pytest.raises(SclabelError, match="not in vocabulary"):
        v.token_id("ZZZ")


def test_from_json_rejects_edited_file(tmp_path: Path) -> None:
    v = GeneVocab.from_genes(["A", "B"])
    v.to_json(tmp_path / "v.json")
    (tmp_path / "v.json").write_text((tmp_path / "v.json").read_text().replace('"B"', '"X"'))
    with pytest.raises(SclabelError, match="hash mismatch"):
        GeneVocab.from_json(tmp_path / "v.json")
    with pytest.raises(SclabelError, match="not found"):
        GeneVocab.from_json(tmp_path / "missing.json")


def test_match_case_insensitive_symbols() -> None:
    v = GeneVocab.from_genes(["XKR4", "Rp1", "SOX17"])
    m = v.match(["Xkr4", "RP1", "sox17", "Unknown"])
    assert m.column_to_gene.tolist() == [0, 1, 2, -1]
    assert (m.num_matched, m.num_total, m.matched_by_symbol) == (3, 4, 3)


def test_match_ensembl_versions_and_both_columns() -> None:
    v = GeneVocab.from_genes(["TP53", "EGFR", "MYC"], ["ENSG00000141510", "ENSG00000146648.17", None])
    # var names are versioned Ensembl IDs
    m = v.match(["ENSG00000141510.12", "ENSG00000146648", "ENSG00000999999"])
    assert m.column_to_gene.tolist() == [0, 1, -1] and m.matched_by_ensembl == 2
    # symbols in var_names plus an ensembl column: Ensembl wins, symbol is the fallback
    m = v.match(["p53_alias", "EGFR", "myc"], ["ENSG00000141510.3", None, "ENSG00000000000"])
    assert m.column_to_gene.tolist() == [0, 1, 2]
    assert (m.matched_by_ensembl, m.matched_by_symbol) == (1, 2)


def test_duplicates_first_kept_and_reported() -> None:
    v = GeneVocab.from_genes(["A", "B"])
    m = v.match(["a", "B", "A", "C"])
    assert m.column_to_gene.tolist() == [0, 1, -1, -1]
    assert m.duplicate_columns.tolist() == [2]
    r = m.report(np.array([1.0, 2.0, 3.0, 4.0]))
    assert r["genes_matched"] == 2 and r["genes_total"] == 4 and r["duplicates_dropped"] == 1
    assert r["duplicate_examples"] == ["A"] and r["unmatched_examples"] == ["C"]
    assert r["fraction_counts"] == pytest.approx(0.3)
    assert r["top_unmatched_by_counts"][0] == ["C", 4.0]


def test_remap_csr_matches_dense_mapping() -> None:
    rng = np.random.default_rng(0)
    X = sp.random(20, 6, density=0.5, format="csr", random_state=1)
    X.data = rng.integers(1, 9, X.nnz).astype(np.float32)
    v = GeneVocab.from_genes(["G5", "G0", "G3", "NEW"])
    m = v.match([f"g{i}" for i in range(6)])
    out = remap_csr(X, m)
    want = np.zeros((20, 4), np.float32)
    for col, gene in enumerate(m.column_to_gene):
        if gene >= 0:
            want[:, gene] = X.toarray()[:, col]
    assert out.shape == (20, 4) and out.has_sorted_indices
    np.testing.assert_array_equal(out.toarray(), want)
    assert (out.data != 0).all()


def test_union_vocab_merges_ensembl_and_symbols_with_min_cells() -> None:
    a = (["ENSG00000141510", "ENSG00000146648"], None, np.array([5, 0]))
    b = (["TP53", "Xkr4"], ["ENSG00000141510.2", None], np.array([1, 2]))
    c = (["XKR4", "Lone"], None, np.array([1, 1]))
    v = build_vocab_from_union([a, b, c], min_cells=2)
    assert v.genes == ["TP53", "Xkr4"]  # EGFR-only ID has 0 cells, Lone 1 cell: both dropped
    assert v.ensembl[0] == "ENSG00000141510"  # first seen ID kept
    for names, ens, _ in (a, b, c):
        m = v.match(names, ens)
        assert m.num_duplicates == 0
    assert v.match(["xkr4"]).column_to_gene.tolist() == [1]
