"""finetune -> predict -> evaluate through the `sclabel` CLI on a tiny bundle and .h5ad, on CPU."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, HELD_OUT
from helpers import finetune_args, gene_names, make_bundle, make_counts, write_h5ad

from sclabel_dist.cli import main


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finetune_writes_bundle_metrics_plots_and_curves(finetuned: Path):
    from sclabel_dist.bundle import load_bundle

    for name in ("metrics.json", "gene_match.json", "confusion_matrix.png", "per_class_f1.png"):
        assert (finetuned / name).is_file(), name
    assert any((finetuned / "tensorboard").iterdir())
    metrics = json.loads((finetuned / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test["per_class"]["type_3"]) == {"precision", "recall", "f1", "support"}
    assert np.array(test["confusion_matrix"]).sum() == test["num_cells"] == metrics["split"]["num_test"]
    assert 0 <= test["accuracy"] <= 1 and 0 <= test["macro_f1"] <= 1
    assert metrics["upsample"]["train_cells_upsampled"] > metrics["upsample"]["train_cells"]
    bundle = load_bundle(finetuned / "model")
    assert bundle.config["labels"] == ["type_0", "type_1", "type_2", "type_3"]
    assert bundle.config["model_args"]["num_classes"] == 4
    # value bins as pretrained; the cell length and gene choice the classifier was tuned with
    tok = bundle.config["tokenize"]
    assert tok["num_bins"] == 11 and tok["max_len"] == 128 and tok["train_gene_selection"] == "top"
    assert len(bundle.config["input_genes"]) == 200  # genes=hvg keeps all 200 when there are fewer than 2,000


def test_finetune_is_reproducible(tiny_dir: Path, tiny_h5ad: Path, tiny_bundle: Path, finetuned: Path):
    out = tiny_dir / "run_again"
    assert main(finetune_args(str(tiny_bundle), str(tiny_h5ad), str(out), *FAST, *HELD_OUT)) == 0
    a = json.loads((finetuned / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert a["test"]["confusion_matrix"] == b["test"]["confusion_matrix"]


def test_predict_is_deterministic_across_batch_sizes_and_leaves_input_alone(tiny_dir, tiny_h5ad, finetuned):
    import anndata

    # Unlabelled copy: predict must not need labels.
    X, _ = make_counts(num_genes=200, seed=5)
    unlabelled = write_h5ad(tiny_dir / "new.h5ad", X, {}, gene_names(200))
    before = sha(unlabelled)
    results = []
    for bs in (1, 7, 64):
        out = tiny_dir / f"annotated_bs{bs}.h5ad"
        assert (
            main(
                [
                    "predict",
                    "--model",
                    str(finetuned),
                    "--data",
                    str(unlabelled),
                    "--out",
                    str(out),
                    "--batch-size",
                    str(bs),
                    "--threshold",
                    "0.3",
                ]
            )
            == 0
        )
        results.append(anndata.read_h5ad(out))
        assert out.with_suffix(".csv").is_file()
    assert sha(unlabelled) == before
    first = results[0]
    assert first.obsm["X_sclabel"].shape == (X.shape[0], 32)
    assert set(first.obs["sclabel_label"]) <= {"type_0", "type_1", "type_2", "type_3", "Unassigned"}
    low = first.obs["sclabel_confidence"] < 0.3
    assert (first.obs["sclabel_label"][low] == "Unassigned").all()
    for other in results[1:]:
        assert (other.obs["sclabel_top_label"] == first.obs["sclabel_top_label"]).all()
        np.testing.assert_allclose(other.obsm["X_sclabel"], first.obsm["X_sclabel"], atol=1e-5)
        np.testing.assert_allclose(
            other.obs["sclabel_confidence"], first.obs["sclabel_confidence"], atol=1e-5
        )


def test_evaluate_prints_and_saves_side_by_side_table(tiny_dir, tiny_h5ad, tiny_bundle, capsys):
    out = tiny_dir / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_bundle),
                "--data",
                str(tiny_h5ad),
                "--label-key",
                "cell_type",
                "--out",
                str(out),
                "--seeds",
                "0",
                "1",
                "--upsample",
                "both",
                *FAST,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| logistic regression | 2 |" in printed and "| fine-tuned (no up-sampling) | 2 |" in printed
    result = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in result["summary"]} == {
        "logistic regression",
        "fine-tuned (up-sampling)",
        "fine-tuned (no up-sampling)",
    }
    assert (out / "table.md").is_file() and (out / "seed1_no_upsample" / "confusion_matrix.png").is_file()


@pytest.mark.parametrize("mode", ["frozen", "top:1"])
def test_train_modes_freeze_the_encoder(tiny_dir, tiny_h5ad, tiny_bundle, mode):
    from sclabel_dist.bundle import load_bundle

    out = tiny_dir / f"run_{mode.replace(':', '')}"
    assert (
        main(
            finetune_args(
                str(tiny_bundle),
                str(tiny_h5ad),
                str(out),
                "--train-mode",
                mode,
                "--train.epochs=1",
                "--no-upsample",
            )
        )
        == 0
    )
    base, tuned = load_bundle(tiny_bundle).state_dict, load_bundle(out / "model").state_dict
    assert (base["blocks.0.attn.qkv.weight"] == tuned["blocks.0.attn.qkv.weight"]).all()
    changed = not (base["blocks.1.attn.qkv.weight"] == tuned["blocks.1.attn.qkv.weight"]).all()
    assert changed == (mode == "top:1")
    assert (base["gene_embed.weight"] == tuned["gene_embed.weight"]).all()


def test_finetune_never_imports_deepspeed_or_checkpoint_code(tiny_dir, tiny_h5ad, tiny_bundle):
    code = (
        "import sys; from sclabel_dist.cli import main; "
        f"rc = main(['finetune', '--model', {str(tiny_bundle)!r}, '--data', {str(tiny_h5ad)!r}, "
        f"'--label-key', 'cell_type', '--out', {str(tiny_dir / 'run_imports')!r}, '--train.epochs=1']); "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'deepspeed' or m == 'sclabel_dist.checkpoint']; "
        "print('BAD', bad); sys.exit(rc or bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_continuous_model_takes_counts_and_cp10k_lognorm(tiny_dir):
    X, labels = make_counts(num_genes=200, seed=2)
    lognorm = X.astype(np.float32).multiply(1e4 / X.sum(axis=1)).tocsr().log1p()
    bundle = make_bundle(tiny_dir / "bundle_cont", gene_names(200), value_encoding="continuous")
    for kind, matrix in (("counts", X), ("lognorm", lognorm)):
        data = write_h5ad(tiny_dir / f"cont_{kind}.h5ad", matrix, {"cell_type": labels}, gene_names(200))
        assert (
            main(
                finetune_args(str(bundle), str(data), str(tiny_dir / f"run_cont_{kind}"), "--train.epochs=1")
            )
            == 0
        )


@pytest.mark.shared_data
def test_finetune_and_predict_on_a_real_lognorm_set(shared_data, tmp_path):
    """zilionis: log counts (not raw), upper-case mouse symbols; a random bundle over its own genes."""
    import anndata

    src = shared_data / "zilionis_mouse_lung.h5ad"
    genes = [g.capitalize() for g in anndata.read_h5ad(src, backed="r").var_names[:3000]]
    bundle = make_bundle(tmp_path / "bundle", genes, max_len=64)
    run = tmp_path / "run"
    assert (
        main(
            finetune_args(
                str(bundle),
                str(src),
                str(run),
                "--train.epochs=1",
                "--train.max_steps_per_epoch=3",
                "--data.min_matched_fraction=0.05",
            )
        )
        == 0
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["value_kind"] == "lognorm" and metrics["gene_match"]["genes_matched"] == 3000
    assert (
        main(
            [
                "predict",
                "--model",
                str(run),
                "--data",
                str(src),
                "--out",
                str(tmp_path / "a.h5ad"),
                "--min-matched-fraction",
                "0.05",
            ]
        )
        == 0
    )


def test_accelerate_launch_two_cpu_processes(tiny_dir, tiny_h5ad, tiny_bundle):
    """The multi-process path: DDP over gloo through `accelerate launch`, one bundle written by rank 0."""
    root = Path(__file__).resolve().parents[2]
    out = tiny_dir / "run_ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(root / "configs/accelerate/cpu_2proc.yaml"),
        "-m",
        "sclabel_dist.finetune",
        "--model",
        str(tiny_bundle),
        "--data",
        str(tiny_h5ad),
        "--label-key",
        "cell_type",
        "--out",
        str(out),
        "--train.epochs=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert (out / "model" / "SHA256SUMS").is_file()


def test_user_split_column(tiny_dir, tiny_bundle):
    X, labels = make_counts(num_genes=200, seed=7)
    parts = np.where(np.arange(len(labels)) % 4 == 0, "test", "train")
    data = write_h5ad(tiny_dir / "with_split.h5ad", X, {"cell_type": labels, "part": parts}, gene_names(200))
    bundle = tiny_bundle
    out = tiny_dir / "run_split"
    assert (
        main(finetune_args(str(bundle), str(data), str(out), "--split-key", "part", "--train.epochs=1")) == 0
    )
    split = json.loads((out / "metrics.json").read_text())["split"]
    assert split["num_test"] == int((parts == "test").sum()) and split["num_val"] > 0


def test_a_bundle_from_before_the_gene_bag_still_finetunes_and_predicts(tiny_dir, tiny_h5ad):
    from conftest import NUM_GENES

    legacy = make_bundle(tiny_dir / "legacy_bundle", gene_names(NUM_GENES), gene_bag=None)
    assert "gene_bag" not in json.loads((legacy / "config.json").read_text())["tokenize"]
    out = tiny_dir / "run_legacy"
    assert main(finetune_args(legacy, tiny_h5ad, out, *FAST)) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["tokenize"]["gene_bag"] is False and config["model_args"]["gene_bag"] is False
    dest = tiny_dir / "legacy_annotated.h5ad"
    assert main(["predict", "--model", str(out), "--data", str(tiny_h5ad), "--out", str(dest)]) == 0


def test_refit_retrains_on_train_and_validation_for_the_chosen_epoch_count(
    tiny_dir, tiny_h5ad, tiny_bundle, finetuned
):
    from sclabel_dist.bundle import load_bundle

    refit = json.loads((finetuned / "metrics.json").read_text())
    split = refit["split"]
    selection = [h for h in refit["history"] if not h.get("refit")]
    again = [h for h in refit["history"] if h.get("refit")]
    # epochs are counted from 1 wherever a user reads them: metrics.json as the printed lines
    assert [h["epoch"] for h in selection] == list(range(1, len(selection) + 1))
    assert "val_macro_f1" in selection[0] and len(again) == refit["best_epoch"]
    assert not any("val_macro_f1" in h for h in again)  # validation cells are training cells now
    assert refit["upsample"]["train_cells"] == split["num_train"] + split["num_val"]

    out = tiny_dir / "run_no_refit"
    args = finetune_args(str(tiny_bundle), str(tiny_h5ad), str(out), *FAST, *HELD_OUT, "--train.refit=false")
    assert main(args) == 0
    plain = json.loads((out / "metrics.json").read_text())
    assert not any(h.get("refit") for h in plain["history"])
    assert plain["upsample"]["train_cells"] == split["num_train"]
    assert plain["best_epoch"] == refit["best_epoch"]  # the same selection run, then a different model kept
    kept, selected = load_bundle(finetuned / "model").state_dict, load_bundle(out / "model").state_dict
    assert not (kept["cls_head.weight"] == selected["cls_head.weight"]).all()
