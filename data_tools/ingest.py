"""`sclabel-data ingest`: .h5ad / 10x / SOMA inputs -> one sharded Zarr cell store, out-of-core, atomically.

Per input: open -> scan (value checks, per-gene totals) -> match genes to the vocabulary -> report (refuse
under --min-match) -> write row blocks (optionally through the out-of-core shuffle). Nothing is written
until every input has been scanned and matched, so a bad input leaves no store behind. The store's lock is
held from the first look at it to the commit, and every input of one command lands in one commit.

An output at s3://bucket/prefix is staged on local disk (--tmp-dir) by the same writer, then uploaded and
committed by remote_store.publish: shards first, index.json last by a conditional put (no lock there).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools import remote_store
from data_tools.readers import InputReader, open_input
from data_tools.scan import InputStats, decide_value_kind, scan_input
from data_tools.shuffle_write import num_buckets, shuffled_blocks
from data_tools.store_lock import StoreLock
from data_tools.tempfiles import spill_dir
from data_tools.vocab_build import build_vocab_from_union
from data_tools.writer import StoreWriter, commit_appends, staged_store
from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores.location import as_path, is_remote
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneMatch, GeneVocab, remap_csr


@dataclass
class Prepared:
    """One input after the scan: ready to write."""

    name: str
    reader: InputReader
    stats: InputStats
    value_kind: str
    match: GeneMatch | None = None
    report: dict | None = None
    obs_present: list[str] | None = None


@dataclass(frozen=True)
class IngestOptions:
    """What one ingest does (the command line's options, typed; see build_parser for each one's meaning)."""

    inputs: Sequence[str]
    out: str
    dataset_name: Sequence[str] = ()
    vocab: str | None = None
    min_cells: int = 1
    min_match: float = 0.5
    layer: str | None = None
    use_raw: bool = False
    gene_column: str | None = None
    ensembl_column: str | None = None
    measurement: str = "RNA"
    value_kind: str = "auto"
    obs_columns: str = ""
    append: bool = False
    overwrite: bool = False
    shuffle: bool = False
    seed: int = 0
    rows_per_shard: int | None = None
    block_rows: int = 4096
    tmp_dir: str | None = None
    no_progress: bool = False
    workers: int | None = None
    plan_only: bool = False
    part: str | None = None
    worker_memory: str | None = None
    stage: str | None = None

    def open_reader(self, path: str) -> InputReader:
        """A reader of `path` with these options' layer, gene columns and measurement."""
        return open_input(
            path,
            layer=self.layer,
            use_raw=self.use_raw,
            gene_column=self.gene_column,
            ensembl_column=self.ensembl_column,
            measurement=self.measurement,
            workdir=self.tmp_dir,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sclabel-data ingest", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help=".h5ad files, 10x directories or SOMA experiment URIs")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="store directory or s3://bucket/prefix to create (or extend with --append)",
    )
    p.add_argument(
        "--dataset-name", action="append", default=[], help="name per input (repeat; default: file stem)"
    )
    p.add_argument("--vocab", help="vocabulary JSON to map genes to (default: union of the inputs)")
    p.add_argument("--min-cells", type=int, default=1, help="union vocabulary keeps genes seen in >= N cells")
    p.add_argument(
        "--min-match",
        type=float,
        default=0.5,
        help="refuse an input whose matched genes carry less than this fraction of its counts",
    )
    p.add_argument(
        "--layer",
        help="h5ad layer / SOMA X layer to read (default: X, or layers['counts'] when X is not counts)",
    )
    p.add_argument("--use-raw", action="store_true", help="h5ad: read raw/X and raw/var")
    p.add_argument("--gene-column", help="var column holding gene symbols (default: var index)")
    p.add_argument(
        "--ensembl-column",
        help="var column holding Ensembl IDs (default: ensembl / gene_ids ... when present)",
    )
    p.add_argument("--measurement", default="RNA", help="SOMA measurement")
    p.add_argument(
        "--value-kind",
        default="auto",
        choices=["auto", "counts", "lognorm"],
        help="how X is stored; auto = uns hint, else integers -> counts",
    )
    p.add_argument(
        "--obs-columns",
        default="",
        help="comma-separated obs columns to keep, e.g. cell_type,batch; a trailing '?' (cell_type?) makes one optional: inputs without it get missing values",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--append", action="store_true", help="add datasets to an existing store (same vocabulary)"
    )
    mode.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument(
        "--shuffle",
        action="store_true",
        help="globally shuffle each dataset's cells at write time (out-of-core)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    p.add_argument(
        "--rows-per-shard", type=int, help="rows per shard (default: from mean non-zeros per cell)"
    )
    p.add_argument("--block-rows", type=int, default=4096, help="rows read per block")
    p.add_argument("--tmp-dir", help="directory for temporary spill files (10x, shuffle)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    par = p.add_argument_group("parallel ingest (plan serially, write parts in parallel, commit once)")
    par.add_argument(
        "--workers",
        type=int,
        help="write with N spawned processes (each holds one block and one shard); same store as serial",
    )
    par.add_argument(
        "--plan-only",
        action="store_true",
        help="only plan: write the plan into OUT/_ingest, for --part runs (e.g. a SLURM array) and `commit`",
    )
    par.add_argument(
        "--part",
        metavar="I/N",
        help="write part I of N of the plan in OUT (same inputs and options as --plan-only); rerun redoes a killed part",
    )
    par.add_argument(
        "--stage",
        metavar="DIR",
        help="s3:// output with --plan-only / --part: build the store here (every task sees it); commit DIR publishes it",
    )
    par.add_argument(
        "--worker-memory",
        metavar="SIZE",
        help="memory budget per worker or part, e.g. 800MiB or 2GiB: sets the rows read per block (never the store)",
    )
    return p


def dataset_names(inputs: Sequence[str], given: Sequence[str]) -> list[str]:
    """One name per input: the given ones, else the file stem (sanitised, made unique)."""
    if given and len(given) != len(inputs):
        raise SclabelError(
            f"{len(given)} --dataset-name for {len(inputs)} inputs: give one per input or none"
        )
    names = list(given) or [
        re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(str(i).rstrip("/")).name.removesuffix(".h5ad")) for i in inputs
    ]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def choose_vocab(opts: IngestOptions, prepared: list[Prepared]) -> GeneVocab:
    """The store's vocabulary when appending, else --vocab, else the union of the inputs."""
    if opts.append:
        vocab = GeneVocab.from_json(as_path(opts.out) / fmt.VOCAB_FILE)
        if opts.vocab and GeneVocab.from_json(opts.vocab).hash != vocab.hash:
            raise SclabelError(
                f"--vocab {opts.vocab} differs from the store's {as_path(opts.out) / fmt.VOCAB_FILE}; drop --vocab to use the store's"
            )
        return vocab
    if opts.vocab:
        return GeneVocab.from_json(opts.vocab)
    return build_vocab_from_union(
        [(p.reader.var_names, p.reader.ensembl, p.stats.cells_per_column) for p in prepared], opts.min_cells
    )


def print_report(p: Prepared) -> None:
    r = p.report or {}
    print(
        f"{p.name}: {p.stats.num_rows} cells, {p.value_kind}; genes matched {r['genes_matched']}/{r['genes_total']}"
        f" ({r['fraction_genes']:.1%}), fraction of counts {r['fraction_counts']:.1%}, duplicates dropped {r['duplicates_dropped']}"
    )


def check_match(p: Prepared, min_match: float) -> None:
    r = p.report or {}
    if r["fraction_counts"] < min_match:
        lost = ", ".join(g for g, _ in r["top_unmatched_by_counts"][:5])
        raise SclabelError(
            f"{p.reader.path}: genes matching the vocabulary carry only {r['fraction_counts']:.1%} of counts "
            f"({r['genes_matched']}/{r['genes_total']} genes; biggest unmatched: {lost}), under --min-match "
            f"{min_match}. Check the gene naming (--gene-column / --ensembl-column), the species, or the vocabulary; "
            "or lower --min-match"
        )


def parse_obs_columns(text: str) -> tuple[list[str], set[str]]:
    """'cell_type?,batch' -> (['cell_type', 'batch'], {'cell_type'}): all columns and the optional ones."""
    items = [c.strip() for c in text.split(",") if c.strip()]
    return [c.rstrip("?") for c in items], {c.rstrip("?") for c in items if c.endswith("?")}


def present_columns(reader: InputReader, columns: list[str], optional: set[str]) -> list[str]:
    """The columns this input has; a missing required one raises SclabelError naming the file and column."""
    have = []
    for c in columns:
        try:
            reader.obs([c], 0, min(1, reader.num_rows))
            have.append(c)
        except SclabelError:
            if c not in optional:
                raise
    return have


def row_blocks(p: Prepared, columns: list[str], block_rows: int):
    """(CSR in vocabulary space, obs values) blocks of one input, in file order; absent columns are None."""
    for start, block in p.reader.blocks(block_rows):
        n = block.shape[0]
        obs = p.reader.obs(p.obs_present, start, start + n)
        yield remap_csr(block, p.match), {c: obs.get(c, np.full(n, None, dtype=object)) for c in columns}


def write_dataset(
    store: Path,
    vocab: GeneVocab,
    p: Prepared,
    mode: str,
    opts: IngestOptions,
    columns: list[str],
    index: fmt.StoreIndex | None = None,
) -> StoreWriter:
    """Write one input; with `index` (append) the dataset stays staged until commit_appends."""
    blocks: Any = row_blocks(p, columns, opts.block_rows)
    if opts.shuffle:
        nb = num_buckets(p.stats.nnz, p.stats.num_rows)
        blocks = shuffled_blocks(blocks, columns, len(vocab), nb, opts.seed, opts.tmp_dir)
    bar = tqdm(total=p.stats.num_rows, desc=f"write {p.name}", unit="cells", disable=opts.no_progress)
    with StoreWriter(
        store,
        vocab,
        p.name,
        value_kind=p.value_kind,
        obs_columns=columns,
        rows_per_shard=opts.rows_per_shard,
        mean_nnz_hint=p.stats.nnz / max(p.stats.num_rows, 1),
        mode=mode,
        source=str(p.reader.path),
        match_report=p.report,
        index=index,
        commit=index is None,
    ) as writer:
        for mat, obs in blocks:
            writer.write_block(mat, obs)
            bar.update(mat.shape[0])
    bar.close()
    return writer


def append_datasets(
    out: Path,
    index: fmt.StoreIndex,
    vocab: GeneVocab,
    prepared: list[Prepared],
    opts: IngestOptions,
    columns: list[str],
) -> None:
    """Stage every input, then commit them with one index: a failure half way leaves the store as it was."""
    writers: list[StoreWriter] = []
    try:
        for p in prepared:
            writers.append(write_dataset(out, vocab, p, "append", opts, columns, index=index))
        commit_appends(out, index, writers)
    except BaseException:
        for w in writers:
            w.abort()
        raise


def prepare_inputs(
    opts: IngestOptions,
    names: list[str],
    columns: list[str],
    optional: set[str],
    prepared: list[Prepared],
    scanned: Sequence[InputStats] | None = None,
) -> GeneVocab:
    """Open, scan and match every input (appended to `prepared`, which the caller closes); the vocabulary.

    Nothing is written here: a bad input (values, columns, too few matched genes) raises before any write.
    `scanned`: the inputs' stats when already scanned (the parallel plan scans in several processes).
    """
    for i, (path, name) in enumerate(zip(opts.inputs, names, strict=True)):
        reader = opts.open_reader(path)
        prepared.append(Prepared(name, reader, None, ""))  # type: ignore[arg-type]
        prepared[-1].obs_present = present_columns(reader, columns, optional)  # fail before any work
        stats = scanned[i] if scanned else scan_input(reader, opts.block_rows, progress=not opts.no_progress)
        prepared[-1].stats = stats
        prepared[-1].value_kind = decide_value_kind(stats, reader, opts.value_kind)
    vocab = choose_vocab(opts, prepared)
    for p in prepared:
        p.match = vocab.match(p.reader.var_names, p.reader.ensembl)
        p.report = {
            "dataset": p.name,
            "source": str(p.reader.path),
            "value_kind": p.value_kind,
            **p.match.report(p.stats.sum_per_column),
        }
        print_report(p)
    for p in prepared:
        check_match(p, opts.min_match)
    return vocab


# Out of space or quota: the writers have already dropped what they staged, so one line is all there is to say.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def ingest(opts: IngestOptions) -> fmt.StoreIndex | None:
    """Run an ingest, holding the store's lock throughout; returns the final index (None: a plan or a part)."""
    try:
        if opts.worker_memory and not (opts.workers or opts.part):
            raise SclabelError(
                "--worker-memory budgets the workers of --workers N or --part I/N (--workers 1: one process)"
            )
        if opts.workers is not None or opts.plan_only or opts.part:
            from data_tools.ingest_parallel import run

            return run(opts)
        # Object storage has no lock: there the commit is a conditional put (remote_store.py).
        with nullcontext() if is_remote(opts.out) else StoreLock(opts.out):
            return _ingest_locked(opts)
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        # A failed write() carries no file name: the store being written is the place to name.
        where = exc.filename or opts.out
        raise SclabelError(
            f"{where}: {os.strerror(exc.errno)} while writing the store; nothing was committed "
            f"({'the store is as it was' if opts.append else 'no store was created'}): free space and rerun"
        ) from None


def _ingest_locked(opts: IngestOptions) -> fmt.StoreIndex:
    columns, optional = parse_obs_columns(opts.obs_columns)
    names = dataset_names(opts.inputs, opts.dataset_name)
    out = as_path(opts.out)
    remote = is_remote(out)
    index = None
    version: dict | None = None  # object storage: the index.json version the commit must still find
    if opts.append:
        index, version = remote_store.read_index_versioned(out) if remote else (fmt.read_index(out), None)
        existing = {d.name for d in index.datasets}
        clash = sorted(set(names) & existing)
        if clash:
            raise SclabelError(f"{out}: dataset(s) {clash} already in the store; pick other --dataset-name")
    elif remote:
        version = remote_store.check_target(out, overwrite=opts.overwrite)
    elif out.exists() and not opts.overwrite:
        raise SclabelError(
            f"{out}: already exists; use --append to add datasets or --overwrite to replace it"
        )
    prepared: list[Prepared] = []
    try:
        vocab = prepare_inputs(opts, names, columns, optional, prepared)
        if remote:
            _write_remote(out, index, version, vocab, prepared, opts, columns)
        elif index is not None:
            append_datasets(out, index, vocab, prepared, opts, columns)
        else:
            with staged_store(out, overwrite=opts.overwrite) as staged:
                for i, p in enumerate(prepared):
                    write_dataset(staged, vocab, p, "create" if i == 0 else "append", opts, columns)
    finally:
        for p in prepared:
            p.reader.close()
    index = fmt.read_index(out)
    print(
        f"{out}: {index.num_rows} cells, {index.num_genes} genes, {index.nnz} non-zeros, {index.num_shards} shards"
    )
    return index


def _write_remote(
    out: Any,
    index: fmt.StoreIndex | None,
    version: dict | None,
    vocab: GeneVocab,
    prepared: list[Prepared],
    opts: IngestOptions,
    columns: list[str],
) -> None:
    """Write the datasets into a local staging store (a copy of the remote index and vocab when appending),
    then upload them and commit index.json conditionally (remote_store.publish)."""
    work = spill_dir("s3stage", opts.tmp_dir)
    local = work / "store"
    try:
        if index is not None:
            (local / fmt.SHARDS_DIR).mkdir(parents=True)
            fmt.write_index(local, index)
            vocab.to_json(local / fmt.VOCAB_FILE)
            append_datasets(local, index, vocab, prepared, opts, columns)
        else:
            with staged_store(local) as staged:
                for i, p in enumerate(prepared):
                    write_dataset(staged, vocab, p, "create" if i == 0 else "append", opts, columns)
        commit = version if version is not None else "create"
        remote_store.publish(local, out, [p.name for p in prepared], commit=commit, new_store=index is None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ingest(IngestOptions(**vars(build_parser().parse_args(argv))))
    return 0
