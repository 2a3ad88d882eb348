"""The from-scratch comparison from the CLI: `sclabel init-bundle` and `sclabel evaluate --arms pretrained,scratch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST
from helpers import sclabel

ROOT = Path(__file__).resolve().parents[2]


def weights(bundle: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(bundle / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_init_bundle_like_a_bundle_is_that_model_with_fresh_seeded_weights(tiny_bundle, finetuned, tmp_path):
    from sclabel_dist.bundle import load_bundle

    for name, seed in (("s0", "0"), ("s0_again", "0"), ("s1", "1")):
        proc = sclabel(
            "init-bundle", "--like", str(tiny_bundle), "--out", str(tmp_path / name), "--seed", seed
        )
        assert proc.returncode == 0, proc.stderr
    assert "fresh weights (seed 0)" in proc.stdout or "fresh weights (seed 1)" in proc.stdout
    base, fresh = load_bundle(tiny_bundle), load_bundle(tmp_path / "s0")
    assert fresh.config["model_args"] == base.config["model_args"]
    assert fresh.config["tokenize"] == base.config["tokenize"] and fresh.vocab == base.vocab
    assert fresh.config["init"] == {"seed": 0, "like": str(tiny_bundle)}
    # seeded as ScLabelNet(args) under torch.manual_seed(seed): the tiny bundle was itself built so with 0
    assert same(weights(tmp_path / "s0"), weights(tiny_bundle))
    assert not same(weights(tmp_path / "s1"), weights(tiny_bundle))
    assert same(weights(tmp_path / "s0"), weights(tmp_path / "s0_again"))
    assert not same(weights(tmp_path / "s0"), weights(tmp_path / "s1"))

    # from a fine-tuned run: the same encoder and tokenisation, no head, labels or input genes
    proc = sclabel("init-bundle", "--like", str(finetuned), "--out", str(tmp_path / "from_ft"))
    assert proc.returncode == 0, proc.stderr
    from_ft = load_bundle(tmp_path / "from_ft")
    assert from_ft.config["model_args"]["num_classes"] == 0
    assert "labels" not in from_ft.config and "input_genes" not in from_ft.config
    assert not any(k.startswith("cls_head.") for k in from_ft.state_dict)


def test_init_bundle_from_a_pretraining_config_and_a_vocabulary(tiny_bundle, tmp_path):
    from sclabel_dist.bundle import load_bundle
    from sclabel_dist.config import PretrainConfig, load_config
    from sclabel_dist.model.args import build_model_args

    config = ROOT / "configs" / "pretrain" / "debug.yaml"
    out = tmp_path / "from_config"
    proc = sclabel(
        "init-bundle", "--config", str(config), "--vocab", str(tiny_bundle / "vocab.json"), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    cfg = load_config(PretrainConfig, config)
    expected = build_model_args(cfg.model, cfg.tokenize, vocab_size=bundle.vocab.num_tokens)
    assert bundle.config["model_args"] == expected.to_dict()
    assert bundle.config["tokenize"]["max_len"] == cfg.tokenize.max_len
    assert bundle.build_model() is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "c.yaml", "--out", "x"], "--vocab is required"),
        (["--like", "b", "--vocab", "v.json", "--out", "x"], "go with --config"),
        (["--out", "x"], "one of the arguments --like --config is required"),
    ],
)
def test_init_bundle_refuses_bad_arguments_before_reading_anything(args, message):
    proc = sclabel("init-bundle", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_evaluate_compares_pretrained_and_scratch_arms_on_the_same_splits(tiny_bundle, tiny_h5ad, tmp_path):
    out = tmp_path / "arms"
    proc = sclabel(
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
        "--arms",
        "pretrained,scratch",
        *FAST,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| from scratch (up-sampling) | 1 |" in proc.stdout
    assert "| fine-tuned (up-sampling) | 1 |" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["arms"] == ["pretrained", "scratch"] and result["test_fraction"] == 0.3
    assert [r["method"] for r in result["runs"]] == [
        "logistic regression",
        "fine-tuned (up-sampling)",
        "from scratch (up-sampling)",
    ]
    assert (out / "seed0_upsample" / "metrics.json").is_file()
    scratch_run = json.loads((out / "scratch_seed0_upsample" / "metrics.json").read_text())
    assert scratch_run["model"] == str(out / "scratch_models" / "seed0")
    # the scratch arm starts from exactly what `sclabel init-bundle --like MODEL --seed SEED` writes
    assert sclabel("init-bundle", "--like", str(tiny_bundle), "--out", str(tmp_path / "ref")).returncode == 0
    assert same(weights(out / "scratch_models" / "seed0"), weights(tmp_path / "ref"))


@pytest.mark.parametrize("arms", ["scratch,scratch", "pretrained,random", ""])
def test_evaluate_refuses_unknown_arms(arms, tmp_path):
    proc = sclabel(
        "evaluate", "--model", "nowhere", "--data", "x.h5ad", "--label-key", "c", "--arms", arms, timeout=60
    )
    assert proc.returncode == 2 and "--arms" in proc.stderr and "nowhere" not in proc.stderr


@pytest.mark.slow
def test_annotation_benchmark_can_run_only_its_pretraining(shared_data, tmp_path):
    work = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "annotation_bench.py"), "--work", str(work)]
        + ["--data", str(shared_data), "--seeds", "0", "--pretrain-steps", "4", "--pretrain-only"],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / "seed0" / "export" / "model.safetensors").is_file()
    assert not (work / "seed0" / "eval").exists() and not (work / "summary.md").exists()
    assert "evaluations skipped" in proc.stdout
