"""--overwrite deletes only directories a sclabel run created, and only what it wrote (issue 19, item 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sclabel_dist.errors import SclabelError
from sclabel_dist.outdir import MARKER
from sclabel_dist.outdir import prepare_out_dir as prepare_run_dir  # what finetune and evaluate call


def _user_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mine"
    (d / "model").mkdir(parents=True)  # looks like a run directory, but the user made it
    (d / "model" / "thesis.tex").write_text("years of work")
    (d / "metrics.json").write_text("{}")
    (d / "notes.txt").write_text("x")
    return d


def test_overwrite_refuses_a_directory_it_did_not_create(tmp_path: Path) -> None:
    d = _user_dir(tmp_path)
    with pytest.raises(SclabelError, match="not a sclabel run directory"):
        prepare_run_dir(d, True, create=True)
    assert (d / "model" / "thesis.tex").read_text() == "years of work" and (d / "notes.txt").is_file()


def test_overwrite_deletes_only_the_entries_the_run_wrote(tmp_path: Path) -> None:
    d = tmp_path / "run"
    code = (
        "import sys; from pathlib import Path; from sclabel_dist.outdir import prepare_out_dir; "
        "d = Path(sys.argv[1]); prepare_out_dir(d, False); (d / 'model').mkdir(); "
        "(d / 'model' / 'w.bin').write_text('w'); (d / 'metrics.json').write_text('{}')"
    )
    subprocess.run([sys.executable, "-c", code, str(d)], check=True)  # a real run: entries recorded at exit
    assert (d / MARKER).is_file()
    (d / "my_plot.png").write_text("the user's, added afterwards")
    with pytest.raises(SclabelError, match="output exists; pass --overwrite"):
        prepare_run_dir(d, False, create=False)
    prepare_run_dir(d, True, create=True)
    assert sorted(p.name for p in d.iterdir()) == [MARKER, "my_plot.png"]


def test_quickstart_overwrite_refuses_a_user_directory(tmp_path: Path) -> None:
    from sclabel_dist.quickstart import main

    d = _user_dir(tmp_path)
    with pytest.raises(SclabelError, match="not a sclabel run directory"):
        main(["--out", str(d), "--overwrite"])
    assert (d / "model" / "thesis.tex").is_file() and (d / "notes.txt").is_file()


def test_ingest_overwrite_replaces_stores_only(tmp_path: Path) -> None:
    import anndata as ad
    import pandas as pd

    from data_tools.ingest import main as ingest

    X = sp.csr_matrix(np.arange(60, dtype=np.float32).reshape(20, 3))
    src = tmp_path / "x.h5ad"
    ad.AnnData(X=X, var=pd.DataFrame(index=["A", "B", "C"])).write_h5ad(src)
    d = _user_dir(tmp_path)
    with pytest.raises(SclabelError, match="not a cell store; refusing"):
        ingest([str(src), "-o", str(d), "--overwrite", "--no-progress"])
    assert (d / "model" / "thesis.tex").is_file()
    store = tmp_path / "store"
    ingest([str(src), "-o", str(store), "--no-progress"])
    (store / "notes.txt").write_text("the user's")
    with pytest.raises(SclabelError, match=r"did not write \(notes.txt\)"):
        ingest([str(src), "-o", str(store), "--overwrite", "--no-progress"])
    (store / "notes.txt").unlink()
    ingest([str(src), "-o", str(store), "--overwrite", "--no-progress"])  # a store is replaced


def test_to_soma_overwrite_refuses_a_user_directory(tmp_path: Path) -> None:
    import anndata as ad
    import pandas as pd

    from data_tools.to_soma import main as to_soma

    d = _user_dir(tmp_path)
    src = tmp_path / "x.h5ad"  # a valid input: 68c3987 converted it and then deleted `d` to make room
    X = sp.csr_matrix(np.arange(60, dtype=np.float32).reshape(20, 3))
    ad.AnnData(X=X, var=pd.DataFrame(index=["A", "B", "C"])).write_h5ad(src)
    with pytest.raises(SclabelError, match="not a SOMA experiment"):
        to_soma([str(src), "--out", str(d), "--overwrite"])
    assert (d / "model" / "thesis.tex").is_file()
