"""Round trips: every input kind ingested, rows read back equal the input after vocabulary mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
from h1_builders import (
    ENSEMBL,
    GENES,
    counts_matrix,
    expected,
    make_adata,
    read_dataset,
    read_obs,
    write_10x,
    write_h5ad,
)

from data_tools.ingest import main as ingest
from data_tools.validate import validate_store
from sclabel_dist.data import format as fmt
from sclabel_dist.vocab import GeneVocab


def _same(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    return a.shape == b.shape and abs(a.astype(np.float64) - b.astype(np.float64)).sum() == 0


def test_h5ad_sparse_round_trip_with_obs(tmp_path: Path) -> None:
    adata = make_adata(50)
    src = write_h5ad(tmp_path / "a.h5ad", adata)
    store = tmp_path / "store"
    assert (
        ingest(
            [
                str(src),
                "-o",
                str(store),
                "--obs-columns",
                "cell_type,batch",
                "--rows-per-shard",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )
    index = fmt.read_index(store)
    assert (
        index.num_rows == 50
        and index.num_shards == 4
        and [s.num_rows for s in index.shards] == [16, 16, 16, 2]
    )
    assert index.shards[0].data_dtype == "uint8" and index.shards[0].indices_dtype == "uint16"
    assert _same(read_dataset(store, "a"), expected(store, adata.X, GENES, ENSEMBL))
    assert read_obs(store, "a", "cell_type") == list(adata.obs["cell_type"].astype(str))
    assert read_obs(store, "a", "batch") == list(adata.obs["batch"])
    assert validate_store(store) == ([], [])
    assert (store / "reports" / "a.json").is_file()


def test_h5ad_dense_and_layers_and_raw(tmp_path: Path) -> None:
    adata = make_adata(30, dense=True)
    counts = adata.X.copy()
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.X = np.log1p(counts).astype(np.float32)  # X is log-normalised: default picks layers["counts"]
    adata.raw = adata.copy()
    src = write_h5ad(tmp_path / "d.h5ad", adata)
    ingest([str(src), "-o", str(tmp_path / "s1"), "--no-progress"])
    assert fmt.read_index(tmp_path / "s1").datasets[0].value_kind == "counts"
    assert _same(read_dataset(tmp_path / "s1", "d"), expected(tmp_path / "s1", counts, GENES, ENSEMBL))
    # --layer counts explicitly, and the raw (log values -> lognorm, stored as float32)
    ingest([str(src), "-o", str(tmp_path / "s2"), "--layer", "counts", "--no-progress"])
    assert _same(read_dataset(tmp_path / "s2", "d"), expected(tmp_path / "s2", counts, GENES, ENSEMBL))
    ingest([str(src), "-o", str(tmp_path / "s3"), "--use-raw", "--no-progress"])
    idx3 = fmt.read_index(tmp_path / "s3")
    assert idx3.datasets[0].value_kind == "lognorm" and idx3.shards[0].data_dtype == "float32"
    got = read_dataset(tmp_path / "s3", "d").toarray()
    want = expected(tmp_path / "s3", adata.X, GENES, ENSEMBL).toarray()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_10x_gz_and_plain(tmp_path: Path) -> None:
    X = counts_matrix(37, len(GENES), seed=3)
    for gz, v3 in ((True, True), (False, False)):
        d = write_10x(tmp_path / f"tenx_{gz}", X, GENES, ENSEMBL, gz=gz, version3=v3)
        store = tmp_path / f"store_{gz}"
        ingest([str(d), "-o", str(store), "--obs-columns", "barcode", "--no-progress"])
        assert _same(read_dataset(store, d.name), expected(store, X, GENES, ENSEMBL))
        assert read_obs(store, d.name, "barcode")[:2] == ["AAAC-0", "AAAC-1"]


def test_10x_many_blocks(tmp_path: Path, monkeypatch) -> None:
    import data_tools.readers.tenx as tenx

    monkeypatch.setattr(tenx, "_BLOCK_ENTRIES", 64)  # force several spill blocks on a tiny file
    monkeypatch.setattr(tenx, "_PARSE_ENTRIES", 50)
    X = counts_matrix(60, len(GENES), seed=4)
    d = write_10x(tmp_path / "tenx", X, GENES, ENSEMBL, gz=True)
    ingest([str(d), "-o", str(tmp_path / "s"), "--block-rows", "7", "--no-progress"])
    assert _same(read_dataset(tmp_path / "s", "tenx"), expected(tmp_path / "s", X, GENES, ENSEMBL))


def test_soma_experiment(tmp_path: Path) -> None:
    import tiledbsoma.io

    adata = make_adata(25)
    uri = str(tmp_path / "exp")
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA")
    store = tmp_path / "store"
    ingest(
        [uri, "-o", str(store), "--obs-columns", "cell_type", "--ensembl-column", "ensembl", "--no-progress"]
    )
    assert _same(read_dataset(store, "exp"), expected(store, adata.X, GENES, ENSEMBL))
    assert read_obs(store, "exp", "cell_type") == list(adata.obs["cell_type"].astype(str))


def test_given_vocab_append_and_shuffle(tmp_path: Path) -> None:
    vocab = GeneVocab.from_genes([g.upper() for g in GENES[::-1]] + ["EXTRA"])  # other order, upper case
    vocab.to_json(tmp_path / "vocab.json")
    a, b = make_adata(40, seed=1), make_adata(33, seed=2)
    pa, pb = write_h5ad(tmp_path / "a.h5ad", a), write_h5ad(tmp_path / "b.h5ad", b)
    store = tmp_path / "store"
    ingest(
        [
            str(pa),
            "-o",
            str(store),
            "--vocab",
            str(tmp_path / "vocab.json"),
            "--obs-columns",
            "cell_type",
            "--no-progress",
        ]
    )
    before = fmt.read_index(store).shards[0]
    ingest(
        [
            str(pb),
            "-o",
            str(store),
            "--append",
            "--shuffle",
            "--seed",
            "3",
            "--obs-columns",
            "cell_type",
            "--no-progress",
        ]
    )
    index = fmt.read_index(store)
    assert index.vocab_hash == vocab.hash and [d.name for d in index.datasets] == ["a", "b"]
    assert index.shards[0] == before  # appending never rewrites another dataset's shards
    assert _same(read_dataset(store, "a"), expected(store, a.X, GENES))
    got = read_dataset(store, "b").toarray()
    want = expected(store, b.X, GENES).toarray()
    types = np.array(read_obs(store, "b", "cell_type"))
    # shuffled: the same multiset of (row, label), in another order
    key = lambda m, t: sorted(zip(map(tuple, m), t, strict=True))  # noqa: E731
    assert key(got, types) == key(want, np.array(b.obs["cell_type"].astype(str)))
    assert not np.array_equal(got, want)
    assert validate_store(store)[0] == []


def test_several_inputs_into_one_new_store(tmp_path: Path) -> None:
    a = make_adata(20, seed=5)
    X = counts_matrix(15, len(GENES), seed=6)
    pa = write_h5ad(tmp_path / "a.h5ad", a)
    d = write_10x(tmp_path / "tenx", X, [g.upper() for g in GENES], [f"{e}.3" for e in ENSEMBL], gz=False)
    store = tmp_path / "corpus"
    args = [
        str(pa),
        str(d),
        "-o",
        str(store),
        "--dataset-name",
        "one",
        "--dataset-name",
        "two",
        "--obs-columns",
        "cell_type?",
        "--no-progress",
    ]
    ingest(args)
    index = fmt.read_index(store)
    assert [x.name for x in index.datasets] == ["one", "two"] and index.num_genes == len(GENES)
    assert _same(read_dataset(store, "one"), expected(store, a.X, GENES, ENSEMBL))
    assert _same(read_dataset(store, "two"), expected(store, X, GENES))
    assert set(read_obs(store, "two", "cell_type")) == {None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad", "corpus", "tenx"]
    ingest([*args, "--overwrite", "--shuffle"])
    assert validate_store(store)[0] == []


def test_gene_column_and_versioned_ensembl_index(tmp_path: Path) -> None:
    import anndata as ad
    import pandas as pd

    X = counts_matrix(12, len(GENES), seed=8)
    var = pd.DataFrame({"symbol": [g.lower() for g in GENES]}, index=[f"{e}.7" for e in ENSEMBL])
    src = tmp_path / "v.h5ad"
    ad.AnnData(X=X, var=var).write_h5ad(src)
    GeneVocab.from_genes(GENES).to_json(tmp_path / "symbols.json")  # symbols only: needs --gene-column
    with_ids = GeneVocab.from_genes(GENES, ENSEMBL)
    with_ids.to_json(tmp_path / "ids.json")  # Ensembl IDs: the versioned var index matches as it is
    ingest(
        [
            str(src),
            "-o",
            str(tmp_path / "a"),
            "--vocab",
            str(tmp_path / "symbols.json"),
            "--gene-column",
            "symbol",
            "--no-progress",
        ]
    )
    ingest([str(src), "-o", str(tmp_path / "b"), "--vocab", str(tmp_path / "ids.json"), "--no-progress"])
    for store in (tmp_path / "a", tmp_path / "b"):
        assert _same(read_dataset(store, "v"), X)  # same gene order as the vocabulary: identity mapping


def test_ingest_options_are_the_command_line_typed() -> None:
    """The library takes IngestOptions, never the argparse Namespace; the two must not drift apart."""
    import dataclasses

    from data_tools.ingest import IngestOptions, build_parser

    parsed = vars(build_parser().parse_args(["a.h5ad", "-o", "s"]))
    fields = {f.name: f for f in dataclasses.fields(IngestOptions)}
    assert set(parsed) == set(fields)
    defaults = IngestOptions(inputs=["a.h5ad"], out="s")
    assert {k: v for k, v in parsed.items() if k not in ("inputs", "out", "dataset_name")} == {
        k: getattr(defaults, k) for k in parsed if k not in ("inputs", "out", "dataset_name")
    }
