"""The serial plan pass of a parallel ingest: everything a part writer needs, decided once, written to OUT/_ingest.

The plan fixes what the serial writer decides as it goes, so that any number of parts writing any subset of
shards produce the serial store byte for byte:

- the vocabulary (vocab.json), each input's gene match, value kind, mean non-zeros and rows per shard;
- every shard: its dataset, its rows (row k of a dataset goes to shard k // rows_per_shard, as serially) and
  its global row offset (after an append's existing rows);
- the obs categories: the serial writer extends them in the order values are first written, so the plan
  computes that order (file order, or the shuffled order) and part writers only look codes up;
- with --shuffle, each dataset's permutation: the serial out-of-core shuffle (shuffle_write.py) draws a
  bucket per row block by block, then permutes each bucket; the plan replays exactly those draws over row
  ids only (8 bytes a row, spilled to bucket files and then to perm/inv files on disk), so the permutation
  is the serial one for any number of workers and no row data is held.

The plan directory is built under a temp name and renamed into place, with plan.json holding a fingerprint
of the inputs (path, size, mtime) and of every option that changes the store: a part run with other inputs
or options is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_tools.ingest import IngestOptions, Prepared, dataset_names, parse_obs_columns, prepare_inputs
from data_tools.readers import detect_kind
from data_tools.scan import InputStats, merge_stats, scan_input
from data_tools.shuffle_write import num_buckets
from data_tools.tempfiles import clean_stale, spill_dir
from sclabel_dist.atomic import write_json_atomic
from sclabel_dist.data import format as fmt
from sclabel_dist.errors import SclabelError

PLAN_DIR = "_ingest"
PLAN_FILE = "plan.json"
PARTS_DIR = "parts"
PLAN_VERSION = 1
_OBS_ROWS = 1 << 16  # rows of obs values read at a time by the category pass
_PERM_CHUNK = 1 << 20  # rows of a permutation handled at a time (8 MiB)

# The options that change what is written (the rest, e.g. --workers, --tmp-dir, only how).
_FINGERPRINTED = (
    "dataset_name",
    "vocab",
    "min_cells",
    "min_match",
    "layer",
    "use_raw",
    "gene_column",
    "ensembl_column",
    "measurement",
    "value_kind",
    "obs_columns",
    "append",
    "shuffle",
    "seed",
    "rows_per_shard",
    "block_rows",
)


@dataclass(frozen=True)
class ShardPlan:
    """Shard k of dataset `dataset` (an index into Plan.datasets): its rows [start, stop) within the dataset."""

    dataset: int
    k: int
    start: int
    stop: int


@dataclass
class Plan:
    """plan.json, parsed."""

    fingerprint: str
    options: dict[str, Any]
    datasets: list[dict[str, Any]]
    columns: list[str]
    categories: dict[str, list[str]]
    base_index_sha256: str | None  # append: the index.json the commit must still find
    vocab_hash: str
    num_genes: int

    def shards(self) -> list[ShardPlan]:
        """Every shard of the ingest, in store order."""
        out = []
        for i, d in enumerate(self.datasets):
            r = d["rows_per_shard"]
            out += [
                ShardPlan(i, k, a, min(a + r, d["num_rows"]))
                for k, a in enumerate(range(0, d["num_rows"], r))
            ]
        return out

    def cost(self, s: ShardPlan) -> float:
        """Estimated work of a shard: its non-zeros (rows x the dataset's mean)."""
        return (s.stop - s.start) * self.datasets[s.dataset]["mean_nnz"]


def plan_dir(out: Path) -> Path:
    return out / PLAN_DIR


def fingerprint(opts: IngestOptions) -> str:
    """sha256 of the inputs (resolved path, size, mtime) and of the options that change the store."""
    inputs = []
    for path in opts.inputs:
        p = Path(path)
        st = p.stat() if p.exists() else None
        inputs.append(
            [str(p.resolve()) if p.exists() else str(path), st and st.st_size, st and st.st_mtime_ns]
        )
    fields = {k: getattr(opts, k) for k in _FINGERPRINTED}
    fields["dataset_name"] = list(fields["dataset_name"])
    blob = json.dumps({"inputs": inputs, "options": fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_plan(out: Path) -> Plan:
    path = plan_dir(out) / PLAN_FILE
    if not path.is_file():
        raise SclabelError(
            f"{out}: no ingest plan ({PLAN_DIR}/{PLAN_FILE}); run `sclabel-data ingest --plan-only ...` first"
        )
    raw = json.loads(path.read_text())
    if raw.get("version") != PLAN_VERSION:
        raise SclabelError(f"{path}: plan version {raw.get('version')} is not {PLAN_VERSION}; plan again")
    raw.pop("version")
    return Plan(**raw)


def index_sha256(out: Path) -> str:
    return hashlib.sha256((out / fmt.INDEX_FILE).read_bytes()).hexdigest()


def check_fingerprint(out: Path, opts: IngestOptions) -> Plan:
    """The plan of `out`, refused when it was made for other inputs or options than `opts`."""
    plan = load_plan(out)
    if plan.fingerprint != fingerprint(opts):
        raise SclabelError(
            f"{out}: its ingest plan was made for other inputs or options (or an input changed since): run "
            f"the parts with the command line of the --plan-only run, or remove {plan_dir(out)} and plan again"
        )
    return plan


def _scan_range(opts: IngestOptions, path: str, start: int, stop: int) -> InputStats:
    """One process's share of the scan: rows [start, stop) of one input."""
    reader = opts.open_reader(path)
    try:
        return scan_input(reader, opts.block_rows, progress=False, start=start, stop=stop)
    finally:
        reader.close()


def parallel_scan(opts: IngestOptions, workers: int) -> list[InputStats] | None:
    """Every input's scan, split into row ranges over `workers` spawned processes; None when not worth it.

    Ranges start at multiples of --block-rows, so the blocks (and the shuffle's draws) are the serial ones.
    Integer sums are exact in any order; a non-integer input is rescanned in one pass so that its per-gene
    value sums (the match report) are the serial ones to the last bit.
    """
    if workers < 2 or any(detect_kind(p) == "10x" for p in opts.inputs):
        return None  # a 10x directory is spilled to disk by its reader: one pass, one process
    tasks = []
    for i, path in enumerate(opts.inputs):
        reader = opts.open_reader(path)
        n = reader.num_rows
        reader.close()
        step = max(opts.block_rows, -(-n // workers // opts.block_rows) * opts.block_rows)
        tasks += [(i, a, min(a + step, n)) for a in range(0, n, step)] or [(i, 0, 0)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_scan_range, opts, opts.inputs[i], a, b) for i, a, b in tasks]
        results = [f.result() for f in futures]
    stats = []
    for i, path in enumerate(opts.inputs):
        merged = merge_stats([r for (j, _, _), r in zip(tasks, results, strict=True) if j == i])
        if not merged.all_integer:
            merged = _scan_range(opts, path, 0, merged.num_rows)
        stats.append(merged)
    return stats


def make_plan(opts: IngestOptions, out: Path, base: fmt.StoreIndex | None, workers: int = 1) -> Plan:
    """Scan the inputs, decide everything, write OUT/_ingest atomically; returns the plan."""
    columns, optional = parse_obs_columns(opts.obs_columns)
    names = dataset_names(opts.inputs, opts.dataset_name)
    if base is not None:
        clash = sorted(set(names) & {d.name for d in base.datasets})
        if clash:
            raise SclabelError(f"{out}: dataset(s) {clash} already in the store; pick other --dataset-name")
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out, f".{PLAN_DIR}.tmp-")  # plans of killed runs
    work = out / f".{PLAN_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    prepared: list[Prepared] = []
    try:
        # the vocabulary of an append is the store's: read from `out` (opts.out may be the s3:// target)
        scanned = parallel_scan(opts, workers)
        vocab = prepare_inputs(
            dataclasses.replace(opts, out=str(out)), names, columns, optional, prepared, scanned
        )
        vocab.to_json(work / fmt.VOCAB_FILE)
        categories = {k: list(v) for k, v in (base.obs_columns if base else {}).items()}
        datasets = []
        row_offset = base.num_rows if base else 0
        for i, p in enumerate(prepared):
            mean_nnz = p.stats.nnz / max(p.stats.num_rows, 1)
            perm = _plan_shuffle(work, i, p, opts) if opts.shuffle else None
            _extend_categories(work, i, p, columns, categories, perm, opts.tmp_dir)
            datasets.append(
                {
                    "name": p.name,
                    "input": str(p.reader.path),
                    "source": str(p.reader.path),
                    "num_rows": p.stats.num_rows,
                    "nnz": p.stats.nnz,
                    "value_kind": p.value_kind,
                    "mean_nnz": mean_nnz,
                    "rows_per_shard": opts.rows_per_shard or fmt.rows_per_part(mean_nnz),
                    "row_offset": row_offset,
                    "obs_present": p.obs_present,
                    "report": p.report,
                    "shuffled": perm is not None,
                }
            )
            row_offset += p.stats.num_rows
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        for p in prepared:
            p.reader.close()
    plan = Plan(
        fingerprint=fingerprint(opts),
        options={
            k: getattr(opts, k) for k in ("layer", "use_raw", "gene_column", "ensembl_column", "measurement")
        }
        | {"block_rows": opts.block_rows, "shuffle": opts.shuffle},
        datasets=datasets,
        columns=columns,
        categories=categories,
        base_index_sha256=index_sha256(out) if base is not None else None,
        vocab_hash=vocab.hash,
        num_genes=len(vocab),
    )
    (work / PARTS_DIR).mkdir()
    write_json_atomic(work / PLAN_FILE, {"version": PLAN_VERSION, **dataclasses.asdict(plan)})
    shutil.rmtree(plan_dir(out), ignore_errors=True)
    os.replace(work, plan_dir(out))
    return plan


# -- shuffle ------------------------------------------------------------------------------------------------


def perm_path(out: Path, dataset: int) -> Path:
    """int64 [num_rows]: output position -> input row."""
    return plan_dir(out) / f"perm_{dataset:05d}.i64"


def inv_path(out: Path, dataset: int) -> Path:
    """int64 [num_rows]: input row -> output position."""
    return plan_dir(out) / f"inv_{dataset:05d}.i64"


def _plan_shuffle(work: Path, i: int, p: Prepared, opts: IngestOptions) -> np.memmap:
    """Replay shuffle_write.shuffled_blocks's random draws on row ids: the serial permutation, out of core."""
    n = p.stats.num_rows
    buckets = num_buckets(p.stats.nnz, n)
    rng = np.random.default_rng(opts.seed)
    tmp = spill_dir("plan-shuffle", opts.tmp_dir)
    try:
        start = 0
        for size in p.stats.block_sizes or []:
            dest = rng.integers(0, buckets, size=size)
            order = np.argsort(dest, kind="stable")
            bounds = np.searchsorted(dest[order], np.arange(buckets + 1))
            for b in np.flatnonzero(np.diff(bounds)):
                with open(tmp / f"{b}.rows", "ab") as fh:
                    fh.write((start + order[bounds[b] : bounds[b + 1]]).astype(np.int64).tobytes())
            start += size
        if start != n:
            raise SclabelError(f"{p.reader.path}: read {start} rows, expected {n}")
        raw_perm = work / perm_path(Path("."), i).name
        perm = np.memmap(raw_perm, dtype=np.int64, mode="w+", shape=(n,))
        at = 0
        for b in range(buckets):
            f = tmp / f"{b}.rows"
            if not f.exists():
                continue
            rows = np.fromfile(f, dtype=np.int64)
            perm[at : at + len(rows)] = rows[rng.permutation(len(rows))]
            at += len(rows)
            f.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    perm.flush()
    raw_inv = work / inv_path(Path("."), i).name
    inv = np.memmap(raw_inv, dtype=np.int64, mode="w+", shape=(n,))
    for a in range(0, n, _PERM_CHUNK):
        chunk = np.asarray(perm[a : a + _PERM_CHUNK])
        inv[chunk] = np.arange(a, a + len(chunk), dtype=np.int64)
    inv.flush()
    return perm


# -- obs categories ---------------------------------------------------------------------------------------


def _local_codes(values: np.ndarray, uniques: dict[str, int]) -> np.ndarray:
    """Codes of `values` into a growing first-seen dict, keyed as the store writer keys them (str; missing -1)."""
    series = pd.Series(values, dtype=object)
    missing = series.isna().to_numpy()
    local, found = pd.factorize(series.where(missing, series.astype(str)), use_na_sentinel=True)
    table = np.array([uniques.setdefault(k, len(uniques)) for k in found], dtype=np.int32)
    return np.where(local >= 0, table[np.maximum(local, 0)] if len(table) else -1, -1).astype(np.int32)


def _extend_categories(
    work: Path,
    i: int,
    p: Prepared,
    columns: list[str],
    categories: dict[str, list[str]],
    perm: np.memmap | None,
    tmp_dir: str | None,
) -> None:
    """Extend the store's categories with this dataset's values in the order the serial writer meets them."""
    present = [c for c in columns if c in (p.obs_present or [])]
    for c in columns:
        categories.setdefault(c, [])
    if not present:
        return
    n = p.stats.num_rows
    uniques: dict[str, dict[str, int]] = {c: {} for c in present}
    codes = {
        c: np.memmap(work / f"codes.tmp.{j}", dtype=np.int32, mode="w+", shape=(n,))
        for j, c in enumerate(present)
    }
    for a in range(0, n, _OBS_ROWS):
        obs = p.reader.obs(present, a, min(a + _OBS_ROWS, n))
        for c in present:
            codes[c][a : a + len(obs[c])] = _local_codes(obs[c], uniques[c])
    for j, c in enumerate(present):
        names = list(uniques[c])
        # unshuffled, dict order is the first-seen order of the file
        seen_order = np.arange(len(names)) if perm is None else _first_seen(codes[c], perm, len(names))
        have = set(categories[c])
        for code in seen_order:
            if names[code] not in have:
                have.add(names[code])
                categories[c].append(names[code])
        del codes[c]
        (work / f"codes.tmp.{j}").unlink()


def _first_seen(codes: np.memmap, perm: np.memmap, num_codes: int) -> np.ndarray:
    """The local codes in the order they first appear in the permuted rows (chunk by chunk, out of core)."""
    order: list[int] = []
    seen = np.zeros(num_codes, dtype=bool)
    for a in range(0, len(perm), _PERM_CHUNK):
        c = np.asarray(codes[np.asarray(perm[a : a + _PERM_CHUNK])])
        u, first = np.unique(c, return_index=True)
        new = (u >= 0) & ~seen[np.maximum(u, 0)]
        for code in u[new][np.argsort(first[new])]:
            order.append(int(code))
        seen[u[u >= 0]] = True
        if seen.all():
            break
    return np.array(order, dtype=np.int64)
