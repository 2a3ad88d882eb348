"""Two-phase ingest: `--workers N` on one machine, `--plan-only` / `--part i/N` / `commit` across many.

    plan (serial: scan, vocabulary, offsets, categories, shuffle)  ->  OUT/_ingest/plan.json
    parts (parallel: part i of N writes its own shards)            ->  OUT/shards/..., OUT/_ingest/parts/*.json
    commit (serial: check every part, write index.json last)       ->  OUT/index.json

The store is the serial ingest's, byte for byte, for any N (ingest_plan.py says why). A rerun of the same
command resumes: the plan is reused when made for the same inputs and options, finished parts are kept.
An s3:// output is built by --workers in a local staging store, then uploaded and committed by
remote_store.publish like the serial path; --plan-only / --part into s3:// build it in --stage DIR, a
filesystem all parts see, and `commit DIR` publishes it (ingest_stage.py).
"""

from __future__ import annotations

import multiprocessing
import shutil
import sys
import time
from pathlib import Path

from data_tools import remote_store
from data_tools.ingest import IngestOptions
from data_tools.ingest_commit import commit_locked
from data_tools.ingest_parts import existing_part_counts, manifest_path, parse_part, peak_rss_mib, run_part
from data_tools.ingest_plan import PLAN_DIR, check_fingerprint, make_plan, plan_dir
from data_tools.ingest_stage import PUBLISH_FILE, check_stage_option, plan_staged, seed_stage
from data_tools.store_lock import StoreLock
from data_tools.tempfiles import spill_dir
from data_tools.worker_memory import parse_size_mib
from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores.location import as_path, is_remote
from sclabel_dist.errors import SclabelError


def run(opts: IngestOptions) -> fmt.StoreIndex | None:
    """Run the --workers / --plan-only / --part form of an ingest; the committed index (None for a plan or a part)."""
    if opts.overwrite:
        raise SclabelError(
            "--overwrite applies to the serial ingest; remove the store first to ingest in parallel"
        )
    budget = parse_size_mib(opts.worker_memory) if opts.worker_memory else None
    if is_remote(opts.out):
        check_stage_option(opts)
        if opts.part:  # the plan and the parts live in the stage until `commit STAGE` publishes them
            run_part(Path(opts.stage), *parse_part(opts.part), opts, memory_mib=budget)
            return None
        if opts.plan_only:
            plan_staged(opts)
            return None
        return _run_remote(opts, budget)
    if opts.stage:
        raise SclabelError(f"{opts.out}: --stage is for s3:// outputs; a local output is its own stage")
    out = Path(opts.out)
    if opts.part:
        i, n = parse_part(opts.part)
        run_part(out, i, n, opts, memory_mib=budget)
        return None
    with StoreLock(out):
        ensure_plan(opts, out, opts.workers or 1)
        if opts.plan_only:
            print(
                f"{out}: plan written to {plan_dir(out)}; now run the parts (--part i/N), then `sclabel-data commit {out}`"
            )
            return None
        run_workers(out, opts.workers or 1, opts.tmp_dir, budget)
        index = commit_locked(out)
    print(
        f"{out}: {index.num_rows} cells, {index.num_genes} genes, {index.nnz} non-zeros, {index.num_shards} shards"
    )
    return index


def ensure_plan(opts: IngestOptions, out: Path, workers: int = 1) -> None:
    """Plan the ingest into `out`, or keep the plan there when it was made for the same inputs and options."""
    has_index = (out / fmt.INDEX_FILE).is_file()
    if (plan_dir(out) / "plan.json").is_file():
        check_fingerprint(out, opts)
        print(f"{out}: the plan there is for these inputs and options: kept (finished parts are kept too)")
        return
    if opts.append:
        base = fmt.read_index(out)
    elif has_index or (out.exists() and any(not _leftover(p.name) for p in out.iterdir())):
        raise SclabelError(
            f"{out}: already exists; use --append to add datasets (--overwrite: serial ingest only)"
        )
    else:
        base = None
    t0 = time.perf_counter()
    make_plan(opts, out, base, workers)
    print(f"{out}: planned in {time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_mib():.0f} MiB")


def _leftover(name: str) -> bool:
    """What a killed plan or part leaves in a new store's directory (resumable, not foreign)."""
    return name in (fmt.SHARDS_DIR, PUBLISH_FILE) or name.startswith(f".{PLAN_DIR}.tmp-")


def _part_main(out: str, i: int, n: int, tmp_dir: str | None, memory_mib: int | None) -> None:
    """A spawned worker: one part; a clear one-line error and exit 2 on bad input."""
    try:
        run_part(Path(out), i, n, tmp_dir=tmp_dir, memory_mib=memory_mib)
    except SclabelError as exc:
        print(f"sclabel-data ingest: part {i}/{n}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def run_workers(out: Path, n: int, tmp_dir: str | None = None, memory_mib: int | None = None) -> None:
    """Write every part of the plan, n spawned processes at once (each: one block plus one shard in memory,
    within `memory_mib` when given: worker_memory.py)."""
    for other in existing_part_counts(out) - {n}:  # a resumed run with another N starts the parts afresh
        for i in range(other):
            manifest_path(out, i, other).unlink(missing_ok=True)
    if n == 1:
        run_part(out, 0, 1, tmp_dir=tmp_dir, memory_mib=memory_mib)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_part_main, args=(str(out), i, n, tmp_dir, memory_mib), name=f"ingest-part-{i}")
        for i in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        i, code = failed[0]
        how = f"was killed by signal {-code}" if code < 0 else f"failed (exit {code})"
        raise SclabelError(
            f"{out}: part {i}/{n} {how}; nothing committed. Rerun the same command: finished parts are kept"
        )


def _run_remote(opts: IngestOptions, memory_mib: int | None) -> fmt.StoreIndex:
    """--workers into s3://: the parallel ingest into a local staging store, then remote_store.publish."""
    import dataclasses

    out = as_path(opts.out)
    work = spill_dir("s3stage", opts.tmp_dir)
    local = work / "store"
    try:
        version = seed_stage(out, local, opts.append)
        staged = dataclasses.replace(opts, out=str(local))
        with StoreLock(local):
            make_plan(staged, local, fmt.read_index(local) if opts.append else None, opts.workers or 1)
            run_workers(local, opts.workers or 1, opts.tmp_dir, memory_mib)
            commit_locked(local)
        names = [d.name for d in fmt.read_index(local).datasets][-len(opts.inputs) :]
        index = remote_store.publish(
            local, out, names, commit=version if version is not None else "create", new_store=not opts.append
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{out}: {index.num_rows} cells, {index.num_genes} genes, {index.nnz} non-zeros, {index.num_shards} shards"
    )
    return index
