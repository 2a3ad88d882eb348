"""The quickstart end to end on the embedded PBMC sample, shortened: every artefact exists and scores are real."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata
import numpy as np
import pytest


def test_quickstart_runs_the_whole_loop(tmp_path):
    out = tmp_path / "qs"
    cmd = [
        sys.executable,
        "-m",
        "sclabel_dist.cli",
        "quickstart",
        "--out",
        str(out),
        "--pretrain-steps",
        "12",
        "--finetune-epochs",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

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


def test_quickstart_refuses_an_existing_run_and_a_missing_label_key(tmp_path):
    out = tmp_path / "qs"
    out.mkdir()
    (out / "something").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "sclabel_dist.cli", "quickstart", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "sclabel_dist.cli", "quickstart", "--data", "x.h5ad"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--label-key" in proc.stderr


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
