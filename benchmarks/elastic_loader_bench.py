"""Loader cost of data.elastic (the world-size-invariant order) against the default rank-local order.

    python benchmarks/elastic_loader_bench.py --store .bench/store200k --worlds 1,2,4 --batches 120

Streams rank 0's tokenised batches of one world size in this process (each rank of a real run is its own
process with its own readers, so rank 0's rate is a rank's rate), after a warm-up, with the loader's usual
threads. The rank-local order reads whole chunks of the rank's own share; the elastic one reads a 1/W slice
of every window's chunks, so a rank touches W times as many chunks per cell. Prints one JSON line per pass.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def one_pass(store: str, world: int, elastic: bool, args) -> dict:
    from sclabel_dist.config import DataConfig, TokenizeConfig
    from sclabel_dist.data.dataset import build_dataset

    data = DataConfig(
        stores=[store],
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        shuffle_chunks=args.shuffle_chunks,
        read_threads=args.threads,
        read_ahead=args.read_ahead,
        elastic=elastic,
    )
    tok = TokenizeConfig(max_len=args.max_len)
    t0 = time.perf_counter()
    ds = build_dataset(data, tok, rank=0, world_size=world, seed=0)
    it = iter(ds)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        next(it)
    cpu0, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cells = sum(next(it).num_cells for _ in range(args.batches))
    wall = time.perf_counter() - t1
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    ds.close()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "world": world,
        "order": "elastic" if elastic else "rank-local",
        "first_batch_s": round(first, 2),
        "cells_per_s": round(cells / wall),
        "cpu_per_wall": round(cpu / wall, 2),
        "load_before": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--batches", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--shuffle-chunks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--read-ahead", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=512)
    args = ap.parse_args()
    for world in map(int, args.worlds.split(",")):
        for elastic in (False, True):
            print(json.dumps(one_pass(args.store, world, elastic, args)), flush=True)


if __name__ == "__main__":
    main()
