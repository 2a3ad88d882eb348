"""What `sclabel finetune` / `evaluate` tell a user: every label used (or a hold-out named), help, epoch numbers."""

from __future__ import annotations

import json
import re

import pytest
from conftest import FAST, HELD_OUT
from helpers import finetune_args, sclabel


def test_finetune_trains_on_every_labelled_cell_by_default_and_says_so(tiny_bundle, tiny_h5ad, tmp_path):
    import anndata

    labelled = anndata.read_h5ad(tiny_h5ad).n_obs
    out = tmp_path / "all"
    proc = sclabel(*finetune_args(tiny_bundle, tiny_h5ad, out, *FAST))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    split = metrics["split"]
    assert split["num_test"] == 0 and split["num_train"] + split["num_val"] == labelled
    assert metrics["upsample"]["train_cells"] == labelled  # the refit, the model kept, saw every cell
    assert metrics["test"] is None
    assert "every labelled cell trains the model" in proc.stdout and "sclabel evaluate" in proc.stdout
    assert "no held-out test score" in (out / "model" / "README.md").read_text()

    # a hold-out is the user's explicit choice, and named as such
    out = tmp_path / "held_out"
    proc = sclabel(*finetune_args(tiny_bundle, tiny_h5ad, out, *FAST, *HELD_OUT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    num_test = json.loads((out / "metrics.json").read_text())["split"]["num_test"]
    assert num_test == 48 and f"test: {num_test} labelled cells held out of training" in proc.stdout


def test_help_shows_each_commands_own_examples():
    evaluate = sclabel("evaluate", "--help", timeout=60)
    assert evaluate.returncode == 0
    assert "sclabel evaluate --model" in evaluate.stdout and "--arms pretrained,scratch" in evaluate.stdout
    assert "sclabel finetune --model" not in evaluate.stdout
    finetune = sclabel("finetune", "--help", timeout=60)
    assert "sclabel finetune --model" in finetune.stdout and "sclabel evaluate --model" not in finetune.stdout
    assert "Every labelled cell trains the model by default" in finetune.stdout


def test_epochs_are_counted_from_one_in_what_finetune_prints_and_writes(tiny_bundle, tiny_h5ad, tmp_path):
    out = tmp_path / "epochs"
    proc = sclabel(*finetune_args(tiny_bundle, tiny_h5ad, out, *FAST))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["best_epoch"]
    selection = [h for h in metrics["history"] if not h.get("refit")]
    assert 1 <= best <= len(selection) and selection[0]["epoch"] == 1
    assert max(selection, key=lambda h: (h["val_macro_f1"], -h["val_loss"]))["epoch"] == best
    refit = re.search(r"refit: .* for (\d+) epochs", proc.stdout)
    assert refit and int(refit.group(1)) == best
    lines = re.findall(r"^epoch (\d+) step", proc.stdout, flags=re.M)  # the per-epoch lines printed
    assert lines and lines[0] == "1" and "epoch 0 " not in proc.stdout
    assert f"best epoch: {best};" in (out / "model" / "README.md").read_text()
    assert json.loads((out / "model" / "config.json").read_text())["finetune"]["best_epoch"] == best


def test_a_job_with_an_unknown_precision_is_refused_before_any_file_is_opened(tmp_path):
    """The CLI's choices stop it there; a Job built in code meets the same rule in check_job."""
    from sclabel_dist.annotate.runner import Job, check_job
    from sclabel_dist.errors import SclabelError

    with pytest.raises(SclabelError, match="--precision 'fp16'"):
        check_job(Job(command="embed", model="m", data="d", out=tmp_path / "o.parquet", precision="fp16"))
    check_job(Job(command="embed", model="m", data="d", out=tmp_path / "o.parquet", precision="bf16"))
