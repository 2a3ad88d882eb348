"""The pretrained cell embedding must carry cell identity (issue 21).

MLM alone never trains the CLS output: pretrained on the shared sets, the cell embedding collapsed to ~3
effective dimensions (a random model's has ~55) and a linear probe on 10 cells per class read less from it
than from a random model's. The contrastive objective (model.contrastive, on by default) trains that
vector. This test pretrains briefly on a synthetic atlas whose cell types have their own gene programmes,
then probes frozen cell embeddings with 5 labelled cells per type.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ._helpers import base_env, torchrun

MODEL = [
    "--data.batch_size=16",
    "--data.chunk_size=16",
    "--data.shuffle_chunks=8",
    "--data.val_fraction=0.05",
    "--data.read_threads=1",
    "--tokenize.max_len=64",
    "--tokenize.num_bins=21",
    "--model.flavour=debug",
    "--model.dim=32",
    "--train.lr=2e-3",
    "--train.warmup_steps=10",
    "--train.max_steps=150",
    "--train.val_every=0",
    "--checkpoint.every=150",
    "--log.every=50",
    "--log.tensorboard=false",
]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    """(store, .h5ad) of the same 1,500 synthetic cells: 6 types, 400 genes, ~80 expressed per cell."""
    root = tmp_path_factory.mktemp("atlas")
    common = ["--cells", "1500", "--genes", "400", "--cell-types", "6", "--nnz-per-cell", "80"]
    common += ["--imbalance", "0", "--batches", "2", "--seed", "7", "--quiet"]
    for out in ("store", "cells.h5ad"):
        subprocess.run(
            [sys.executable, "-m", "data_tools.cli", "synth", *common, "--out", str(root / out)],
            check=True,
            env=base_env(),
        )
    return root / "store", root / "cells.h5ad"


def pretrain_and_export(store, root, extra: list[str]):
    from sclabel_dist.bundle import load_bundle

    torchrun(
        [
            *MODEL,
            *extra,
            f"--data.stores=[{store}]",
            f"--checkpoint.dir={root / 'ckpt'}",
            f"--log.dir={root / 'logs'}",
        ],
        timeout=400,
    )
    subprocess.run(
        [sys.executable, "-m", "sclabel_dist.cli", "export", str(root / "ckpt"), str(root / "export")],
        check=True,
        env=base_env(),
        capture_output=True,
    )
    return load_bundle(root / "export")


def probe_f1(bundle, h5ad, weights: str, seed: int = 0) -> float:
    """Macro-F1 of a logistic regression on frozen cell embeddings, 5 labelled cells per type, the rest tested."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    from sclabel_dist.annotate.genes import classifier_input
    from sclabel_dist.annotate.h5ad import read_h5ad, read_labels
    from sclabel_dist.annotate.inference import run_model
    from sclabel_dist.annotate.pipeline import prepare_input
    from sclabel_dist.config import FinetuneConfig
    from sclabel_dist.model.net import ScLabelNet

    torch.manual_seed(seed)
    model = ScLabelNet(bundle.model_args)
    if weights == "pretrained":
        model.load_state_dict(bundle.state_dict)
    inp = read_h5ad(h5ad)
    prep = prepare_input(bundle, inp, FinetuneConfig(), log=lambda *_: None)
    emb, _ = run_model(
        model, classifier_input(prep.csr, prep.value_kind, None), prep.tok_cfg, "lognorm", batch_size=128
    )
    labels = read_labels(inp, "cell_type")
    rng = np.random.default_rng(seed)
    train = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), 5, replace=False) for c in np.unique(labels)]
    )
    test = np.setdiff1d(np.arange(len(labels)), train)
    scaler = StandardScaler().fit(emb[train])
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(emb[train]), labels[train])
    return f1_score(labels[test], clf.predict(scaler.transform(emb[test])), average="macro")


@pytest.mark.slow
def test_pretraining_gives_cell_embeddings_that_separate_cell_types_better_than_random(atlas, tmp_path):
    store, h5ad = atlas
    bundle = pretrain_and_export(store, tmp_path / "contrastive", [])
    assert bundle.model_args.contrastive > 0  # the default recipe
    pretrained = np.mean([probe_f1(bundle, h5ad, "pretrained", seed) for seed in range(3)])
    random = np.mean([probe_f1(bundle, h5ad, "random", seed) for seed in range(3)])
    # seeds 0-2 on this machine: 0.68 against 0.38 with the contrastive objective; MLM alone (the recipe of
    # issue 21) gave 0.41 against 0.39, which fails here
    assert pretrained >= random + 0.1, (pretrained, random)
