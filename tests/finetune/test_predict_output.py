"""predict's output names (issue 19, item 9): `--out x.csv` would have written the CSV over the .h5ad."""

from __future__ import annotations

from pathlib import Path

from sclabel_dist.cli import main


def run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err.strip()


def test_out_with_csv_suffix_is_refused_before_any_work(
    capsys, tiny_h5ad: Path, finetuned: Path, tmp_path: Path
) -> None:
    out = tmp_path / "x.csv"
    err = run(capsys, "predict", "--model", str(finetuned), "--data", str(tiny_h5ad), "--out", str(out))
    assert "would get the same name" in err and "give the .h5ad path" in err
    assert list(tmp_path.iterdir()) == []


def test_sigint_stops_predict_even_when_inherited_ignored(
    tiny_h5ad: Path, finetuned: Path, tmp_path: Path
) -> None:
    """`sclabel predict ... &` from a script starts with SIGINT ignored; `kill -INT` must still stop it, and
    leave neither the outputs nor their temp files."""
    import os
    import signal
    import subprocess
    import sys

    import anndata as ad
    import scipy.sparse as sp

    small = ad.read_h5ad(tiny_h5ad)
    big = ad.AnnData(X=sp.vstack([sp.csr_matrix(small.X)] * 300).tocsr(), var=small.var, uns=dict(small.uns))
    data = tmp_path / "big.h5ad"
    big.write_h5ad(data)
    out = tmp_path / "out" / "a.h5ad"
    out.parent.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "sclabel_dist.cli",
        "predict",
        "--model",
        str(finetuned),
        "--data",
        str(data),
    ]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # its lines as they are printed
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # what `&` in a script does
    )
    for line in proc.stdout:  # the model is running once the value-kind line is out
        if line.startswith("input values"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert list(out.parent.iterdir()) == []
