"""Streaming a cell store from S3-compatible object storage (issue 13): latency hidden or not.

    python benchmarks/s3_bench.py prepare --cells 20000          # synthetic store under .bench/ (local)
    python benchmarks/s3_bench.py run --cells 20000 --out s3.json  # moto + delay proxy, 0/10/50 ms, and disk

`run` starts moto's S3 server (one process) and a loopback proxy (another) that adds a fixed delay to every
request, uploads the store, then streams it with the real loader (shuffled batches of 256) raw and tokenised:
cells/s, object-store requests, the peak and mean number of requests in flight (mean = summed request time /
wall time), retries, and the CPU seconds moto, the proxy and the loader each used; then the same passes from
the local directory for reference. Every measurement runs in a fresh subprocess. Run it under
`flock /tmp/sclabel-heavy.lock`; the machine's load is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
BATCH = 256
DELAYS_MS = (0, 10, 50)
ENV = {  # a loopback test server: these are its dummy credentials
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
}


def store_path(cells: int) -> Path:
    return BENCH / f"s3store{cells // 1000}k"


def prepare(cells: int) -> None:
    out = store_path(cells)
    if (out / "index.json").exists():
        return
    BENCH.mkdir(exist_ok=True)
    cmd = ["sclabel-data", "synth", "--cells", str(cells), "--genes", "20000", "--nnz-per-cell", "1495"]
    subprocess.run([*cmd, "--seed", "0", "--out", str(out), "--quiet", "--overwrite"], check=True)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores spent non-idle since boot."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listening socket's accept queue was full: a
    dropped SYN is retried by the client after 1, 3, 7, 15, 31 s (a stall of that size, not an error)."""
    lines = [
        ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines() if ln.startswith("TcpExt")
    ]
    return int(dict(zip(lines[0], lines[1], strict=True)).get("ListenOverflows", 0))


def _spawn(code: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a server process that prints its URL on its first line."""
    proc = subprocess.Popen(code, stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    return proc, proc.stdout.readline().strip()


MOTO = (
    "import logging,threading;from moto.server import ThreadedMotoServer;"
    "logging.getLogger('werkzeug').setLevel(logging.ERROR);"
    # werkzeug's accept queue is 128: connections beyond it wait 1-31 s for a SYN retry (tests/s3/proxy.py)
    "from werkzeug.serving import BaseWSGIServer;BaseWSGIServer.request_queue_size=4096;"
    "s=ThreadedMotoServer(ip_address='127.0.0.1',port=0,verbose=False);s.start();"
    "h,p=s.get_host_and_port();print(f'http://{h}:{p}',flush=True);threading.Event().wait()"
)


def upload(store: Path, url: str, endpoint: str) -> None:
    import boto3

    from sclabel_dist.data.stores.location import as_path

    os.environ.update({**ENV, "AWS_ENDPOINT_URL": endpoint})
    bucket = url.removeprefix("s3://").split("/")[0]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    root = as_path(url)
    for f in sorted(p for p in store.rglob("*") if p.is_file()):
        (root / f.relative_to(store).as_posix()).upload(f)


def one(args: argparse.Namespace) -> dict:
    """One measurement in this process: warm-up, then `batches` batches timed."""
    from sclabel_dist.config import DataConfig, TokenizeConfig
    from sclabel_dist.data.dataset import build_dataset
    from sclabel_dist.data.stores import location

    data = DataConfig(
        stores=[args.store],
        batch_size=BATCH,
        read_threads=args.threads,
        read_ahead=args.read_ahead,
    )
    overflows0 = listen_overflows()
    t0 = time.perf_counter()
    ds = build_dataset(
        data, TokenizeConfig(max_len=1024), rank=0, world_size=1, seed=0, raw=not args.tokenized
    )
    opened = time.perf_counter() - t0
    open_requests = location.stats()["requests"]
    # What the first batch waits on: when each of the first window reads started and ended (the pool runs
    # them in submission order; window 0 is the first batch's own).
    reads: list[tuple[int, float, float]] = []
    real_read = ds._read_window

    def timed_read(plan, w, epoch, segment):  # noqa: ANN001, ANN202
        a = time.perf_counter() - t0
        out = real_read(plan, w, epoch, segment)
        if epoch == 0 and len(reads) < 24:
            reads.append((w, round(a, 3), round(time.perf_counter() - t0, 3)))
        return out

    ds._read_window = timed_read
    it = iter(ds)
    count = (lambda b: b.num_cells) if args.tokenized else (lambda b: b.num_rows)
    count(next(it))
    first = time.perf_counter() - t0
    first_requests = location.stats()["requests"]
    first_overflows = listen_overflows() - overflows0
    for _ in range(args.warmup):
        count(next(it))
    location.reset_stats()
    pids = [int(x) for x in args.server_pids.split(",") if x]
    srv0, busy0 = [cpu_s(p) for p in pids], machine_busy_s()
    ru0 = os.times()
    t = time.perf_counter()
    cells = sum(count(next(it)) for _ in range(args.batches))
    wall = time.perf_counter() - t
    ru1 = os.times()
    srv1, busy1 = [cpu_s(p) for p in pids], machine_busy_s()
    st = location.stats()
    ds.close()
    return {
        "cells_per_s": cells / wall,
        "wall_s": wall,
        "first_batch_s": first,
        "open_s": opened,
        "first_window_reads": sorted(reads)[:8],  # (window, start s, end s) from the start of the open
        "requests_to_first_batch": first_requests,
        "requests_at_open": open_requests,
        "listen_overflows_to_first_batch": first_overflows,
        "loader_cpu_s": (ru1.user - ru0.user) + (ru1.system - ru0.system),
        "requests": st["requests"],
        "retries": st["retries"],
        "mb_fetched": st["bytes"] / 2**20,
        "peak_in_flight": st["peak_in_flight"],
        "mean_in_flight": st["busy_s"] / wall,
        # cores each server process (moto, the proxy) and the whole machine kept busy in the timed window
        "server_cores": [(b - a) / wall for a, b in zip(srv0, srv1, strict=True)],
        "machine_busy_cores": (busy1 - busy0) / wall,
    }


def measure(store: str, tokenized: bool, args: argparse.Namespace, env: dict, servers: list[int]) -> dict:
    """Run `one` in a fresh subprocess (it measures the servers' CPU in its timed window)."""
    cmd = [sys.executable, __file__, "one", "--store", store, "--batches", str(args.batches)]
    cmd += ["--server-pids", ",".join(map(str, servers))]
    cmd += [
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--read-ahead",
        str(args.read_ahead),
    ]
    if tokenized:
        cmd.append("--tokenized")
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False)
    wall = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["subprocess_wall_s"] = wall
    return res


def _orders(delays: list[int], repeats: int, offset: int) -> list[tuple[int, int, bool]]:
    """(repeat, delay, tokenised) in the order measured: each repeat starts at the next latency (0, 10, 50;
    10, 50, 0; ...) and alternates which stream goes first, so a drift in the machine's load during the
    command does not fall on one latency or one stream."""
    out = []
    for r in range(repeats):
        k = (offset + r) % len(delays)
        first_tok = bool((offset + r) % 2)
        for d in delays[k:] + delays[:k]:
            out += [(offset + r, d, first_tok), (offset + r, d, not first_tok)]
    return out


def run(args: argparse.Namespace) -> dict:
    store = store_path(args.cells)
    if not (store / "index.json").exists():
        raise SystemExit(f"{store}: run `prepare --cells {args.cells}` first")
    delays = [int(d) for d in args.delays.split(",")]
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_before": os.getloadavg(),
        },
        "cells": args.cells,
        "config": {
            k: getattr(args, k) for k in ("batches", "warmup", "threads", "read_ahead", "proxy_backlog")
        },
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "runs": [],
    }
    moto, endpoint = _spawn([sys.executable, "-c", MOTO])
    procs = [moto]
    proxy_py = str(ROOT / "tests" / "s3" / "proxy.py")
    try:
        url = "s3://bench/store"
        t = time.perf_counter()
        upload(store, url, endpoint)
        result["upload_s"] = time.perf_counter() - t
        proxy, current = None, None
        for repeat, delay, tokenized in _orders(delays, args.repeats, args.offset):
            if (repeat, delay) != current:  # a fresh proxy per (repeat, latency)
                if proxy is not None:
                    proxy.kill()
                    proxy.wait()
                    procs.remove(proxy)
                cmd = [proxy_py, endpoint, "--delay-ms", str(delay), "--backlog", str(args.proxy_backlog)]
                proxy, purl = _spawn([sys.executable, *cmd])
                procs.append(proxy)
                current = (repeat, delay)
            env = {**ENV, "AWS_ENDPOINT_URL": purl}
            load = os.getloadavg()[0]
            r = measure(url, tokenized, args, env, [moto.pid, proxy.pid])
            r.update(source="s3", delay_ms=delay, tokenized=tokenized, repeat=repeat, load1_before=load)
            r["utc"] = time.strftime("%H:%M:%S", time.gmtime())
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
        for tokenized in (False, True) if args.disk else ():
            r = measure(str(store), tokenized, args, {}, [])
            r.update(source="disk", delay_ms=None, tokenized=tokenized, repeat=args.offset)
            r["utc"] = time.strftime("%H:%M:%S", time.gmtime())
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    result["load_after"] = os.getloadavg()
    return result


def markdown(results: list[dict]) -> str:
    """One row per measurement (every repeat), then each repeat's rates relative to its own 0 ms pass."""
    lines = [
        "| repeat | time (UTC) | source | added latency | stream | cells/s | vs 0 ms (same repeat) | requests | "
        "peak / mean in flight | loader CPU / wall | moto cores | proxy cores | machine busy cores | "
        "open / first batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = [r for res in results for r in res["runs"]]
    base = {
        (r["repeat"], r["tokenized"]): r["cells_per_s"]
        for r in runs
        if r["source"] == "s3" and r["delay_ms"] == 0
    }
    for r in sorted(runs, key=lambda r: (r["source"] != "s3", r["repeat"], r.get("utc", ""))):
        kind = "tokenised" if r["tokenized"] else "raw"
        lat = f"{r['delay_ms']} ms" if r["delay_ms"] is not None else "-"
        b = base.get((r["repeat"], r["tokenized"]))
        rel = f"{r['cells_per_s'] / b:.0%}" if r["source"] == "s3" and b else "-"
        srv = r["server_cores"] or [None, None]
        inflight = f"{r['peak_in_flight']} / {r['mean_in_flight']:.1f}" if r["source"] == "s3" else "-"
        lines.append(
            f"| {r['repeat']} | {r.get('utc', '')} | {r['source']} | {lat} | {kind} | {r['cells_per_s']:,.0f} | "
            f"{rel} | {r['requests']} | {inflight} | {r['loader_cpu_s'] / r['wall_s']:.2f} | "
            + (f"{srv[0]:.2f} | {srv[1]:.2f} |" if srv[0] is not None else "- | - |")
            + f" {r['machine_busy_cores']:.2f} | {r.get('open_s', 0):.1f} / {r['first_batch_s']:.1f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("--cells", type=int, default=20000)
    r = sub.add_parser("run")
    r.add_argument("--cells", type=int, default=20000)
    r.add_argument("--out", type=Path)
    r.add_argument("--delays", default=",".join(map(str, DELAYS_MS)), help="added ms per request, e.g. 0,50")
    r.add_argument("--repeats", type=int, default=1, help="passes over every latency, order rotated")
    r.add_argument("--offset", type=int, default=0, help="number of the first repeat (commands split)")
    r.add_argument("--proxy-backlog", type=int, default=4096, help="the proxy's accept queue (5: before)")
    r.add_argument("--no-disk", dest="disk", action="store_false", help="skip the local-disk reference")
    o = sub.add_parser("one")
    o.add_argument("--store", required=True)
    o.add_argument("--tokenized", action="store_true")
    o.add_argument("--server-pids", default="")
    m = sub.add_parser("markdown")
    m.add_argument("json", type=Path, nargs="+")
    for q in (r, o):
        q.add_argument("--batches", type=int, default=120)
        q.add_argument("--warmup", type=int, default=10)
        q.add_argument("--threads", type=int, default=4)
        q.add_argument("--read-ahead", type=int, default=4)
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.cells)
    elif args.cmd == "one":
        print(json.dumps(one(args)))
    elif args.cmd == "run":
        res = run(args)
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
        print(markdown([res]))
    else:
        print(markdown([json.loads(f.read_text()) for f in args.json]))


if __name__ == "__main__":
    main()
