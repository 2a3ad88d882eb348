"""Tiny labelled .h5ad files and a tiny random-weight bundle, built on disk for the annotation tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def make_counts(
    num_cells: int = 160,
    num_genes: int = 200,
    class_sizes: tuple[int, ...] = (70, 50, 30, 10),
    seed: int = 0,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Poisson counts where each class over-expresses its own block of 20 genes; labels as strings."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[f"type_{k}"] * n for k, n in enumerate(class_sizes)])[:num_cells]
    base = rng.gamma(0.3, 1.0, size=num_genes)
    rows = []
    for lab in labels:
        k = int(lab.split("_")[1])
        mean = base.copy()
        mean[20 * k : 20 * k + 20] += 4.0
        rows.append(rng.poisson(mean * rng.lognormal(0, 0.3)))
    return sp.csr_matrix(np.array(rows, dtype=np.int32)), labels


def gene_names(num_genes: int) -> list[str]:
    return [f"Gene{i}" for i in range(num_genes)]


def write_h5ad(
    path: Path, X: sp.csr_matrix, obs: dict, var_names: list[str], uns: dict | None = None
) -> Path:
    import anndata
    import pandas as pd

    adata = anndata.AnnData(
        X=X,
        obs=pd.DataFrame(obs, index=[f"cell{i}" for i in range(X.shape[0])]),
        var=pd.DataFrame(index=var_names),
    )
    adata.uns.update(uns or {})
    adata.write_h5ad(path)
    return path


def make_bundle(
    out: Path,
    genes: list[str],
    *,
    max_len: int = 48,
    value_encoding: str = "binned",
    seed: int = 0,
    gene_bag: bool | None = True,
) -> Path:
    """A random-weight ScLabelNet bundle (tiny) written with the project's own save_bundle.

    gene_bag=None writes a bundle as they were before the gene bag existed: no such key anywhere.
    """
    import torch

    from sclabel_dist.bundle import save_bundle
    from sclabel_dist.config import TokenizeConfig, to_dict
    from sclabel_dist.model.args import ModelArgs
    from sclabel_dist.model.net import ScLabelNet
    from sclabel_dist.vocab import GeneVocab

    vocab = GeneVocab(genes)
    tok = TokenizeConfig(max_len=max_len, value_encoding=value_encoding, num_bins=11, gene_bag=bool(gene_bag))
    args = ModelArgs(
        vocab_size=vocab.num_tokens,
        dim=32,
        depth=2,
        heads=4,
        value_encoding=value_encoding,
        num_bins=11,
        max_len=max_len,
        gene_bag=bool(gene_bag),
    )
    torch.manual_seed(seed)
    model = ScLabelNet(args)
    config = {"model_args": args.to_dict(), "tokenize": to_dict(tok)}
    if gene_bag is None:
        for section in config.values():
            del section["gene_bag"]
    return save_bundle(out, model.state_dict(), config, vocab, "# tiny random test bundle\n")


def finetune_args(
    model: Path | str, data: Path | str, out: Path | str, *extra: str, key: str = "cell_type"
) -> list[str]:
    """`sclabel finetune` arguments for the tests (extra flags appended as given)."""
    return [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--label-key",
        key,
        "--out",
        str(out),
        *extra,
    ]


def sclabel(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m sclabel_dist.cli ARGS` in a child process, output captured (one torch thread)."""
    return subprocess.run(
        [sys.executable, "-m", "sclabel_dist.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
