"""sclabel-data to-soma: store / .h5ad -> SOMA round trips (rows, genes, obs, layer) and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from h1_builders import shard_rows

from data_tools import synth, to_soma
from sclabel_dist.data import format as fmt
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab

ARGS = [
    "--cells",
    "700",
    "--genes",
    "250",
    "--cell-types",
    "6",
    "--nnz-per-cell",
    "40",
    "--seed",
    "5",
    "--quiet",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("to_soma")
    synth.main([*ARGS, "--out", str(d / "s")])
    synth.main([*ARGS, "--out", str(d / "a.h5ad")])
    return d


def store_rows(store: Path) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
    index = fmt.read_index(store)
    rows = sp.vstack([shard_rows(store, s) for s in index.shards]).tocsr()
    obs = {}
    for col, cats in index.obs_columns.items():
        codes = np.concatenate([fmt.read_obs_codes(store, s, col) for s in index.shards])
        obs[col] = np.asarray(cats, dtype=object)[codes]
    return rows, obs


def read_soma(uri: Path, layer: str = "counts") -> tuple[sp.csr_matrix, object, object]:
    import tiledbsoma

    with tiledbsoma.Experiment.open(str(uri)) as exp:
        ms = exp.ms[to_soma.MEASUREMENT]
        arr = ms.X[layer]
        n, g = arr.shape
        tbl = arr.read().tables().concat()
        x = sp.csr_matrix(
            (tbl["soma_data"].to_numpy(), (tbl["soma_dim_0"].to_numpy(), tbl["soma_dim_1"].to_numpy())),
            shape=(n, g),
        )
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
        var = ms.var.read().concat().to_pandas().sort_values("soma_joinid")
    return x, obs, var


def same(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    return a.shape == b.shape and (a != b).nnz == 0


def test_store_round_trip(inputs, tmp_path):
    out = tmp_path / "exp"
    assert to_soma.main([str(inputs / "s"), "--out", str(out), "--block-rows", "300", "--quiet"]) == 0
    x, obs, var = read_soma(out)
    rows, store_obs = store_rows(inputs / "s")
    assert same(x, rows)
    vocab = GeneVocab.from_json(inputs / "s" / fmt.VOCAB_FILE)
    assert list(var["var_id"]) == vocab.genes and list(var["ensembl"]) == vocab.ensembl
    for col in synth.OBS_COLUMNS:
        np.testing.assert_array_equal(obs[col].astype(str).to_numpy(), store_obs[col].astype(str))
    assert set(obs["dataset"].astype(str)) == {"synth"}
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # the temp experiment was renamed, not left


def test_x_layout_for_row_reads(inputs, tmp_path):
    """X as the loader reads it fastest: row tiles of --row-tile cells, LZ4 on coordinates and values."""
    import tiledbsoma

    out = tmp_path / "exp"
    to_soma.main([str(inputs / "s"), "--out", str(out), "--quiet"])
    with tiledbsoma.SparseNDArray.open(str(out / "ms" / "RNA" / "X" / "counts")) as x:
        options = x.schema_config_options()
    dims, attrs = json.loads(options.dims), json.loads(options.attrs)
    assert dims["soma_dim_0"]["tile"] == "16" and options.cell_order == "row-major"
    for filters in (
        dims["soma_dim_0"]["filters"],
        dims["soma_dim_1"]["filters"],
        attrs["soma_data"]["filters"],
    ):
        assert filters[-1]["name"] == "LZ4"


def test_h5ad_round_trip_matches_store(inputs, tmp_path):
    out = tmp_path / "exp"
    assert (
        to_soma.main([str(inputs / "a.h5ad"), "--out", str(out), "--vocab", str(inputs / "s"), "--quiet"])
        == 0
    )
    x, obs, var = read_soma(out)
    rows, store_obs = store_rows(inputs / "s")
    assert same(x, rows)
    assert list(var["var_id"])[:2] == ["SYN00001", "SYN00002"]
    assert obs["obs_id"].iloc[0] == "cell_00000000"
    np.testing.assert_array_equal(obs["cell_type"].astype(str).to_numpy(), store_obs["cell_type"].astype(str))


def test_h5ad_genes_mapped_onto_vocabulary_lognorm(inputs, tmp_path):
    """Shuffled, partly unknown genes and log-normalised values: layer 'data', columns in vocabulary order."""
    import anndata as ad
    import pandas as pd

    vocab = GeneVocab.from_json(inputs / "s" / fmt.VOCAB_FILE)
    rng = np.random.default_rng(0)
    cols = rng.permutation(len(vocab))[:100]
    x = sp.random(40, 101, density=0.3, format="csr", random_state=1, dtype=np.float32)
    x.data = np.log1p(x.data * 10)
    names = [vocab.genes[c].lower() for c in cols] + ["NOT_A_GENE"]
    obs = pd.DataFrame({"label": pd.Categorical(["a", "b"] * 20)}, index=[f"c{i}" for i in range(40)])
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=names)).write_h5ad(tmp_path / "ln.h5ad")
    out = tmp_path / "exp"
    args = [str(tmp_path / "ln.h5ad"), "--out", str(out), "--vocab", str(inputs / "s" / "vocab.json")]
    assert to_soma.main([*args, "--obs-columns", "label", "--quiet"]) == 0
    got, got_obs, _ = read_soma(out, layer="data")
    expected = sp.csr_matrix((40, len(vocab)), dtype=np.float32).tolil()
    expected[:, cols] = x[:, :100]
    assert same(got, expected.tocsr())
    assert list(got_obs["label"].astype(str))[:2] == ["a", "b"]


def test_soma_output_readable_by_ingest_reader(inputs, tmp_path):
    from data_tools.readers.soma import SomaReader

    out = tmp_path / "exp"
    to_soma.main([str(inputs / "s"), "--out", str(out), "--quiet"])
    reader = SomaReader(out)
    rows, _ = store_rows(inputs / "s")
    assert reader.num_rows == 700 and reader.var_names[0] == "SYN00001"
    assert same(sp.csr_matrix(reader.read_rows(100, 200), dtype=rows.dtype), rows[100:200])
    reader.close()


def test_bad_input(tmp_path):
    with pytest.raises(SclabelError, match="not found"):
        to_soma.main([str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "e")])
    (tmp_path / "dir").mkdir()
    with pytest.raises(SclabelError, match="not a cell store"):
        to_soma.main([str(tmp_path / "dir"), "--out", str(tmp_path / "e")])
    (tmp_path / "junk.h5ad").write_bytes(b"not hdf5 at all")
    with pytest.raises(SclabelError, match="junk.h5ad"):
        to_soma.main([str(tmp_path / "junk.h5ad"), "--out", str(tmp_path / "e")])
    (tmp_path / "e").mkdir()
    with pytest.raises(SclabelError, match="already exists"):
        to_soma.main([str(tmp_path / "dir"), "--out", str(tmp_path / "e")])
    from data_tools.cli import main as cli

    assert cli(["to-soma", str(tmp_path / "missing"), "--out", str(tmp_path / "f")]) == 2
    assert not (tmp_path / "f").exists()


def test_bad_values_named_and_nothing_left(tmp_path):
    import anndata as ad

    x = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, np.nan]], dtype=np.float32))
    ad.AnnData(X=x).write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(SclabelError, match=r"nan\.h5ad: row 1: NaN"):
        to_soma.main([str(tmp_path / "nan.h5ad"), "--out", str(tmp_path / "e"), "--quiet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.h5ad"]
