"""The quickstart end to end on the embedded PBMC sample, shortened: every artefact exists and scores are real;
then the README's next command (the test suite's CLI tests) passes in the same directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The README's `sclabel quickstart`, shortened by its own flags (as .ci/run runs it).
SHORT = ["--pretrain-steps", "12", "--finetune-epochs", "2"]


def sclabel(
    *args: str, cwd: Path | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sclabel_dist.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A directory where the README's `sclabel quickstart` ran with its default --out (runs/quickstart), as on
    a fresh install: an empty torch extensions cache (TORCH_EXTENSIONS_DIR, where DeepSpeed builds its ops)."""
    where = tmp_path_factory.mktemp("readme")
    extensions = tmp_path_factory.mktemp("torch_extensions")
    proc = sclabel(
        "quickstart", *SHORT, cwd=where, timeout=600, env={"TORCH_EXTENSIONS_DIR": str(extensions)}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return where, proc, extensions


def test_quickstart_runs_the_whole_loop(quickstart_dir):
    where, proc, _ = quickstart_dir
    out = where / "runs" / "quickstart"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"] == 700 and summary["train"] + summary["test"] == 700
    for method in ("sclabel", "logistic_regression"):
        for metric in ("accuracy", "macro_f1"):
            assert 0.0 <= summary["scores"][method][metric] <= 1.0
    # The baseline on this sample is far above chance (10 classes): a broken split or label join would show.
    assert summary["scores"]["logistic_regression"]["accuracy"] > 0.6

    for artefact in (
        "store/index.json",
        "export/model.safetensors",
        "export/SHA256SUMS",
        "finetune/metrics.json",
        "annotated.csv",
    ):
        assert (out / artefact).is_file(), artefact
    assert any((out / "pretrain" / "logs").rglob("events.out.tfevents*")), "no TensorBoard events"
    annotated = anndata.read_h5ad(out / "annotated.h5ad")
    assert annotated.n_obs == summary["test"]
    assert np.isfinite(annotated.obsm["X_sclabel"]).all()
    assert set(annotated.obs["sclabel_label"]) <= set(summary["classes"]) | {"Unassigned"}
    assert "accuracy" in proc.stdout and "logistic regression" in proc.stdout
    # Scored on top labels like the baseline; 'Unassigned' (under predict's threshold) is counted apart.
    ours = summary["scores"]["sclabel"]
    top = annotated.obs["sclabel_top_label"].astype(str).to_numpy()
    truth = annotated.obs["sclabel_truth"].astype(str).to_numpy()
    assert ours["accuracy"] == pytest.approx((top == truth).mean())
    assert ours["unassigned"] == int((annotated.obs["sclabel_label"] == "Unassigned").sum())
    # predict on the test file reproduces the fine-tune's own score on the same test cells
    finetune = json.loads((out / "finetune" / "metrics.json").read_text())
    assert finetune["test"]["num_cells"] == summary["test"]
    assert ours["accuracy"] == pytest.approx(finetune["test"]["accuracy"])
    assert ours["macro_f1"] == pytest.approx(finetune["test"]["macro_f1"])


def test_a_fresh_install_compiles_nothing_and_prints_no_library_noise(quickstart_dir):
    """Issue 18: DeepSpeed built its CPU shared-memory op with ninja on first use (~140 s, silently), and
    anndata / torch printed FutureWarnings about things no user can change."""
    _, proc, extensions = quickstart_dir
    assert not list(extensions.rglob("*shm_comm*")), "DeepSpeed compiled an op on a fresh install"
    printed = proc.stdout + proc.stderr
    assert "built successfully" not in printed
    assert "Moving element from .uns['neighbors']" not in printed
    assert "all_gather_into_tensor" not in printed


def test_the_cli_tests_pass_where_the_quickstart_ran_and_leave_it_alone(quickstart_dir):
    """The README's order: `sclabel quickstart`, then `pytest`, in one directory (issue 18: a CLI test used to
    find runs/quickstart there and fail)."""
    where, _, _ = quickstart_dir
    before = sorted(p.relative_to(where) for p in where.rglob("*"))
    tests = [
        str(
            ROOT
            / "tests"
            / "test_quickstart.py::test_quickstart_refuses_an_existing_run_and_a_missing_label_key"
        ),
        str(
            ROOT
            / "tests"
            / "test_quickstart.py::test_quickstart_checks_arguments_before_the_output_directory"
        ),
        str(ROOT / "tests" / "finetune" / "test_bad_input.py"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests],
        capture_output=True,
        text=True,
        cwd=where,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    assert sorted(p.relative_to(where) for p in where.rglob("*")) == before


def test_quickstart_refuses_an_existing_run_and_a_missing_label_key(tmp_path):
    out = tmp_path / "qs"
    out.mkdir()
    (out / "something").write_text("x")
    proc = sclabel("quickstart", "--out", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = sclabel("quickstart", "--data", "x.h5ad", "--out", str(tmp_path / "new"))
    assert proc.returncode == 2 and "--label-key" in proc.stderr
    assert not (tmp_path / "new").exists()


def test_quickstart_checks_arguments_before_the_output_directory(tmp_path):
    """A wrong argument is named as such even where an earlier run sits in --out (the default's case)."""
    out = tmp_path / "runs" / "quickstart"
    out.mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    for args, message in [
        (["--data", "x.h5ad"], "--label-key"),
        (["--data", str(tmp_path / "absent.h5ad"), "--label-key", "cell_type"], "absent.h5ad"),
        (["--pretrain-steps", "0"], "--pretrain-steps"),
    ]:
        proc = sclabel("quickstart", *args, "--out", str(out))
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert "--overwrite" not in proc.stderr
    assert [p.name for p in out.iterdir()] == ["summary.json"]


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
