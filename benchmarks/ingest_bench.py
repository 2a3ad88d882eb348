"""Ingest benchmark: synth -> .h5ad, `sclabel-data ingest` of it, synth -> store; cells/s, peak RSS, sizes.

Each step runs in its own process under /usr/bin/time (peak RSS = the child's ru_maxrss), optionally behind
a flock so that heavy jobs on a shared machine do not overlap. The load average is recorded with every step.

    python benchmarks/ingest_bench.py --cells 200000 1000000 --workdir .bench/ingest
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_step(name: str, cmd: list[str], lock: str | None) -> dict:
    """Run `cmd` under /usr/bin/time (and flock); returns wall seconds, peak RSS and the load around it."""
    timing = Path(f"/tmp/ingest_bench_time_{os.getpid()}.txt")
    full = ["/usr/bin/time", "-o", str(timing), "-f", "%e %M %U %S", *cmd]
    if lock:
        full = ["flock", lock, *full]
    before = load()
    t0 = time.time()
    proc = subprocess.run(full, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    wall, rss_kb, user, sys_s = timing.read_text().split()[-4:]
    timing.unlink()
    out = {
        "step": name,
        "wall_s": float(wall),
        "peak_rss_mib": int(rss_kb) / 1024,
        "cpu_s": float(user) + float(sys_s),
        "load_before": before,
        "load_after": load(),
        "started": time.strftime("%H:%M:%S", time.gmtime(t0)),
        "stdout_tail": proc.stdout.strip().splitlines()[-1:],
    }
    print(json.dumps(out), flush=True)
    return out


def bench_size(cells: int, args: argparse.Namespace, work: Path) -> dict:
    synth = [sys.executable, "-m", "data_tools", "synth", "--quiet", "--cells", str(cells)]
    synth += ["--genes", str(args.genes), "--nnz-per-cell", str(args.nnz_per_cell), "--seed", "0"]
    h5ad, store, direct = work / f"synth_{cells}.h5ad", work / f"ingested_{cells}", work / f"direct_{cells}"
    for p in (h5ad, store, direct):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    res = {"cells": cells}
    res["synth_h5ad"] = run_step(f"synth->h5ad {cells}", [*synth, "--out", str(h5ad)], args.lock)
    ingest = [sys.executable, "-m", "data_tools", "ingest", str(h5ad), "-o", str(store), "--no-progress"]
    res["ingest"] = run_step(f"ingest {cells}", ingest + args.ingest_args, args.lock)
    res["synth_store"] = run_step(f"synth->store {cells}", [*synth, "--out", str(direct)], args.lock)
    res["h5ad_bytes"], res["store_bytes"] = dir_bytes(h5ad), dir_bytes(store)
    res["direct_store_bytes"] = dir_bytes(direct)
    if not args.keep:
        for p in (h5ad, store, direct):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return res


def table(results: list[dict]) -> str:
    rows = [
        "| cells | synth->h5ad cells/s | ingest cells/s | ingest peak RSS MiB | synth->store cells/s "
        "| synth->store peak RSS MiB | .h5ad MiB | store MiB | store/h5ad | load (before ingest) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        n, ing = r["cells"], r["ingest"]
        rows.append(
            f"| {n:,} | {n / r['synth_h5ad']['wall_s']:,.0f} | {n / ing['wall_s']:,.0f} "
            f"| {ing['peak_rss_mib']:,.0f} | {n / r['synth_store']['wall_s']:,.0f} "
            f"| {r['synth_store']['peak_rss_mib']:,.0f} | {r['h5ad_bytes'] / 2**20:,.0f} "
            f"| {r['store_bytes'] / 2**20:,.0f} | {r['store_bytes'] / r['h5ad_bytes']:.3f} | {ing['load_before']} |"
        )
    if len(results) >= 2:
        a, b = results[0], results[-1]
        ratio = b["ingest"]["peak_rss_mib"] / a["ingest"]["peak_rss_mib"]
        rows.append(f"\ningest peak RSS ratio {b['cells']:,} / {a['cells']:,} cells: {ratio:.3f}")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[200_000, 1_000_000])
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--nnz-per-cell", type=float, default=1500)
    p.add_argument("--workdir", type=Path, default=Path(".bench/ingest"))
    p.add_argument("--lock", default="/tmp/sclabel-heavy.lock", help="flock file per step ('' = none)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--ingest-args", nargs=argparse.REMAINDER, default=[], help="extra ingest arguments")
    p.add_argument("--json", type=Path, help="write all results here")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = [bench_size(n, args, args.workdir) for n in args.cells]
    print(f"\nmachine: {os.cpu_count()} CPUs; load now {load()}\n" + table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
