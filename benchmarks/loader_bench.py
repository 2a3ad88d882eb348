"""Loader benchmark: our Zarr / SOMA streams vs tiledbsoma-ml and annbatch on the same synthetic atlas.

    python benchmarks/loader_bench.py prepare --cells 200000      # synth store + h5ad, SOMA, annbatch store
    python benchmarks/loader_bench.py run --cells 200000          # every method, each in its own process

Each method runs in a fresh subprocess (peak RSS is per method) and streams shuffled batches of 256:
time to first batch (construction included), then a warm-up, then 3 timed repeats; cells/s is the median.
annbatch needs Python 3.12: it runs in .bench/venv312 (created by `prepare`) via benchmarks/annbatch_bench.py.
Data lives under .bench/ (git-ignored). Run under `flock /tmp/sclabel-heavy.lock` on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
VENV312 = BENCH / "venv312"
BATCH = 256
METHODS = ("ours_raw", "ours_tokenized", "ours_soma_raw", "tiledbsoma_ml", "annbatch")


def paths(cells: int) -> dict[str, Path]:
    tag = f"{cells // 1000}k"
    return {
        "store": BENCH / f"store{tag}",
        "h5ad": BENCH / f"synth{tag}.h5ad",
        "soma": BENCH / f"soma{tag}",
        "annbatch": BENCH / f"annbatch{tag}.zarr",
    }


def sh(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def prepare(cells: int, genes: int, nnz: int, soma: bool, annbatch: bool) -> None:
    """Write the synthetic atlas once per format (same seed: the same cells in every format)."""
    p = paths(cells)
    BENCH.mkdir(exist_ok=True)
    synth = [
        "sclabel-data",
        "synth",
        "--cells",
        cells,
        "--genes",
        genes,
        "--nnz-per-cell",
        nnz,
        "--seed",
        "0",
    ]
    if not (p["store"] / "index.json").exists():
        sh([*synth, "--out", p["store"], "--quiet", "--overwrite"])
    if soma and not p["soma"].exists():
        sh(["sclabel-data", "to-soma", p["store"], "--out", p["soma"], "--quiet"])
    if annbatch:
        if not (VENV312 / "bin" / "python").exists():
            sh(["/root/.pyenv/versions/3.12.1/bin/python", "-m", "venv", VENV312])
            sh([VENV312 / "bin" / "pip", "install", "-q", "annbatch", "zarrs"])
        if not p["h5ad"].exists():
            sh([*synth, "--out", p["h5ad"], "--quiet", "--overwrite"])
        if not p["annbatch"].exists():
            helper = Path(__file__).with_name("annbatch_bench.py")
            sh([VENV312 / "bin" / "python", helper, "prepare", p["h5ad"], p["annbatch"]])


# --------------------------------------------------------------------------------------------------------
# one method, in this process


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(make_iter, warmup: int, batches: int, repeats: int, count) -> dict:
    """Time to first batch, then cells/s over `repeats` runs of `batches` batches after a warm-up."""
    t0 = time.perf_counter()
    it = make_iter()
    count(next(it))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        count(next(it))
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        cells = sum(count(next(it)) for _ in range(batches))
        rates.append(cells / (time.perf_counter() - t))
    return {
        "cells_per_s": statistics.median(rates),
        "rates": rates,
        "first_batch_s": first,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_ours(store: Path, tokenized: bool, args: argparse.Namespace, vocab: str = "") -> dict:
    from sclabel_dist.config import DataConfig, TokenizeConfig
    from sclabel_dist.data.dataset import build_dataset

    data = DataConfig(
        stores=[str(store)],
        vocab=vocab,
        batch_size=BATCH,
        chunk_size=args.chunk_size,
        shuffle_chunks=args.shuffle_chunks,
        read_threads=args.threads,
        read_ahead=args.read_ahead,
    )
    tok = TokenizeConfig(max_len=1024, gene_bag=args.gene_bag)
    holder = {}

    def make():
        holder["ds"] = build_dataset(data, tok, rank=0, world_size=1, seed=0, raw=not tokenized)
        return iter(holder["ds"])

    count = (lambda b: b.num_cells) if tokenized else (lambda b: b.num_rows)
    out = measure(make, args.warmup, args.batches, args.repeats, count)
    holder["ds"].close()
    return out


def epochs(loader) -> Iterator:
    """Batches of epoch after epoch (a DataLoader stops after one; ours streams on)."""
    while True:
        yield from loader


def run_soma_ml(soma: Path, args: argparse.Namespace) -> dict:
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    state = {}

    def make():
        exp = tiledbsoma.Experiment.open(str(soma))
        query = exp.axis_query(measurement_name="RNA")
        layers = list(exp.ms["RNA"].X.keys())
        layer = "counts" if "counts" in layers else layers[0]
        ds = ExperimentDataset(query, layer_name=layer, batch_size=BATCH, shuffle=True, return_sparse_X=True)
        state["exp"] = exp
        return epochs(experiment_dataloader(ds))

    out = measure(make, args.warmup, args.batches, args.repeats, lambda b: b[0].shape[0])
    state["exp"].close()
    return out


def run_method(method: str, args: argparse.Namespace) -> dict:
    p = paths(args.cells)
    if method == "ours_raw":
        return run_ours(p["store"], False, args)
    if method == "ours_tokenized":
        return run_ours(p["store"], True, args)
    if method == "ours_soma_raw":
        return run_ours(p["soma"], False, args, vocab=str(p["store"] / "vocab.json"))
    if method == "tiledbsoma_ml":
        return run_soma_ml(p["soma"], args)
    if method == "annbatch":
        helper = Path(__file__).with_name("annbatch_bench.py")
        cmd = [str(VENV312 / "bin" / "python"), str(helper), "run", str(p["annbatch"])]
        cmd += ["--warmup", str(args.warmup), "--batches", str(args.batches), "--repeats", str(args.repeats)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads(res.stdout.strip().splitlines()[-1])
    raise SystemExit(f"unknown method {method}")


# --------------------------------------------------------------------------------------------------------
# driver


def run_all(args: argparse.Namespace) -> None:
    results = {}
    for method in args.methods:
        cmd = [sys.executable, __file__, "one", method, "--cells", str(args.cells)]
        for k in ("chunk_size", "shuffle_chunks", "threads", "read_ahead", "warmup", "batches", "repeats"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if not args.gene_bag:
            cmd.append("--no-gene-bag")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{method}: FAILED\n{res.stderr[-2000:]}", flush=True)
            continue
        results[method] = json.loads(res.stdout.strip().splitlines()[-1])
        r = results[method]
        print(
            f"{method:16s} {r['cells_per_s']:>10,.0f} cells/s  first batch {r['first_batch_s']:6.2f} s  "
            f"peak RSS {r['peak_rss_mb']:7,.0f} MB",
            flush=True,
        )
    load = os.getloadavg()
    meta = {"cells": args.cells, "cpus": os.cpu_count(), "loadavg": load, "time": time.strftime("%F %T")}
    print(json.dumps(meta))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("prepare", "run", "one"))
    ap.add_argument("method", nargs="?", default=None)
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--nnz", type=int, default=1500)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--no-soma", action="store_true")
    ap.add_argument("--no-annbatch", action="store_true")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--shuffle-chunks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--read-ahead", type=int, default=2)
    ap.add_argument(
        "--no-gene-bag",
        dest="gene_bag",
        action="store_false",
        help="tokenised: leave out the gene-bag arrays",
    )
    ap.add_argument("--warmup", type=int, default=20)
    # 256 batches of 256 = 65,536 cells: one tiledbsoma-ml IO batch (its default io_batch_size), so each
    # repeat holds exactly one of its reads, as in its steady state, and 8 of our 8,192-cell windows.
    ap.add_argument("--batches", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.command == "prepare":
        prepare(args.cells, args.genes, args.nnz, not args.no_soma, not args.no_annbatch)
    elif args.command == "run":
        run_all(args)
    else:
        print(json.dumps(run_method(args.method, args)))


if __name__ == "__main__":
    main()
