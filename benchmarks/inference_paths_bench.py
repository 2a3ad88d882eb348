"""CPU inference paths of predict / embed (issue 15): the full forward (before) against cell_outputs (after).

Same cells, same bundle, same tokenisation, one process: the earlier path ran model(...) under no_grad (every
token through every block, the MLM head included) and read only the CLS row; the current one
(annotate.inference.run_model) computes the CLS row alone in the last block and skips the MLM head, under
inference_mode. Prints the seconds of each (tokenisation alone too), the speed-up and the largest difference.

  flock /tmp/sclabel-heavy.lock python benchmarks/inference_paths_bench.py \\
      --model .bench/predict/run_small --data .bench/predict/cells_5000.h5ad
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


@torch.no_grad()
def full_forward(model, csr, tok_cfg, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The earlier run_model: the whole forward, batched by length, results in input order."""
    from sclabel_dist.data.tokenize import tokenize_csr

    order = np.argsort(np.diff(csr.indptr), kind="stable")
    embs, probs = [], []
    for start in range(0, csr.shape[0], batch_size):
        rows = order[start : start + batch_size]
        batch = tokenize_csr(csr[rows], tok_cfg, value_kind="lognorm", train=False, mask=False)
        out = model(batch.gene_ids, batch.values, batch.attention_mask, bag=batch.bag)
        embs.append(out.cell_embedding.float().numpy())
        probs.append(torch.softmax(out.logits.float(), dim=-1).numpy())
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.arange(len(order))
    return np.concatenate(embs)[inverse], np.concatenate(probs)[inverse]


def tokenise_only(csr, tok_cfg, batch_size: int) -> None:
    from sclabel_dist.data.tokenize import tokenize_csr

    order = np.argsort(np.diff(csr.indptr), kind="stable")
    for start in range(0, csr.shape[0], batch_size):
        tokenize_csr(
            csr[order[start : start + batch_size]], tok_cfg, value_kind="lognorm", train=False, mask=False
        )


def main() -> int:
    from sclabel_dist.annotate.blocks import open_source
    from sclabel_dist.annotate.classifier import load_classifier, resolve_bundle_dir
    from sclabel_dist.annotate.genes import classifier_input, genes_from_names
    from sclabel_dist.annotate.inference import run_model, tokenize_config
    from sclabel_dist.bundle import load_bundle

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a fine-tuned run or bundle")
    p.add_argument("--data", required=True, help="an .h5ad of counts with the bundle's gene names")
    p.add_argument("--cells", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()

    bundle = load_bundle(resolve_bundle_dir(args.model))
    model = load_classifier(bundle.config["model_args"], bundle.state_dict)
    tok_cfg = tokenize_config(bundle.config["tokenize"])
    source = open_source(args.data, bundle.vocab, layer=None, in_memory=False)
    source.value_kind = "counts"  # the benchmark's inputs are counts (predict decides it in its scan pass)
    (block,) = source.read(0, min(args.cells, source.num_cells))
    source.close()
    genes = genes_from_names(bundle.vocab, bundle.config.get("input_genes"), str(bundle.path))
    csr = classifier_input(block.X, block.value_kind, genes)
    row = {"model": str(bundle.path), "cells": csr.shape[0], "threads": torch.get_num_threads()}
    row["utc"], row["load"] = time.strftime("%H:%M:%S", time.gmtime()), round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    tokenise_only(csr, tok_cfg, args.batch_size)
    row["tokenise_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    emb0, prob0 = full_forward(model, csr, tok_cfg, args.batch_size)
    row["before_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    emb1, prob1 = run_model(model, csr, tok_cfg, "lognorm", batch_size=args.batch_size)
    row["after_s"] = round(time.perf_counter() - t0, 2)
    row["before_cells_per_s"] = round(csr.shape[0] / row["before_s"], 1)
    row["after_cells_per_s"] = round(csr.shape[0] / row["after_s"], 1)
    row["speedup"] = round(row["before_s"] / row["after_s"], 3)
    row["max_abs_diff_embedding"] = float(np.abs(emb0 - emb1).max())
    row["max_abs_diff_prob"] = float(np.abs(prob0 - prob1).max())
    row["same_top_label"] = bool((prob0.argmax(1) == prob1.argmax(1)).all())
    row["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
