"""Inference over blocks of cells, one contiguous range per process, each block's results saved as a part.

Why parts: a million cells' embeddings do not fit beside the model in a small memory, and a killed run should
not start over. Every block's results go to `part_<start>_<stop>.npz` in a hidden work directory beside the
output (temp name, then rename: a part that exists is whole). A rerun with the same fingerprint (model,
input, settings, process count) keeps the parts it finds and computes the rest; rank 0 then joins them in
input order. Results do not depend on the block size or the number of processes: the model is in eval mode
and a cell's output depends only on the cell (padding is masked out).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"


def cell_range(num_cells: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous cells [start, stop) of `rank` out of `world`: sizes differ by at most one."""
    return num_cells * rank // world, num_cells * (rank + 1) // world


def block_ranges(start: int, stop: int, block_size: int) -> list[tuple[int, int]]:
    """[start, stop) cut into blocks of at most `block_size` cells."""
    return [(lo, min(stop, lo + block_size)) for lo in range(start, stop, block_size)]


def part_name(start: int, stop: int) -> str:
    return f"part_{start:012d}_{stop:012d}.npz"


def work_dir_for(out: Path) -> Path:
    """The hidden work directory of an output: beside it, so parts and the final rename stay on one disk."""
    return out.with_name(f".{out.name}.sclabel-parts")


def prepare_work_dir(work: Path, fingerprint: dict) -> int:
    """Create `work`, or keep the parts of a killed run with the same fingerprint; returns the parts kept."""
    manifest = work / MANIFEST
    if work.is_dir():
        try:
            same = json.loads(manifest.read_text()) == fingerprint
        except (OSError, ValueError):
            same = False
        if same:
            return len(list(work.glob("part_*.npz")))
        shutil.rmtree(work)
    work.mkdir()
    tmp = work / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    os.replace(tmp, manifest)
    return 0


def save_part(work: Path, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
    path = work / part_name(start, stop)
    tmp = work / f".{path.name}.tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def iter_parts(work: Path, num_cells: int) -> Iterator[dict[str, np.ndarray]]:
    """Every part in input order; checks that they cover [0, num_cells) exactly once."""
    parts = sorted(work.glob("part_*.npz"))
    at = 0
    for path in parts:
        start, stop = (int(x) for x in path.stem.split("_")[1:])
        if start != at:
            raise RuntimeError(f"{work}: parts do not cover cells {at}..{start} (internal error)")
        with np.load(path, allow_pickle=False) as z:
            yield {k: z[k] for k in z.files}
        at = stop
    if at != num_cells:
        raise RuntimeError(f"{work}: parts end at cell {at} of {num_cells} (internal error)")


@dataclass
class InferenceSettings:
    """What turns a block of cells into results (the same for every rank)."""

    tok_cfg: Any
    genes: np.ndarray | None  # the classifier's input genes (vocabulary indices), None = all
    batch_size: int
    device: torch.device
    want_probs: bool
    bf16: bool = False  # bf16 autocast on settings.device (probabilities and embeddings stay float32)


def infer_block(model: torch.nn.Module, block: Any, s: InferenceSettings) -> dict[str, np.ndarray]:
    """{"names", "embedding" [n, D] float32, and "prob" [n, K] float32 for a classifier} of one block."""
    from sclabel_dist.annotate.genes import classifier_input
    from sclabel_dist.annotate.inference import run_model

    X = classifier_input(block.X, block.value_kind, s.genes)
    # bf16 autocast where asked (a GPU's tensor cores by default; a CPU's AMX / AVX512-BF16 on request), fp32
    # otherwise. run_model batches cells of similar length together and masks the rest as padding.
    with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.bf16):
        emb, prob = run_model(model, X, s.tok_cfg, "lognorm", batch_size=s.batch_size, device=s.device)
    out = {"names": block.names.astype(str), "embedding": emb.astype(np.float32)}
    if s.want_probs:
        out["prob"] = prob.astype(np.float32)
    return out


def run_blocks(
    model: torch.nn.Module,
    source: Any,
    ranges: list[tuple[int, int]],
    settings: InferenceSettings,
    work: Path,
    *,
    log: Any = None,
) -> int:
    """Compute and save the parts of `ranges` not already in `work`; returns the number of cells computed.

    The next block is read in a thread while the model runs on this one (threads, never a fork: h5py, zarr
    and TileDB handles do not survive one).
    """
    todo = [(a, b) for a, b in ranges if not (work / part_name(a, b)).is_file()]
    if not todo:
        return 0
    done = 0
    with _Prefetch(source, todo) as blocks:
        for (a, b), parts in zip(todo, blocks, strict=True):
            results = [infer_block(model, block, settings) for block in parts]
            merged = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
            save_part(work, a, b, merged)
            done += b - a
            if log is not None:
                log(a, b)
    return done


class _Prefetch:
    """Reads the blocks of `ranges` one ahead in a background thread."""

    def __init__(self, source: Any, ranges: list[tuple[int, int]]):
        self._source, self._ranges = source, ranges
        self._result: Any = None
        self._thread: threading.Thread | None = None

    def _read(self, a: int, b: int) -> None:
        try:
            self._result = ("ok", self._source.read(a, b))
        except BaseException as exc:  # handed to the main thread, which raises it
            self._result = ("error", exc)

    def _start(self, i: int) -> None:
        self._thread = threading.Thread(target=self._read, args=self._ranges[i], daemon=True)
        self._thread.start()

    def __enter__(self) -> Iterator[list[Any]]:
        return self._iter()

    def _iter(self) -> Iterator[list[Any]]:
        if self._ranges:
            self._start(0)
        for i in range(len(self._ranges)):
            self._thread.join()
            status, value = self._result
            if status == "error":
                raise value
            if i + 1 < len(self._ranges):
                self._start(i + 1)
            yield value

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            with contextlib.suppress(Exception):
                self._thread.join()
