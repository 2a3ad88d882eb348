"""The parallel write pass: part i of N writes its shards of the plan (ingest_plan.py), independently of the others.

Part i of N owns a contiguous run of the plan's shards, cut by estimated non-zeros (`part_shards`). Each shard
is written under a temp name and renamed into place, and the part's manifest (its shard entries and their
sha256) is written LAST: a part with a manifest is finished and is not rewritten; a part killed before it is
redone whole by a rerun. Nothing here touches index.json: `sclabel-data commit` does (ingest_commit.py).

Reading: unshuffled, a part reads only its own rows, as one sequential run per dataset. Shuffled, a part's
output rows come from anywhere in the input, so it streams the whole input once, keeps the rows whose output
position (the plan's inverse permutation) falls in its shards and spills them per shard to temp files, then
writes each shard from its spill in output order: memory is one block plus one shard, as serially.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from data_tools.ingest_plan import (
    PARTS_DIR,
    Plan,
    ShardPlan,
    check_fingerprint,
    inv_path,
    load_plan,
    plan_dir,
)
from data_tools.part_buffer import PartBuffer, release_freed_memory
from data_tools.readers import InputReader, open_input
from data_tools.tempfiles import spill_dir
from data_tools.worker_memory import block_rows_within, resident_mib
from data_tools.writer import _encode_categories, checked_block, write_part
from sclabel_dist.atomic import write_json_atomic
from sclabel_dist.data import format as fmt
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab, remap_csr

if TYPE_CHECKING:
    from data_tools.ingest import IngestOptions


def parse_part(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N), 0 <= i < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SclabelError(f"--part {text!r}: give i/N, e.g. 0/4 (parts numbered from 0)") from None
    if not 0 <= i < n:
        raise SclabelError(f"--part {text!r}: need 0 <= i < N")
    return i, n


def part_shards(plan: Plan, i: int, n: int) -> list[ShardPlan]:
    """Part i of n: the shards whose cost midpoint falls in [i/n, (i+1)/n) of the total (contiguous, balanced)."""
    shards = plan.shards()
    cost = np.array([plan.cost(s) for s in shards], dtype=np.float64)
    total = float(cost.sum()) or 1.0
    mid = (np.cumsum(cost) - cost / 2) / total
    owner = np.minimum((mid * n).astype(np.int64), n - 1)
    return [s for s, o in zip(shards, owner, strict=True) if o == i]


def manifest_path(out: Path, i: int, n: int) -> Path:
    return plan_dir(out) / PARTS_DIR / f"part-{i}-of-{n}.json"


def existing_part_counts(out: Path) -> set[int]:
    """The N of the part manifests already written (a plan is executed with one N)."""
    found = set()
    for f in (plan_dir(out) / PARTS_DIR).glob("part-*-of-*.json"):
        found.add(int(f.stem.rsplit("-", 1)[1]))
    return found


def run_part(
    out: Path,
    i: int,
    n: int,
    opts: IngestOptions | None = None,
    tmp_dir: str | None = None,
    memory_mib: int | None = None,
) -> bool:
    """Write part i of n of the plan in `out`; False when it was already finished (nothing rewritten).

    With `opts` (a --part run) the plan must have been made for the same inputs and options. `memory_mib`: the
    worker's budget (--worker-memory), which sets the rows read per block (worker_memory.py).
    """
    plan = check_fingerprint(out, opts) if opts is not None else load_plan(out)
    other = existing_part_counts(out) - {n}
    if other:
        raise SclabelError(
            f"{out}: parts of this plan were written as part i/{min(other)}; run every part with the same N "
            f"(or remove {plan_dir(out)} and plan again)"
        )
    manifest = manifest_path(out, i, n)
    if manifest.is_file():
        print(f"{out}: part {i}/{n} already written; not rewritten")
        return False
    t0 = time.perf_counter()
    vocab = GeneVocab.from_json(plan_dir(out) / fmt.VOCAB_FILE)
    mine = part_shards(plan, i, n)
    entries: list[dict] = []
    for d in sorted({s.dataset for s in mine}):
        shards = [s for s in mine if s.dataset == d]
        entries += _write_dataset_shards(
            out, plan, d, shards, vocab, tmp_dir or (opts and opts.tmp_dir), f"part {i}/{n}", memory_mib
        )
    write_json_atomic(manifest, {"part": i, "parts": n, "shards": entries})
    # peak RSS and time per part: what --workers costs per process (benchmarks/atlas_bench.py reads this line)
    peak = peak_rss_mib()
    print(
        f"{out}: part {i}/{n} written: {len(entries)} shards, {sum(e['num_rows'] for e in entries)} cells "
        f"in {time.perf_counter() - t0:.1f} s, peak RSS {peak:.0f} MiB"
        + (f" (budget {memory_mib} MiB{': EXCEEDED' if peak > memory_mib else ''})" if memory_mib else "")
    )
    return True


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _open(plan: Plan, d: int) -> InputReader:
    o = plan.options
    return open_input(
        plan.datasets[d]["input"],
        layer=o["layer"],
        use_raw=o["use_raw"],
        gene_column=o["gene_column"],
        ensembl_column=o["ensembl_column"],
        measurement=o["measurement"],
    )


class _ShardSink:
    """Writes shards of one dataset: temp dir, rename into place; collects their index entries."""

    def __init__(self, out: Path, plan: Plan, d: int):
        self.out, self.plan, self.ds = out, plan, plan.datasets[d]
        self.dir = out / fmt.SHARDS_DIR / self.ds["name"]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []

    def write(
        self, s: ShardPlan, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, codes: dict
    ) -> None:
        ds = self.ds
        if len(indptr) - 1 != s.stop - s.start:
            raise SclabelError(
                f"{ds['input']}: shard {s.k} got {len(indptr) - 1} rows, the plan says {s.stop - s.start} "
                "(input changed since the plan?)"
            )
        name = fmt.part_name(s.k)
        tmp = self.dir / f".tmp-{os.getpid()}-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        idx_dt, val_dt = write_part(
            tmp,
            indptr,
            indices,
            data,
            codes,
            ds["value_kind"],
            self.plan.num_genes,
            ds["mean_nnz"],
            ds["name"],
        )
        sha = fmt.shard_checksum(tmp)
        final = self.dir / name
        shutil.rmtree(final, ignore_errors=True)  # left by a killed run of this part
        os.replace(tmp, final)
        self.entries.append(
            {
                "path": f"{fmt.SHARDS_DIR}/{ds['name']}/{name}",
                "dataset": ds["name"],
                "num_rows": s.stop - s.start,
                "nnz": int(indptr[-1]),
                "row_offset": ds["row_offset"] + s.start,
                "value_kind": ds["value_kind"],
                "indices_dtype": idx_dt,
                "data_dtype": val_dt,
                "sha256": sha,
            }
        )
        release_freed_memory()


def _encoder(plan: Plan, ds: dict):
    """obs values of a block -> int32 codes into the plan's categories (complete: never extended here)."""
    columns, present = plan.columns, set(ds["obs_present"])

    def encode(reader: InputReader, start: int, stop: int, rows: np.ndarray | None = None) -> dict:
        obs = reader.obs([c for c in columns if c in present], start, stop)
        out = {}
        for c in columns:
            if c not in present:
                out[c] = np.full(stop - start, fmt.MISSING_CODE, dtype=np.int32)
                continue
            cats = list(plan.categories[c])
            out[c] = _encode_categories(obs[c], cats)
            if len(cats) != len(plan.categories[c]):
                raise SclabelError(
                    f"{ds['input']}: obs column {c!r} holds {cats[len(plan.categories[c])]!r}, which the plan "
                    "did not see (input changed since the plan?)"
                )
        return out

    return encode


def _blocks(
    reader: InputReader, block_rows: int, start: int, stop: int
) -> Iterator[tuple[int, sp.csr_matrix]]:
    for a, block in reader.blocks(block_rows, start):
        if a >= stop:
            return
        yield a, block[: stop - a] if a + block.shape[0] > stop else block


def _write_dataset_shards(
    out: Path,
    plan: Plan,
    d: int,
    shards: list[ShardPlan],
    vocab: GeneVocab,
    tmp_dir: str | None,
    where: str,
    memory_mib: int | None,
) -> list[dict]:
    ds = plan.datasets[d]
    reader = _open(plan, d)
    try:
        match = vocab.match(reader.var_names, reader.ensembl)
        sink = _ShardSink(out, plan, d)
        block_rows = plan.options["block_rows"]
        if memory_mib:
            resident, here = resident_mib(), f"{where}, dataset {ds['name']}"
            block_rows = block_rows_within(
                memory_mib, resident, ds["rows_per_shard"], ds["mean_nnz"], ds["shuffled"], block_rows, here
            )
            print(
                f"{here}: {resident:.0f} MiB resident, blocks of {block_rows} rows within --worker-memory "
                f"{memory_mib} MiB",
                flush=True,
            )
        if ds["shuffled"]:
            _write_shuffled(out, plan, d, shards, reader, match, sink, tmp_dir, block_rows)
        else:
            _write_in_order(plan, ds, shards, reader, match, sink, block_rows)
        return sink.entries
    finally:
        reader.close()


def _write_in_order(
    plan: Plan, ds: dict, shards: list[ShardPlan], reader, match, sink: _ShardSink, block_rows: int
) -> None:
    """Unshuffled: the part's rows are one contiguous run of the input; cut it into the planned shards."""
    encode = _encoder(plan, ds)
    buf = PartBuffer(
        ds["rows_per_shard"],
        int(ds["rows_per_shard"] * ds["mean_nnz"] * 1.25),
        plan.num_genes,
        np.dtype(np.float32 if ds["value_kind"] == "lognorm" else np.uint32),
        plan.columns,
    )
    todo = iter(shards)
    current = next(todo)
    first, last = shards[0].start, shards[-1].stop
    for a, block in _blocks(reader, block_rows, first, last):
        mat = checked_block(remap_csr(block, match), ds["value_kind"], ds["input"], a)
        codes = encode(reader, a, a + mat.shape[0])
        at = 0
        while at < mat.shape[0]:
            room = (current.stop - current.start) - buf.num_rows
            take = min(room, mat.shape[0] - at)
            buf.add(mat, codes, at, at + take)
            at += take
            if buf.num_rows == current.stop - current.start:
                n, nnz = buf.num_rows, buf.nnz
                sink.write(
                    current,
                    buf.indptr[: n + 1],
                    buf.indices[:nnz],
                    buf.data[:nnz],
                    {c: v[:n] for c, v in buf.codes.items()},
                )
                buf.clear()
                current = next(todo, None)  # type: ignore[arg-type]
                if current is None:
                    return
    if current is not None:
        raise SclabelError(f"{ds['input']}: ended before row {current.stop} of the plan (input changed?)")


def _write_shuffled(
    out: Path,
    plan: Plan,
    d: int,
    shards: list[ShardPlan],
    reader,
    match,
    sink: _ShardSink,
    tmp_dir: str | None,
    block_rows: int,
) -> None:
    """Shuffled: stream the whole input, spill the rows of this part's shards per shard, write each in order."""
    ds = plan.datasets[d]
    encode = _encoder(plan, ds)
    r = ds["rows_per_shard"]
    lo, hi = shards[0].start, shards[-1].stop
    inv = np.memmap(inv_path(out, d), dtype=np.int64, mode="r", shape=(ds["num_rows"],))
    tmp = spill_dir("part-shuffle", tmp_dir)
    try:
        for a, block in reader.blocks(block_rows):
            pos = np.asarray(inv[a : a + block.shape[0]])
            keep = np.flatnonzero((pos >= lo) & (pos < hi))
            if not len(keep):
                continue
            mat = checked_block(remap_csr(block, match), ds["value_kind"], ds["input"], a)[keep]
            codes = {c: v[keep] for c, v in encode(reader, a, a + block.shape[0]).items()}
            dest = pos[keep] // r
            for k in np.unique(dest):
                rows = np.flatnonzero(dest == k)
                sub = mat[rows]
                _append(tmp / f"{k}.pos", pos[keep][rows])
                _append(tmp / f"{k}.nnz", np.diff(sub.indptr).astype(np.int64))
                _append(tmp / f"{k}.idx", sub.indices)
                _append(tmp / f"{k}.val", sub.data)
                for j, c in enumerate(plan.columns):
                    _append(tmp / f"{k}.obs.{j}", codes[c][rows])
        val_dt = np.float32 if ds["value_kind"] == "lognorm" else np.uint32
        for s in shards:
            k = s.k
            if not (tmp / f"{k}.pos").exists():
                raise SclabelError(f"{ds['input']}: no rows for shard {k} (input changed since the plan?)")
            pos = np.fromfile(tmp / f"{k}.pos", dtype=np.int64)
            order = np.argsort(pos)
            row_nnz = np.fromfile(tmp / f"{k}.nnz", dtype=np.int64)
            indptr = np.concatenate([[0], np.cumsum(row_nnz)])
            mat = sp.csr_matrix(
                (
                    np.fromfile(tmp / f"{k}.val", dtype=val_dt),
                    np.fromfile(tmp / f"{k}.idx", dtype=np.int32),
                    indptr,
                ),
                shape=(len(pos), plan.num_genes),
            )[order]
            codes = {
                c: np.fromfile(tmp / f"{k}.obs.{j}", dtype=np.int32)[order]
                for j, c in enumerate(plan.columns)
            }
            for f in tmp.glob(f"{k}.*"):
                f.unlink()
            sink.write(s, mat.indptr, mat.indices, mat.data, codes)
            del mat
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _append(path: Path, arr: np.ndarray) -> None:
    with open(path, "ab") as fh:
        fh.write(np.ascontiguousarray(arr).tobytes())


def read_manifests(out: Path) -> dict[int, dict]:
    """The finished parts' manifests by part number (all of one N, see run_part)."""
    found = {}
    for f in sorted((plan_dir(out) / PARTS_DIR).glob("part-*-of-*.json")):
        raw = json.loads(f.read_text())
        found[int(raw["part"])] = raw
    return found
