"""Loader benchmark: our Zarr / SOMA streams vs tiledbsoma-ml and annbatch on the same synthetic atlas.

    python benchmarks/loader_bench.py prepare --cells 200000      # synth store + h5ad, SOMA, annbatch store
    python benchmarks/loader_bench.py run --cells 200000 --out run.json   # every method, cold then warm
    python benchmarks/loader_bench.py markdown run.json ...       # RESULTS.md rows from run JSONs

Each method runs in a fresh subprocess (peak RSS is per method) and streams shuffled batches of 256: time to
first batch (construction included; the clock starts once the method's libraries are imported, and that
import is reported as import_s), then a warm-up, then timed repeats, every one reported with the CPU
seconds it took, the cores the rest of the machine kept busy meanwhile and the bytes fetched from storage.
Each method runs a cold pass (its data files evicted from the page cache) and then a warm one. The JSON holds
the machine (cores, CPU model, load), the numba cache state and the package versions of both environments.
annbatch needs Python 3.12: it runs in .bench/venv312 (created by `prepare` from $SCLABEL_PYTHON312, PATH or
pyenv) via benchmarks/annbatch_bench.py. Data lives under .bench/ (git-ignored). Run under
`flock /tmp/sclabel-heavy.lock` on shared machines, and read cells/s only where others' cores stayed near 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench_measure import (  # benchmarks/ is on sys.path when this runs as a script
    evict,
    machine,
    measure,
    numba_cache_state,
    resident_fraction,
    versions,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
VENV312 = BENCH / "venv312"
BATCH = 256
METHODS = ("ours_raw", "ours_tokenized", "ours_soma_raw", "tiledbsoma_ml", "annbatch", "scdataset")


def paths(cells: int) -> dict[str, Path]:
    tag = f"{cells // 1000}k"
    return {
        "store": BENCH / f"store{tag}",
        "store_preshuffled": BENCH / f"store{tag}_preshuffled",
        "h5ad": BENCH / f"synth{tag}.h5ad",
        "soma": BENCH / f"soma{tag}",
        "annbatch": BENCH / f"annbatch{tag}.zarr",
    }


def find_python312() -> str:
    """A Python 3.12 interpreter for annbatch's venv: $SCLABEL_PYTHON312, then PATH, then pyenv's versions.

    annbatch needs 3.12 and our own venv is 3.11; machines differ in where (or whether) a 3.12 lives.
    """
    env = os.environ.get("SCLABEL_PYTHON312")
    candidates = [env] if env else []
    candidates += [shutil.which("python3.12") or ""]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += [
        str(p / "bin" / "python3.12") for p in sorted(pyenv_root.glob("versions/3.12*"), reverse=True)
    ]
    for exe in filter(None, candidates):
        try:
            out = subprocess.run(
                [exe, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except OSError:
            continue
        if out.stdout.strip() == "True":
            return exe
    raise SystemExit(
        "annbatch needs Python 3.12: none found on PATH or under pyenv; set SCLABEL_PYTHON312 to one "
        "(or pass --no-annbatch)"
    )


def sh(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def prepare(
    cells: int, genes: int, nnz: int, soma: bool, annbatch: bool, preshuffled: bool = False, h5ad: bool = True
) -> None:
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
    if preshuffled and not (p["store_preshuffled"] / "index.json").exists():
        # The same cells shuffled at write time (annbatch's layout): only which cells a chunk holds changes.
        if not p["h5ad"].exists():
            sh([*synth, "--out", p["h5ad"], "--quiet", "--overwrite"])
        sh(
            [
                "sclabel-data",
                "ingest",
                p["h5ad"],
                "-o",
                p["store_preshuffled"],
                "--shuffle",
                "--no-progress",
                "--overwrite",
            ]
        )
    if (h5ad or annbatch) and not p["h5ad"].exists():  # scDataset reads it (backed), annbatch converts it
        sh([*synth, "--out", p["h5ad"], "--quiet", "--overwrite"])
    if annbatch:
        if not (VENV312 / "bin" / "python").exists():
            sh([find_python312(), "-m", "venv", VENV312])
            sh([VENV312 / "bin" / "pip", "install", "-q", "annbatch", "zarrs"])
        if not p["annbatch"].exists():
            helper = Path(__file__).with_name("annbatch_bench.py")
            sh([VENV312 / "bin" / "python", helper, "prepare", p["h5ad"], p["annbatch"]])


# --------------------------------------------------------------------------------------------------------
# page cache: what a method's data costs cold (first pass after eviction) and warm (the pass right after)


def data_files(method: str, cells: int) -> list[Path]:
    """Every file the method reads its cells from (the page-cache state of these is what a pass is run in)."""
    p = paths(cells)
    root = {
        "ours_raw": p["store"],
        "ours_raw_preshuffled": p["store_preshuffled"],
        "ours_tokenized": p["store"],
        "ours_soma_raw": p["soma"],
        "tiledbsoma_ml": p["soma"],
        "annbatch": p["annbatch"],
        "scdataset": p["h5ad"],
    }[method]
    return [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------------------
# one method, in this process


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
    out["threads_info"]["read_threads"] = args.threads
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


def run_scdataset(h5ad: Path, args: argparse.Namespace) -> dict:
    """scDataset over the backed .h5ad as its documentation sets it up for AnnData: BlockShuffling(block_size
    16), fetch_factor 16 (16 batches fetched at once, in sorted row order, then shuffled), a fetch callback
    `adata[indices].X`, and a DataLoader with batch_size=None and prefetch_factor = fetch_factor + 1. Its
    example's 4 workers are capped at this run's reader threads (the machine's cores); its example densifies
    each fetch, left out here: every method yields sparse CSR rows."""
    import anndata as ad
    from scdataset import BlockShuffling, scDataset
    from torch.utils.data import DataLoader

    fetch_factor = 16

    def fetch(adata, indices):
        return adata[indices].X

    def make():
        adata = ad.read_h5ad(h5ad, backed="r")
        ds = scDataset(
            adata,
            BlockShuffling(block_size=16),
            batch_size=BATCH,
            fetch_factor=fetch_factor,
            fetch_callback=fetch,
            seed=0,
        )
        workers = args.threads
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=fetch_factor + 1 if workers else None,
            persistent_workers=workers > 0,
        )
        return epochs(loader)

    out = measure(make, args.warmup, args.batches, args.repeats, lambda b: b.shape[0])
    out["threads_info"]["dataloader_workers"] = args.threads
    return out


# What each method reads with, imported before its clock starts. annbatch's clock (annbatch_bench.run),
# scDataset's and tiledbsoma-ml's have always started after their libraries were imported; ours used to
# include tiledbsoma's import (0.5-1 s: it pulls in anndata and pandas) in the SOMA reader's first batch.
# Every method's import time is reported beside its first batch as import_s, so nothing is left out.
OURS = ("sclabel_dist.data.dataset", "numba")
LIBRARIES = {
    "ours_raw": OURS,
    "ours_raw_preshuffled": OURS,
    "ours_tokenized": OURS,
    "ours_soma_raw": (*OURS, "tiledbsoma"),
    "tiledbsoma_ml": ("tiledbsoma", "tiledbsoma_ml"),
    "scdataset": ("anndata", "scdataset", "torch.utils.data"),
}


def import_libraries(method: str) -> float:
    """Seconds spent importing the method's libraries (this process's first import of them)."""
    t = time.perf_counter()
    for name in LIBRARIES.get(method, ()):
        importlib.import_module(name)
    return time.perf_counter() - t


def run_method(method: str, args: argparse.Namespace) -> dict:
    import_s = import_libraries(method)
    return {**run_method_imported(method, args), "import_s": import_s}


def run_method_imported(method: str, args: argparse.Namespace) -> dict:
    p = paths(args.cells)
    if method == "ours_raw":
        return run_ours(p["store"], False, args)
    if method == "ours_raw_preshuffled":
        return run_ours(p["store_preshuffled"], False, args)
    if method == "ours_tokenized":
        return run_ours(p["store"], True, args)
    if method == "ours_soma_raw":
        return run_ours(p["soma"], False, args, vocab=str(p["store"] / "vocab.json"))
    if method == "tiledbsoma_ml":
        return run_soma_ml(p["soma"], args)
    if method == "scdataset":
        return run_scdataset(p["h5ad"], args)
    raise SystemExit(f"unknown method {method}")


# --------------------------------------------------------------------------------------------------------
# driver


def run_pass(method: str, state: str, args: argparse.Namespace) -> dict:
    """One pass of one method in its own process, its data files evicted first when state is 'cold'."""
    files = data_files(method, args.cells)
    if state == "cold":
        evict(files)
    info = {
        "state": state,
        "resident_before": resident_fraction(files),
        "loadavg_before": os.getloadavg(),
        # a kernel compiled by this pass (none cached yet) costs seconds inside its first batch
        "numba_kernels_cached_before": numba_cache_state()["kernel_index_files"],
    }
    if method == "annbatch":
        helper = Path(__file__).with_name("annbatch_bench.py")
        cmd = [str(VENV312 / "bin" / "python"), str(helper), "run", str(paths(args.cells)["annbatch"])]
        cmd += ["--warmup", str(args.warmup), "--batches", str(args.batches), "--repeats", str(args.repeats)]
    else:
        cmd = [sys.executable, __file__, "one", method, "--cells", str(args.cells)]
        for k in ("chunk_size", "shuffle_chunks", "threads", "read_ahead", "warmup", "batches", "repeats"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if not args.gene_bag:
            cmd.append("--no-gene-bag")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {**info, "error": res.stderr[-2000:]}
    return {**info, **json.loads(res.stdout.strip().splitlines()[-1])}


def run_all(args: argparse.Namespace) -> dict:
    """Every method, each cold (its data evicted from the page cache) then warm, every repeat kept."""
    ours = ("numpy", "numba", "numcodecs", "zarr", "zarrs", "tiledbsoma", "tiledbsoma-ml", "torch", "scipy")
    ours += ("scdataset", "anndata", "h5py")
    theirs = ("annbatch", "anndata", "zarr", "zarrs", "numpy", "numcodecs", "scipy")
    meta = {
        "time_utc": time.strftime("%F %T", time.gmtime()),
        "cells": args.cells,
        "batch_size": BATCH,
        "settings": {k: getattr(args, k) for k in ("chunk_size", "shuffle_chunks", "threads", "read_ahead")},
        "warmup": args.warmup,
        "batches_per_repeat": args.batches,
        "repeats": args.repeats,
        "loadavg_start": os.getloadavg(),
        "machine": machine(),
        "numba_cache_before": numba_cache_state(),
        "versions": {"ours": versions(sys.executable, ours)},
    }
    if "annbatch" in args.methods and (VENV312 / "bin" / "python").exists():
        meta["versions"]["annbatch_venv"] = versions(str(VENV312 / "bin" / "python"), theirs)
    results: dict = {m: [] for m in args.methods}
    # Rounds alternate the methods (A B C, A B C, ...): load that drifts during a run then falls on every
    # method alike instead of on whichever ran during the busy minute.
    for _round in range(args.rounds):
        for method, state in [(m, s) for m in args.methods for s in args.passes]:
            r = run_pass(method, state, args)
            r["round"] = _round
            results[method].append(r)
            if "error" in r:
                print(f"{method} {state}: FAILED\n{r['error']}", flush=True)
                continue
            rates = " ".join(f"{x:,.0f}" for x in r["rates"])
            others = " ".join(f"{x['others_cores']:.1f}" for x in r["repeats"])
            per_cpu = statistics.median(x["cells_per_cpu_s"] or 0 for x in r["repeats"])
            print(
                f"{method:20s} {state:4s} cached {r['resident_before'] or 0:4.0%}  median {r['cells_per_s']:>9,.0f} "
                f"cells/s  repeats [{rates}]  {per_cpu:>9,.0f} cells/CPU-s  first batch "
                f"{r['first_batch_s']:5.2f} s (imports {r.get('import_s', float('nan')):.2f} s)  "
                f"read {r['storage_read_mb']:5.0f} MB  RSS {r['peak_rss_mb']:5,.0f} MB  "
                f"load {r['loadavg_before'][0]:.2f}  kernels cached {r.get('numba_kernels_cached_before')}  "
                f"other processes' cores [{others}]",
                flush=True,
            )
    meta["loadavg_end"] = os.getloadavg()
    out = {"meta": meta, "results": results, "ratios": ratios(results)}
    print(json.dumps(out["ratios"]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


def ratios(results: dict) -> dict:
    """The targets' ratios per pass, on medians and on the worst case (our slowest repeat / their fastest)."""
    pairs = {
        "raw_vs_annbatch": ("ours_raw", "annbatch"),
        "tokenized_vs_annbatch": ("ours_tokenized", "annbatch"),
        "soma_vs_tiledbsoma_ml": ("ours_soma_raw", "tiledbsoma_ml"),
        "raw_vs_scdataset": ("ours_raw", "scdataset"),
        "tokenized_vs_scdataset": ("ours_tokenized", "scdataset"),
    }
    out = {}
    for name, (a, b) in pairs.items():
        ra, rb = results.get(a, []), results.get(b, [])
        for pa, pb in zip(ra, rb, strict=False):
            if "error" in pa or "error" in pb:
                continue
            cpu_a = statistics.median(x["cells_per_cpu_s"] or 0 for x in pa["repeats"])
            cpu_b = statistics.median(x["cells_per_cpu_s"] or 0 for x in pb["repeats"])
            out[f"{name}_{pa['state']}_round{pa.get('round', 0)}"] = {
                "median": pa["cells_per_s"] / pb["cells_per_s"],
                "worst": min(pa["rates"]) / max(pb["rates"]),
                "per_cpu_s": cpu_a / cpu_b if cpu_b else None,
            }
    return out


def fmt_seconds(s: float | None) -> str:
    return "" if s is None else f"{s:.2f} s"  # runs before import_s was recorded leave the cell empty


def markdown(files: list[str]) -> str:
    """RESULTS.md rows from run JSONs: one row per method and pass, every repeat shown."""
    lines = [
        "| run (UTC) | method | pass | cached before | cells/s median | every repeat | cells/CPU-s | first batch | "
        "imports | storage read | CPU/wall | others' cores | peak RSS | load before |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in files:
        run = json.loads(Path(f).read_text())
        when = run["meta"]["time_utc"][11:16]
        for method, passes in run["results"].items():
            for r in passes:
                if "error" in r:
                    lines.append(f"| {when} | {method} | {r['state']} | | FAILED | | | | | | | | | |")
                    continue
                reps = r.get("repeats", [])
                cpu = " / ".join(f"{x['cpu_per_wall']:.2f}" for x in reps)
                others = " / ".join(f"{x['others_cores']:.1f}" for x in reps if "others_cores" in x)
                per_cpu = [x.get("cells_per_cpu_s") or x["cells_per_s"] / x["cpu_per_wall"] for x in reps]
                lines.append(
                    f"| {when} | {method} | {r['state']} | {100 * (r['resident_before'] or 0):.0f}% | "
                    f"{r['cells_per_s']:,.0f} | {' / '.join(f'{x:,.0f}' for x in r['rates'])} | "
                    f"{statistics.median(per_cpu) if per_cpu else 0:,.0f} | "
                    f"{r['first_batch_s']:.2f} s | {fmt_seconds(r.get('import_s'))} | "
                    f"{r['storage_read_mb']:,.0f} MB | {cpu} | {others} | "
                    f"{r['peak_rss_mb']:,.0f} MB | {r['loadavg_before'][0]:.2f} |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("prepare", "run", "one", "markdown"))
    ap.add_argument("method", nargs="?", default=None)
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--nnz", type=int, default=1500)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--no-soma", action="store_true")
    ap.add_argument("--no-annbatch", action="store_true")
    ap.add_argument("--no-scdataset", action="store_true", help="prepare: no .h5ad for scDataset")
    ap.add_argument("--preshuffled", action="store_true", help="prepare: also a store shuffled at write time")
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
    ap.add_argument(
        "--passes",
        nargs="+",
        default=["cold", "warm"],
        choices=("cold", "warm"),
        help="cold: the method's data files evicted from the page cache first; warm: as the previous pass left it",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="run every method's passes this many times, alternating"
    )
    ap.add_argument("--out", default="", help="write the whole run (meta, every pass and repeat) as JSON")
    ap.add_argument("files", nargs="*", help="markdown: run JSONs to tabulate")
    args = ap.parse_args()
    if args.command == "prepare":
        prepare(
            args.cells,
            args.genes,
            args.nnz,
            not args.no_soma,
            not args.no_annbatch,
            args.preshuffled,
            not args.no_scdataset,
        )
    elif args.command == "run":
        run_all(args)
    elif args.command == "markdown":
        print(markdown([args.method, *args.files]))
    else:
        print(json.dumps(run_method(args.method, args)))


if __name__ == "__main__":
    main()
