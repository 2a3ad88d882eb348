"""Atlas benchmark (issue 14): parallel ingest scaling, a 10M-cell corpus written in parts and streamed by 2 ranks.

Each step is one command, so that every one fits a turn of the shared machine's lock; results are appended
as JSON lines to --results (default .bench/atlas/results.jsonl), each with the load average around it.

    python benchmarks/atlas_bench.py synth --first 0 --count 5 --cells 1000000 --nnz 1000 --compression lzf
    python benchmarks/atlas_bench.py ingest --first 0 --count 5 --workers 2 [--append]  # the 10M store
    python benchmarks/atlas_bench.py scaling --h5ad FILE --workers 1 2                 # cells/s, RSS per worker
    torchrun --nproc_per_node=2 benchmarks/atlas_bench.py stream STORE --out JSON       # one epoch, 2 ranks

Steps run under /usr/bin/time (peak RSS of the largest process); the parallel ingest prints its plan's and
each part's own time and peak RSS, which are parsed from its output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(".bench/atlas")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def dir_bytes(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def record(results: Path, row: dict) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def timed(cmd: list[str]) -> dict:
    """Run cmd under /usr/bin/time: wall, peak RSS of the largest process, CPU, its output, load around it."""
    timing = WORK / f".time-{os.getpid()}"
    before, t0 = load(), time.time()
    proc = subprocess.run(
        ["/usr/bin/time", "-o", str(timing), "-f", "%e %M %U %S", *cmd], capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    wall, rss_kb, user, sys_s = timing.read_text().split()[-4:]
    timing.unlink()
    return {
        "cmd": " ".join(cmd),
        "started": time.strftime("%H:%M:%S", time.gmtime(t0)),
        "wall_s": float(wall),
        "peak_rss_mib": int(rss_kb) / 1024,
        "cpu_s": float(user) + float(sys_s),
        "load_before": before,
        "load_after": load(),
        "stdout": proc.stdout,
    }


def parse_ingest(stdout: str) -> dict:
    """The plan's and each part's own seconds and peak RSS, from `ingest --workers` output."""
    out: dict = {"parts": []}
    m = re.search(r"planned in ([\d.]+) s, peak RSS (\d+) MiB", stdout)
    if m:
        out["plan_s"], out["plan_rss_mib"] = float(m[1]), int(m[2])
    for m in re.finditer(
        r"part (\d+)/(\d+) written: (\d+) shards, (\d+) cells in ([\d.]+) s, peak RSS (\d+) MiB", stdout
    ):
        out["parts"].append({"part": int(m[1]), "cells": int(m[4]), "s": float(m[5]), "rss_mib": int(m[6])})
    return out


def h5ad_path(i: int) -> Path:
    return WORK / f"synth_{i:02d}.h5ad"


def cmd_synth(args: argparse.Namespace) -> None:
    """Synthetic .h5ad files, two at a time (2 cores); seeds differ, so the corpus holds distinct cells."""
    procs = []
    for i in range(args.first, args.first + args.count):
        cmd = [sys.executable, "-m", "data_tools", "synth", "--quiet", "--cells", str(args.cells)]
        cmd += ["--genes", "20000", "--nnz-per-cell", str(args.nnz), "--seed", str(1000 + i)]
        cmd += ["--h5ad-compression", args.compression, "--overwrite", "--out", str(h5ad_path(i))]
        procs.append(cmd)
    t0 = time.time()
    before = load()
    running: list[subprocess.Popen] = []
    for cmd in procs:
        while len(running) >= args.parallel:
            running = [p for p in running if p.poll() is None]
            time.sleep(0.5)
        running.append(subprocess.Popen(cmd))
    for p in running:
        p.wait()
    files = [h5ad_path(i) for i in range(args.first, args.first + args.count)]
    record(
        args.results,
        {
            "step": "synth",
            "files": [str(f) for f in files],
            "wall_s": time.time() - t0,
            "bytes": sum(dir_bytes(f) for f in files),
            "load_before": before,
            "load_after": load(),
        },
    )


def cmd_ingest(args: argparse.Namespace) -> None:
    """Ingest synth files first..first+count-1 into the corpus store with --workers (or --append to it)."""
    files = [str(h5ad_path(i)) for i in range(args.first, args.first + args.count)]
    cmd = [sys.executable, "-m", "data_tools", "ingest", *files, "-o", str(args.store), "--no-progress"]
    cmd += ["--workers", str(args.workers), "--obs-columns", "cell_type,batch"] + (
        ["--append"] if args.append else []
    )
    for f in files:  # --name-suffix: the same files again under other dataset names (a corpus twice as big)
        cmd += ["--dataset-name", Path(f).stem + args.name_suffix] if args.name_suffix else []
    res = timed(cmd)
    row = {
        "step": "ingest",
        "files": files,
        "workers": args.workers,
        **parse_ingest(res.pop("stdout")),
        **res,
    }
    row["store_bytes"] = dir_bytes(args.store)
    row["index_bytes"] = (args.store / "index.json").stat().st_size
    record(args.results, row)


def cmd_scaling(args: argparse.Namespace) -> None:
    """The same .h5ad ingested serially and with each --workers N; cells/s, plan and per-worker time and RSS."""
    for w in args.workers:
        store = WORK / f"scaling_{w}"
        shutil.rmtree(store, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "data_tools",
            "ingest",
            str(args.h5ad),
            "-o",
            str(store),
            "--no-progress",
        ]
        cmd += ["--obs-columns", "cell_type,batch"] + (["--workers", str(w)] if w else [])
        res = timed(cmd)
        row = {
            "step": "scaling",
            "workers": w,
            "h5ad": str(args.h5ad),
            **parse_ingest(res.pop("stdout")),
            **res,
        }
        row["store_bytes"] = dir_bytes(store)
        record(args.results, row)
        if args.compare_to_serial and w:
            same = subprocess.run(["diff", "-rq", str(WORK / "scaling_0"), str(store)], capture_output=True)
            record(
                args.results, {"step": "scaling-identical", "workers": w, "identical": same.returncode == 0}
            )
    if not args.keep:
        for w in args.workers:
            shutil.rmtree(WORK / f"scaling_{w}", ignore_errors=True)


def cmd_stream(args: argparse.Namespace) -> None:
    """One whole epoch, shuffled and tokenised, on this rank (run under torchrun); rank 0 writes the figures."""
    import torch.distributed as dist

    from sclabel_dist.config import DataConfig, TokenizeConfig
    from sclabel_dist.data.dataset import build_dataset

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    data = DataConfig(stores=[str(args.store)], batch_size=args.batch_size)
    ds = build_dataset(data, TokenizeConfig(max_len=args.max_len), rank=rank, world_size=world, seed=0)
    opened = time.perf_counter() - t0
    cells, first = 0, None
    t_start = time.perf_counter()
    for batches, batch in enumerate(ds, 1):
        if ds.epoch != 0:
            break
        if first is None:
            first = time.perf_counter() - t0
            t_after_first = time.perf_counter()
            first_cells = batch.gene_ids.shape[0]
        cells += batch.gene_ids.shape[0]
        if args.max_batches and batches >= args.max_batches:
            break
        if args.time_limit and time.perf_counter() - t0 > args.time_limit:
            break  # recorded as a partial epoch ("complete": false) rather than lost to a timeout
    complete = ds.epoch != 0
    wall = time.perf_counter() - t_start
    steady = time.perf_counter() - t_after_first
    ds.close()
    mine = {
        "rank": rank,
        "complete": complete,
        "cells": cells,
        "wall_s": wall,
        "open_s": opened,
        "first_batch_s": first,
        "cells_per_s": cells / wall,
        "steady_cells_per_s": (cells - first_cells) / steady if steady > 0 else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
    }
    rows: list = [None] * world
    dist.all_gather_object(rows, mine)
    if rank == 0:
        total = sum(r["cells"] for r in rows)
        wall = max(r["wall_s"] for r in rows)
        row = {
            "step": "stream",
            "store": str(args.store),
            "ranks": rows,
            "cells": total,
            "cells_per_s": total / wall,
            "load": load(),
        }
        record(args.results, row)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=WORK / "results.jsonl")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth")
    s.add_argument("--first", type=int, default=0)
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--cells", type=int, default=1_000_000)
    s.add_argument("--nnz", type=float, default=1000)
    s.add_argument("--compression", default="none", choices=("none", "gzip", "lzf"))
    s.add_argument("--parallel", type=int, default=2)
    s = sub.add_parser("ingest")
    s.add_argument("--first", type=int, default=0)
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--store", type=Path, default=WORK / "corpus")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--append", action="store_true")
    s.add_argument("--name-suffix", default="", help="dataset names: file stem + this suffix")
    s = sub.add_parser("scaling")
    s.add_argument("--h5ad", type=Path, required=True)
    s.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0 = the serial ingest")
    s.add_argument("--compare-to-serial", action="store_true", help="check every store equals the serial one")
    s.add_argument("--keep", action="store_true")
    s = sub.add_parser("stream")
    s.add_argument("store", type=Path)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--max-len", type=int, default=512)
    s.add_argument("--max-batches", type=int, default=0, help="stop early (0 = the whole epoch)")
    s.add_argument("--time-limit", type=float, default=0, help="stop after this many seconds (0 = none)")
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    {"synth": cmd_synth, "ingest": cmd_ingest, "scaling": cmd_scaling, "stream": cmd_stream}[args.command](
        args
    )


if __name__ == "__main__":
    main()
