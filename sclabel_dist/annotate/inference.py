"""Deterministic batched inference: class probabilities and cell embeddings, independent of batch size."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from sclabel_dist.bundle import tokenize_config  # noqa: F401  (predict imports it from here)


@torch.inference_mode()
def run_model(
    model: torch.nn.Module,
    csr: sp.csr_matrix,
    tok_cfg: Any,
    value_kind: str,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray | None]:
    """(cell embeddings [N, D] float32, class probabilities [N, K] float32 or None without a head).

    Evaluation tokenisation (deterministic gene selection, no mask), and a cell's output does not depend on
    which cells share its batch: the model ignores padding. Cells are batched in order of their number of
    genes so batches need little padding; results are returned in the input order. Only what is read is
    computed (ScLabelNet.cell_outputs: the CLS token, no MLM head), under inference_mode.
    """
    from sclabel_dist.data.tokenize import tokenize_csr

    was_training = model.training
    model.eval()
    n = csr.shape[0]
    order = np.argsort(np.diff(csr.indptr), kind="stable")
    embeddings: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    for start in range(0, n, max(1, batch_size)):
        rows = order[start : start + batch_size]
        batch = tokenize_csr(csr[rows], tok_cfg, value_kind=value_kind, train=False, mask=False).to(device)
        cell, logits = model.cell_outputs(batch.gene_ids, batch.values, batch.attention_mask, bag=batch.bag)
        embeddings.append(cell.float().cpu().numpy())
        if logits is not None:
            probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    model.train(was_training)
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    emb = np.concatenate(embeddings)[inverse] if n else np.zeros((0, 0), np.float32)
    prob = np.concatenate(probs)[inverse] if probs else None
    return emb, prob
