"""How the benchmarks measure: page-cache state, process and machine CPU, timed repeats, versions, the machine.

Standard library only: benchmarks/annbatch_bench.py imports `measure` in its own Python 3.12 environment.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (posix_fadvise DONTNEED: no root needed, other users'
    cached files untouched, unlike drop_caches); resident_fraction then checks that it took."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # pages still dirty (a store just written) are not dropped: write them first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' bytes in the page cache now (util-linux fincore), None where it is missing."""
    if not files or not shutil.which("fincore"):
        return None
    res = size = 0
    for i in range(0, len(files), 200):
        out = subprocess.run(
            ["fincore", "-b", "-n", "-r", "-o", "RES,SIZE", *map(str, files[i : i + 200])],
            capture_output=True,
            text=True,
        )
        for line in out.stdout.split("\n"):
            if line.strip():
                r, sz = line.split()[:2]
                res, size = res + int(r), size + int(sz)
    return res / size if size else None


def _children() -> list[int]:
    """Pids of this process's live child processes (DataLoader workers: scDataset's reads run there)."""
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _proc(pid: int) -> tuple[float, int, float]:
    """(CPU seconds, bytes read from storage, peak RSS MB) of one live process (zeros once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        hwm = [ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM")]
        return cpu, int(io.get("read_bytes", 0)), int(hwm[0].split()[1]) / 1024 if hwm else 0.0
    except (OSError, IndexError, ValueError):
        return 0.0, 0, 0.0


def process_stats() -> dict:
    """CPU seconds, bytes fetched from storage (page-cache misses), peak RSS and live threads of this process
    and its child processes (a loader's worker processes count: their CPU is the method's CPU)."""
    import threading

    ru = resource.getrusage(resource.RUSAGE_SELF)
    done = resource.getrusage(resource.RUSAGE_CHILDREN)  # children already exited and waited for
    io = {}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            k, v = line.split(":")
            io[k] = int(v)
    except OSError:
        pass
    kids = [_proc(pid) for pid in _children()]
    return {
        "cpu_user_s": ru.ru_utime + done.ru_utime + sum(k[0] for k in kids),
        "cpu_sys_s": ru.ru_stime + done.ru_stime,
        "storage_read_mb": (io.get("read_bytes", 0) + sum(k[1] for k in kids)) / 2**20,
        # Peak RSS of this process plus the live children's peaks (an upper bound on the peak together).
        "peak_rss_mb": ru.ru_maxrss / 1024 + sum(k[2] for k in kids),
        "threads": threading.active_count(),
        "os_threads": len(os.listdir("/proc/self/task")),
        "child_processes": len(kids),
    }


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has spent busy since boot (/proc/stat; steal counted busy:
    a hypervisor taking the core is hidden load too)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(make_iter, warmup: int, batches: int, repeats: int, count, t0: float | None = None) -> dict:
    """Time to first batch, then cells/s of every one of `repeats` runs of `batches` batches after a warm-up.

    Each repeat also records the CPU seconds and storage bytes it took, so a slow repeat shows whether it
    waited on the disk (cold pages) or on the CPU.
    """
    t0 = time.perf_counter() if t0 is None else t0  # annbatch's clock starts before its Loader is built
    it = make_iter()
    count(next(it))
    first = time.perf_counter() - t0
    at_first = process_stats()
    for _ in range(warmup):
        count(next(it))
    rates, repeat_stats = [], []
    for _ in range(repeats):
        before, busy = process_stats(), machine_busy_s()
        t = time.perf_counter()
        cells = sum(count(next(it)) for _ in range(batches))
        wall = time.perf_counter() - t
        after, busy = process_stats(), machine_busy_s() - busy
        rates.append(cells / wall)
        cpu = sum(after[k] - before[k] for k in ("cpu_user_s", "cpu_sys_s"))
        repeat_stats.append(
            {
                "cells_per_s": cells / wall,
                # Cells per CPU-second of this process: its efficiency, which other load barely moves.
                "cells_per_cpu_s": cells / cpu if cpu > 0 else None,
                "cpu_per_wall": cpu / wall,
                # Cores the rest of the machine kept busy meanwhile: > ~0.2 means the figure was taken under
                # load that loadavg before the run does not show.
                "others_cores": max(busy - cpu, 0.0) / wall,
                "storage_read_mb": after["storage_read_mb"] - before["storage_read_mb"],
            }
        )
    return {
        "cells_per_s": statistics.median(rates),
        "rates": rates,
        "repeats": repeat_stats,
        "first_batch_s": first,
        "first_batch_storage_read_mb": at_first["storage_read_mb"],
        **{k: v for k, v in process_stats().items() if k not in ("cpu_user_s", "cpu_sys_s")},
        "threads_info": thread_info(),
    }


def thread_info() -> dict:
    """The thread pools this process could run at once (checked against the machine's cores)."""
    out: dict = {}
    if "torch" in sys.modules:
        out["torch_intra_op"] = sys.modules["torch"].get_num_threads()
    if "numba" in sys.modules:
        out["numba"] = sys.modules["numba"].config.NUMBA_NUM_THREADS
    return out


def versions(python: str, names: tuple[str, ...]) -> dict:
    code = (
        "import json, sys, importlib.metadata as m\n"
        "out = {'python': sys.version.split()[0]}\n"
        f"for n in {list(names)!r}:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr[-300:]}


def numba_cache_state() -> dict:
    """Whether the compiled kernels' cache (kernels.py, cache=True) exists before the run: a fresh clone has
    none until `sclabel-data compile-kernels`; without it a tokenised stream compiles its kernel inside its
    first batch (seconds), a raw one after (its first batches take numpy paths)."""
    import importlib.util

    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
    spec = importlib.util.find_spec("sclabel_dist")  # the package the methods import (PYTHONPATH decides)
    package = Path(spec.origin).parent if spec and spec.origin else ROOT / "sclabel_dist"
    where = Path(cache_dir) if cache_dir else package / "data" / "__pycache__"
    return {"dir": str(where), "kernel_index_files": len(list(where.rglob("kernels.*.nbi")))}


def machine() -> dict:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "-uno"], capture_output=True, text=True
    )
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_gib": round(int(mem) / 2**20, 1),
        "kernel": os.uname().release,
        "git_commit": commit.stdout.strip(),
        "git_dirty": bool(dirty.stdout.strip()),
        "thread_env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS")
            if k in os.environ
        },
    }
