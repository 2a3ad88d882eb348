"""What `sclabel predict` and `sclabel embed` share: open the input in blocks, check it, run the model over
this process's range of cells, and join every rank's parts into the outputs (rank 0)."""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sclabel_dist.errors import SclabelError

OUTPUT_MODES = ("auto", "memory", "stream")


@dataclass(frozen=True)
class Job:
    """One predict / embed run, as typed values (the CLIs parse their flags into this)."""

    command: str  # "predict" (labels; needs a fine-tuned bundle) or "embed" (embeddings only)
    model: str
    data: str
    out: Path
    layer: str | None = None
    threshold: float = 0.5
    batch_size: int = 64
    block_size: int = 8192
    top_k: int = 3
    min_matched_genes: int = 100
    min_matched_fraction: float = 0.5
    warn_input_genes: float = 0.9
    min_input_genes: float = 0.7
    device: str | None = None
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; "fp32"; "bf16" on any device
    overwrite: bool = False
    in_memory: bool = False
    table: Path | None = None
    output: str = "auto"  # "memory": today's in-memory .h5ad + CSV; "stream": the h5py copy + a table
    memory_max_cells: int = 200_000


@dataclass
class Plan:
    """The files a run writes: an annotated .h5ad (in memory or copied), a table, a CSV."""

    h5ad: Path | None
    table: Path | None
    in_memory: bool  # predict's small-input path: the AnnData in memory, written with a CSV as before

    @property
    def outputs(self) -> list[Path]:
        return [p for p in (self.h5ad, self.table) if p is not None]


def check_job(job: Job) -> None:
    """Refuse bad settings before any file is opened."""
    if job.precision not in ("auto", "fp32", "bf16"):
        raise SclabelError(f"--precision {job.precision!r}: choose auto, fp32 or bf16")
    if job.command == "predict" and not 0.0 <= job.threshold <= 1.0:
        raise SclabelError(f"--threshold {job.threshold}: must be between 0 and 1")
    for flag, value in (
        ("--batch-size", job.batch_size),
        ("--block-size", job.block_size),
        ("--top-k", job.top_k),
    ):
        if value < 1:
            raise SclabelError(f"{flag} {value}: must be >= 1")
    if not 0.0 <= job.min_input_genes <= job.warn_input_genes <= 1.0:
        raise SclabelError(
            f"--min-input-genes {job.min_input_genes} and --warn-input-genes {job.warn_input_genes}: "
            "need 0 <= min <= warn <= 1"
        )
    if job.output not in OUTPUT_MODES:
        raise SclabelError(f"--output {job.output!r}: choose from {list(OUTPUT_MODES)}")
    if job.table is not None and job.table.suffix != ".parquet":
        raise SclabelError(f"--table {job.table}: the table is written as Parquet; give a .parquet path")


def plan_outputs(job: Job, num_cells: int, h5ad_input: bool) -> Plan:
    """Which files to write, from --out / --table / --output and the input's size."""
    if job.out.suffix == ".parquet":
        return Plan(None, job.out, False)
    if not h5ad_input:
        raise SclabelError(
            f"--out {job.out}: an annotated .h5ad needs an .h5ad input; for a cell store or SOMA experiment "
            "give a .parquet table as --out"
        )
    small = job.output == "memory" or (job.output == "auto" and num_cells <= job.memory_max_cells)
    if job.command == "predict" and small:
        return Plan(job.out, job.table, True)
    table = job.table
    if table is None and job.command == "predict":
        table = job.out.with_suffix(".parquet")  # a large input's annotations, readable without the .h5ad
    return Plan(job.out, table, False)


def check_outputs(plan: Plan, job: Job, data: str) -> None:
    from sclabel_dist.annotate.output import check_output, csv_path_for

    for path in plan.outputs:
        if Path(data).exists() and path.resolve() == Path(data).resolve():
            raise SclabelError(f"{path}: the output would replace the input; choose another --out")
        if path.exists() and not job.overwrite:
            raise SclabelError(f"{path}: output exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise SclabelError(f"{path.parent}: output directory does not exist")
    if plan.in_memory:
        check_output(job.out, Path(data), job.overwrite)
    if plan.table is not None and plan.h5ad is not None and plan.table == csv_path_for(plan.h5ad):
        raise SclabelError(f"{plan.table}: the table and the CSV would get the same name")


def run_job(job: Job) -> int:
    """Run `job` in this process (rank r of a torchrun job, or alone)."""
    import torch

    from sclabel_dist.distributed.env import read_dist_env

    check_job(job)
    env = read_dist_env()
    group = None
    if env.world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        group = dist
    try:
        return _run(job, env, group, torch)
    finally:
        if group is not None:
            group.destroy_process_group()


def _run(job: Job, env: Any, dist: Any, torch: Any) -> int:
    from sclabel_dist.annotate.blocks import MatrixSource, is_h5ad, open_source
    from sclabel_dist.annotate.classifier import load_classifier, resolve_bundle_dir
    from sclabel_dist.annotate.genes import check_input_genes, genes_from_names, input_gene_coverage
    from sclabel_dist.annotate.inference import tokenize_config
    from sclabel_dist.annotate.output import check_output
    from sclabel_dist.annotate.prepare import check_gene_match, format_match_report, value_kind_note
    from sclabel_dist.annotate.scan import ValueStats
    from sclabel_dist.annotate.stream import (
        InferenceSettings,
        block_ranges,
        cell_range,
        prepare_work_dir,
        run_blocks,
        work_dir_for,
    )
    from sclabel_dist.bundle import load_bundle

    t0 = time.perf_counter()
    say = print if env.rank == 0 else (lambda *a, **k: None)
    # The output checks that need no input, before the slow work (today's order and messages).
    if job.out.suffix == ".parquet":
        check_outputs(Plan(None, job.out, False), job, job.data)
    else:
        check_output(job.out, Path(job.data), job.overwrite)
        if not is_h5ad(job.data):
            plan_outputs(job, 0, False)
    if job.table is not None:
        check_outputs(Plan(None, job.table, False), job, job.data)
    bundle = load_bundle(resolve_bundle_dir(job.model))
    classes = bundle.config.get("labels")
    if job.command == "predict":
        if not classes:
            raise SclabelError(
                f"{bundle.path}: a pretrained bundle without labels; fine-tune it with `sclabel finetune`"
            )
        model = load_classifier(bundle.config["model_args"], bundle.state_dict)
    else:
        classes = None
        model = bundle.build_model()
    if job.device:
        device = torch.device(job.device)
    else:
        device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    model.to(device)
    bf16 = job.precision == "bf16" or (job.precision == "auto" and device.type == "cuda")

    source = open_source(job.data, bundle.vocab, layer=job.layer, in_memory=job.in_memory)
    try:
        n = source.num_cells
        plan = plan_outputs(job, n, isinstance(source, MatrixSource))
        check_outputs(plan, job, job.data)
        start, stop = cell_range(n, env.rank, env.world_size)
        say(
            f"data: {source.where} ({n:,} cells x {len(source.match.column_to_gene):,} genes); model: "
            f"{bundle.path} ({f'{len(classes)} classes' if classes else 'embeddings'}); "
            f"{env.world_size} process(es), {job.block_size:,} cells per block"
        )
        continuous = bundle.config["tokenize"].get("value_encoding", "binned") != "binned"
        if isinstance(source, MatrixSource):
            stats = ValueStats(source.num_columns, row_sums=continuous)
            source.scan(start, stop, job.block_size, stats)
            stats = _all_ranks(dist, stats, env.world_size)
            source.value_kind = stats.value_kind(source.where, source.declared)
            kinds, per_column, sums = [source.value_kind], stats.column_sums, stats.row_sums_array()
        else:  # a store's value kinds were checked when it was written
            kinds, per_column, sums = sorted(source.value_kinds), None, np.array([1e4])
        report, present = check_gene_match(
            source.match,
            per_column,
            min_genes=job.min_matched_genes,
            min_fraction=job.min_matched_fraction,
            where=source.where,
        )
        say(format_match_report(report))
        genes = genes_from_names(bundle.vocab, bundle.config.get("input_genes"), str(bundle.path))
        coverage = None
        if genes is not None:
            coverage = input_gene_coverage(bundle.vocab, genes, present)
            line = check_input_genes(
                coverage,
                warn_below=job.warn_input_genes,
                refuse_below=job.min_input_genes,
                where=source.where,
            )
            say(line)
        for kind in kinds:
            say(value_kind_note(kind, bundle.config["tokenize"], source.where, sums))

        work = work_dir_for(job.out)
        fingerprint = {
            "command": job.command,
            "model": str(Path(bundle.path).resolve()),
            "weights": bundle.checksums.get("model.safetensors"),
            "data": _file_identity(job.data),
            "layer": job.layer,
            "in_memory": job.in_memory,
            "block_size": job.block_size,
            "bf16": bf16,  # parts of a killed run are kept only when computed at the same precision
            "world_size": env.world_size,
            "num_cells": n,
        }
        try:
            if env.rank == 0:
                kept = prepare_work_dir(work, fingerprint)
                if kept:
                    say(f"resuming: {kept} block(s) of a killed run kept in {work}")
            _barrier(dist)
            settings = InferenceSettings(
                tok_cfg=tokenize_config(bundle.config["tokenize"]),
                genes=genes,
                batch_size=job.batch_size,
                device=device,
                bf16=bf16,
                want_probs=classes is not None,
            )
            ranges = block_ranges(start, stop, job.block_size)
            t_infer = time.perf_counter()
            progress = _Progress(say, stop - start, t_infer)
            computed = run_blocks(model, source, ranges, settings, work, log=progress)
            _barrier(dist)
            seconds = time.perf_counter() - t_infer
            say(
                f"inference: {n:,} cells ({computed:,} computed on rank 0) in {seconds:.1f} s"
                + (
                    f", {computed * env.world_size / seconds:,.0f} cells/s"
                    if computed and seconds > 0
                    else ""
                )
            )
            if env.rank == 0:
                uns = _uns(bundle, job, report, coverage, classes)
                _write_outputs(plan, job, work, n, classes, uns, say)
                shutil.rmtree(work, ignore_errors=True)
                say(f"done in {time.perf_counter() - t0:.1f} s")
            _barrier(dist)
        except BaseException:
            # A small input is quick to redo: an interrupt or error leaves nothing. A large one keeps its
            # finished blocks (in the hidden work directory) for the rerun; a SIGKILL keeps them in any case.
            if plan.in_memory and env.world_size == 1:
                shutil.rmtree(work, ignore_errors=True)
            elif env.rank == 0 and work.is_dir():
                print(f"stopped: finished blocks are kept in {work}; run the same command again to resume")
            raise
    finally:
        source.close()
    return 0


def _write_outputs(plan: Plan, job: Job, work: Path, n: int, classes: Any, uns: dict, say: Any) -> None:
    import os

    from sclabel_dist.annotate.columnar import collect, write_h5ad_copy, write_table

    codes = None
    if plan.in_memory:
        import anndata

        from sclabel_dist.annotate.output import assign_labels, write_annotated

        emb, prob = collect(work, n)
        label, confidence, top_label = assign_labels(prob, classes, job.threshold)
        adata = anndata.read_h5ad(job.data)
        csv = write_annotated(
            adata, job.out, label=label, confidence=confidence, top_label=top_label, embedding=emb, uns=uns
        )
        values, counts = np.unique(label.astype(str), return_counts=True)
        say(_summary(dict(zip(values, counts, strict=True))))
        if plan.table is not None:
            tmp = work / f"table{plan.table.suffix}"
            write_table(work, tmp, n, classes=classes, threshold=job.threshold, top_k=job.top_k)
            os.replace(tmp, plan.table)
        say(
            f"wrote {job.out} (obs sclabel_label / sclabel_confidence, obsm X_sclabel) and {csv}"
            + (f" and {plan.table}" if plan.table else "")
        )
        return
    temps = []
    if plan.h5ad is not None:
        tmp = work / "annotated.h5ad"
        codes = write_h5ad_copy(
            Path(job.data), work, tmp, n, classes=classes, threshold=job.threshold, uns=uns
        )
        temps.append((tmp, plan.h5ad))
    if plan.table is not None:
        tmp = work / "table.parquet"
        write_table(work, tmp, n, classes=classes, threshold=job.threshold, top_k=job.top_k)
        temps.append((tmp, plan.table))
    for tmp, final in temps:  # every output complete before the first is renamed into place
        os.replace(tmp, final)
    if codes is not None:
        names = [*classes, "Unassigned"]
        counts = np.bincount(codes, minlength=len(names))
        say(_summary({names[i]: int(c) for i, c in enumerate(counts) if c}))
    say(f"wrote {', '.join(str(p) for p in plan.outputs)}")


def _summary(counts: dict[str, int]) -> str:
    return "labels: " + ", ".join(f"{v} {c}" for v, c in sorted(counts.items(), key=lambda x: -x[1]))


def _uns(bundle: Any, job: Job, report: dict, coverage: Any, classes: Any) -> dict:
    uns: dict[str, Any] = {"model": str(bundle.path)}
    if classes is not None:
        uns["threshold"] = job.threshold
        uns["classes"] = list(classes)
    uns["gene_match"] = {k: v for k, v in report.items() if isinstance(v, int | float | str)}
    if coverage is not None:
        uns["input_genes"] = coverage.to_dict()
    return uns


def _file_identity(data: str) -> Any:
    p = Path(data)
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    return str(p.resolve()) if p.exists() else data


def _all_ranks(dist: Any, stats: Any, world: int) -> Any:
    """The scan's totals over every rank's cells (merged in rank order: the first bad row is the global one)."""
    if dist is None or world == 1:
        return stats
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, stats)
    total = gathered[0]
    for other in gathered[1:]:
        total.merge(other)
    return total


def _barrier(dist: Any) -> None:
    if dist is not None:
        dist.barrier()


class _Progress:
    """A line about every tenth of this rank's cells (rank 0 only prints)."""

    def __init__(self, say: Any, total: int, t0: float):
        self.say, self.total, self.t0, self.done, self.next = say, max(total, 1), t0, 0, 0.1

    def __call__(self, a: int, b: int) -> None:
        self.done += b - a
        if self.done / self.total >= self.next:
            with contextlib.suppress(Exception):
                rate = self.done / (time.perf_counter() - self.t0)
                self.say(
                    f"  {self.done:,} / {self.total:,} cells of this process ({rate:,.0f} cells/s)",
                    flush=True,
                )
            self.next = np.floor(self.done / self.total * 10 + 1) / 10
