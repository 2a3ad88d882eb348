"""Bad inputs: one clear line naming the file and row / key / gene, exit code 2, and no store left behind."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from h1_builders import GENES, counts_matrix, make_adata, run_cli, write_10x, write_h5ad

from data_tools.ingest import main as ingest
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab


def _float_adata(value: float, row: int = 7):
    adata = make_adata(20)
    X = adata.X.toarray().astype(np.float32)
    X[row, 5] = value
    adata.X = sp.csr_matrix(X)
    return adata


def _fails(tmp_path: Path, args: list[str], pattern: str) -> None:
    store = tmp_path / "store"
    with pytest.raises(SclabelError, match=pattern):
        ingest([*args, "-o", str(store), "--no-progress"])
    assert not store.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".store")]  # no temp dir left either


@pytest.mark.parametrize(
    ("value", "what"), [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-2.0, "negative")]
)
def test_bad_values_name_file_and_row(tmp_path: Path, value: float, what: str) -> None:
    src = write_h5ad(tmp_path / "bad.h5ad", _float_adata(value))
    _fails(tmp_path, [str(src)], rf"bad\.h5ad: row 7: {what}")


def test_non_integer_declared_counts(tmp_path: Path) -> None:
    src = write_h5ad(tmp_path / "frac.h5ad", _float_adata(0.5, row=11))
    _fails(
        tmp_path,
        [str(src), "--value-kind", "counts"],
        r"frac\.h5ad: row 11: non-integer value declared as counts",
    )


def test_empty_and_truncated_files(tmp_path: Path) -> None:
    (tmp_path / "empty.h5ad").write_bytes(b"")
    _fails(tmp_path, [str(tmp_path / "empty.h5ad")], r"empty\.h5ad: empty file")
    good = write_h5ad(tmp_path / "good.h5ad", make_adata(200))
    data = good.read_bytes()
    (tmp_path / "trunc.h5ad").write_bytes(data[: len(data) // 2])
    _fails(tmp_path, [str(tmp_path / "trunc.h5ad")], r"trunc\.h5ad: .*(truncated|unreadable)")
    d = write_10x(tmp_path / "tenx", counts_matrix(30, len(GENES)), GENES, GENES, gz=True)
    raw = gzip.decompress((d / "matrix.mtx.gz").read_bytes())
    (d / "matrix.mtx.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    _fails(tmp_path, [str(d)], r"matrix\.mtx\.gz: .*(truncated|malformed)")


def test_missing_layer_and_obs_column(tmp_path: Path) -> None:
    src = write_h5ad(tmp_path / "a.h5ad", make_adata(10))
    _fails(tmp_path, [str(src), "--layer", "spliced"], r"a\.h5ad: layer 'spliced' not found")
    _fails(tmp_path, [str(src), "--obs-columns", "cell_type,donor"], r"a\.h5ad: obs column 'donor' not found")
    _fails(tmp_path, [str(src), "--use-raw"], r"a\.h5ad: --use-raw given but the file has no raw/X")


def test_poor_gene_match_refused_with_advice(tmp_path: Path) -> None:
    GeneVocab.from_genes(["Gene0"] + [f"Other{i}" for i in range(50)]).to_json(tmp_path / "v.json")
    src = write_h5ad(tmp_path / "a.h5ad", make_adata(10))
    _fails(
        tmp_path,
        [str(src), "--vocab", str(tmp_path / "v.json")],
        r"a\.h5ad: genes matching .* lower --min-match",
    )
    store = tmp_path / "ok"
    ingest(
        [str(src), "--vocab", str(tmp_path / "v.json"), "--min-match", "0", "-o", str(store), "--no-progress"]
    )
    assert store.is_dir()


def test_cli_one_line_exit_2_and_existing_store(tmp_path: Path) -> None:
    src = write_h5ad(tmp_path / "bad.h5ad", _float_adata(np.nan))
    proc = run_cli("ingest", str(src), "-o", str(tmp_path / "s"), "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "bad.h5ad: row 7" in proc.stderr
    good = write_h5ad(tmp_path / "good.h5ad", make_adata(10))
    assert run_cli("ingest", str(good), "-o", str(tmp_path / "s"), "--no-progress").returncode == 0
    proc = run_cli("ingest", str(good), "-o", str(tmp_path / "s"), "--no-progress")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = run_cli("ingest", str(good), "-o", str(tmp_path / "s"), "--append", "--no-progress")
    assert proc.returncode == 2 and "already in the store" in proc.stderr


def test_value_kind_decisions(tmp_path: Path) -> None:
    from sclabel_dist.data import format as fmt

    def kind(adata, *extra: str) -> str:
        src = write_h5ad(tmp_path / "k.h5ad", adata)
        store = tmp_path / "k"
        ingest([str(src), "-o", str(store), "--overwrite", "--no-progress", *extra])
        return fmt.read_index(store).datasets[0].value_kind

    assert kind(make_adata(10)) == "counts"  # integers, no hint
    assert kind(make_adata(10), "--value-kind", "lognorm") == "lognorm"
    assert kind(_float_adata(0.5)) == "lognorm"  # fractional values, no hint
    hinted = make_adata(10)
    hinted.uns["X_is_integer_counts"] = False
    assert kind(hinted) == "lognorm"  # the file's word wins over integer-looking values
    lying = _float_adata(0.5, row=4)
    lying.uns["X_is_integer_counts"] = True
    with pytest.raises(SclabelError, match=r"k\.h5ad: row 4: non-integer"):
        kind(lying)
