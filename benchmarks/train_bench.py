"""Training throughput of ScLabel-Net vs Hugging Face BertForMaskedLM at the same shape: tokens/s, MFU, memory.

Single device, plain torch (AdamW, bf16 autocast on CUDA): this measures the model, not the distributed stack.
With --store it also trains from the real streaming loader and reports the fraction of step time spent waiting
for data. Prints one JSON line per measurement and, with --out, writes them all as a JSON list.

    python benchmarks/train_bench.py                                   # GPU: small + base, seq 512, bf16
    python benchmarks/train_bench.py --store runs/data/synth.zarr      # also with the real loader
    python benchmarks/train_bench.py --tiny                            # CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from sclabel_dist.data.batch import CellBatch
from sclabel_dist.metrics import peak_flops, peak_memory_gb
from sclabel_dist.model.args import FLAVOURS, ModelArgs, count_params, flops_per_token
from sclabel_dist.model.net import ScLabelNet, mlm_loss

VOCAB = 20_002  # ~20k genes + 2 special tokens, as a human / mouse protein-coding vocabulary


def synthetic_batch(batch: int, seq: int, num_bins: int, device: str, seed: int = 0) -> CellBatch:
    """Full-length cells (every position real): the dense case that max_len sizing aims for."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    ids[:, 0] = 1
    targets = torch.randint(1, num_bins + 1, (batch, seq), generator=g)
    targets[:, 0] = 0
    am = torch.ones(batch, seq, dtype=torch.bool)
    masked = torch.rand(batch, seq, generator=g) < 0.15
    masked[:, 0] = False
    return CellBatch(ids, targets.masked_fill(masked, 0), am, masked, targets).to(device)


def make_optimizer(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.startswith("cuda") else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)


def timed_loop(step_fn, batches, steps: int, warmup: int, device: str) -> dict[str, float]:
    """Run warmup + steps; returns seconds, data-wait seconds and tokens over the timed steps."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        step_fn(next(batches))
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    wait = tokens = cells = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        tokens += batch.num_tokens
        cells += batch.num_cells
        step_fn(batch)
    sync()
    return {"seconds": time.perf_counter() - start, "data_wait_s": wait, "tokens": tokens, "cells": cells}


def bench_ours(args: ModelArgs, batches, steps: int, warmup: int, device: str, bf16: bool, compile_: bool):
    torch.manual_seed(0)
    model = ScLabelNet(args).to(device)
    opt = make_optimizer(model, device)
    fwd = torch.compile(model) if compile_ else model

    def step(batch: CellBatch) -> None:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            out = fwd(batch.gene_ids, batch.values, batch.attention_mask, batch.masked)
            loss, _ = mlm_loss(out, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed_loop(step, batches, steps, warmup, device)


def bench_bert(args: ModelArgs, batches, steps: int, warmup: int, device: str, bf16: bool):
    """BertForMaskedLM (the Geneformer architecture) at our width / depth / heads / MLP / sequence length."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        num_hidden_layers=args.depth,
        num_attention_heads=args.heads,
        intermediate_size=args.mlp_dim,
        max_position_embeddings=args.max_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config).to(device)
    opt = make_optimizer(model, device)

    def step(batch: CellBatch) -> None:
        # Geneformer masks gene tokens and predicts the gene id over the whole vocabulary
        labels = batch.gene_ids.masked_fill(~batch.masked, -100)
        inputs = batch.gene_ids.masked_fill(batch.masked, 1)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=inputs, attention_mask=batch.attention_mask.long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed_loop(step, batches, steps, warmup, device)


def summarise(name: str, args: ModelArgs, res: dict[str, float], device: str, **extra: Any) -> dict[str, Any]:
    tokens_s = res["tokens"] / res["seconds"]
    peak = peak_flops(device)
    out = {
        "name": name,
        "dim": args.dim,
        "depth": args.depth,
        "heads": args.heads,
        "seq_len": args.max_len,
        "params_m": round(count_params(args) / 1e6, 2),
        "tokens_per_s": round(tokens_s, 1),
        "cells_per_s": round(res["cells"] / res["seconds"], 2),
        "step_ms": round(1e3 * res["seconds"] / extra.pop("steps"), 2),
        "data_wait_frac": round(res["data_wait_s"] / res["seconds"], 4),
        "peak_mem_gb": round(peak_memory_gb(device), 3),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        **extra,
    }
    if peak:
        out["mfu"] = round(tokens_s * flops_per_token(args, args.max_len) / peak, 4)
    return out


def loader_batches(store: str, batch: int, seq: int, num_bins: int, device: str):
    """The real streaming loader (rank 0 of 1) over `store`, moved to the device as the training loop does."""
    from sclabel_dist.config import DataConfig, TokenizeConfig
    from sclabel_dist.data.dataset import build_dataset

    data = DataConfig(stores=[store], batch_size=batch, read_threads=4)
    tok = TokenizeConfig(max_len=seq, num_bins=num_bins)
    ds = build_dataset(data, tok, rank=0, world_size=1, seed=0, split="train")
    for b in ds:
        yield b.to(device, non_blocking=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavours", default="small,base", help="comma-separated flavours")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--store", help="also train from this cell store with the real loader")
    p.add_argument("--no-bert", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: debug flavour, seq 64, 3 steps, fp32")
    p.add_argument("--out", help="write all results as a JSON list here")
    a = p.parse_args(argv)
    if a.tiny:
        a.flavours, a.seq_len, a.batch_size, a.steps, a.warmup = "debug", 64, 4, 3, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda"
    results = []
    for flavour in a.flavours.split(","):
        dim, depth, heads = FLAVOURS[flavour]
        args = ModelArgs(vocab_size=VOCAB, dim=dim, depth=depth, heads=heads, num_bins=51, max_len=a.seq_len)
        fixed = synthetic_batch(a.batch_size, a.seq_len, args.num_bins, device)
        runs = [
            (
                "sclabel",
                lambda args=args, fixed=fixed: bench_ours(
                    args, iter(lambda: fixed, None), a.steps, a.warmup, device, bf16, a.compile
                ),
            )
        ]
        if a.store:
            runs.append(
                (
                    "sclabel+loader",
                    lambda args=args: bench_ours(
                        args,
                        loader_batches(a.store, a.batch_size, a.seq_len, args.num_bins, device),
                        a.steps,
                        a.warmup,
                        device,
                        bf16,
                        a.compile,
                    ),
                )
            )
        if not a.no_bert:
            runs.append(
                (
                    "hf_bert_mlm",
                    lambda args=args, fixed=fixed: bench_bert(
                        args, iter(lambda: fixed, None), a.steps, a.warmup, device, bf16
                    ),
                )
            )
        for name, run in runs:
            if device == "cuda":
                torch.cuda.empty_cache()
            try:
                res = run()
            except ImportError as exc:
                print(json.dumps({"name": name, "flavour": flavour, "skipped": str(exc)}))
                continue
            row = summarise(
                name,
                args,
                res,
                device,
                flavour=flavour,
                precision="bf16" if bf16 else "fp32",
                batch_size=a.batch_size,
                steps=a.steps,
            )
            results.append(row)
            print(json.dumps(row), flush=True)
        ours = {r["name"]: r for r in results if r.get("flavour") == flavour}
        if "sclabel" in ours and "hf_bert_mlm" in ours:
            ratio = ours["sclabel"]["tokens_per_s"] / ours["hf_bert_mlm"]["tokens_per_s"]
            print(json.dumps({"flavour": flavour, "speedup_vs_bert": round(ratio, 3)}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
