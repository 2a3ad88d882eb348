"""Save, find, verify, resume and rotate checkpoints: DeepSpeed shards plus loader / train state, crash-safe `latest`.

Layout of `root/`:
    .lock            held by the run that trains into `root` (distributed/run_lock.py)
    step_00001000/   DeepSpeed shards, sclabel_state.json (step, loader, metrics, config, model args, vocab hash),
                     vocab.json, rng/rank_00000.safetensors (one per rank), SHA256SUMS (every file above),
                     COMPLETE (written last); universal/ once converted for another world size (universal.py)
    latest           the tag of the newest complete checkpoint, replaced atomically (DeepSpeed reads it too)
A directory without COMPLETE is a save that crashed half-way: it is never resumed from, and is deleted later.
A complete checkpoint whose files no longer match SHA256SUMS is skipped on resume for the newest one that does.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sclabel_dist.atomic import write_text_atomic
from sclabel_dist.checksums import SUMS, format_sums, mismatched, read_sums, sha256_file
from sclabel_dist.errors import SclabelError

COMPLETE = "COMPLETE"
STATE_FILE = "sclabel_state.json"
VOCAB_FILE = "vocab.json"
_TAG = re.compile(r"^step_(\d{8,})$")
# The universal copy of a step (universal.py) lives inside it with its own SHA256SUMS and COMPLETE.
UNIVERSAL = "universal"


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def list_complete(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _TAG.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def find_resume(root: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: None for 'never' or an empty root; 'auto' = newest complete; else a path."""
    candidates = resume_candidates(root, resume)
    return candidates[0] if candidates else None


def resume_candidates(root: str | Path, resume: str) -> list[Path]:
    """Checkpoints to try in order: for 'auto' the newest complete one (`latest` first), then older ones."""
    if resume == "never":
        return []
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise SclabelError(
                f"checkpoint.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)"
            )
        return [path]
    root = Path(root)
    complete = list_complete(root)
    first = None
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if _TAG.match(tag) and is_complete(root / tag):
            first = root / tag
    # `latest` missing or stale (e.g. it was being replaced): fall back to scanning for markers
    first = first or (complete[-1] if complete else None)
    if first is None:
        return []
    return [first] + [p for p in reversed(complete) if p.name < first.name]


def save_rng(path: Path, rank: int) -> None:
    """This rank's torch RNG states (CPU and, when present, CUDA) as safetensors: no pickle."""
    from safetensors.torch import save_file

    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / f"rank_{rank:05d}.safetensors"))


def load_rng(path: Path, rank: int) -> bool:
    """Restore this rank's RNG if the checkpoint has it (not when the world size grew); True if restored."""
    from safetensors.torch import load_file

    file = path / f"rank_{rank:05d}.safetensors"
    if not file.is_file():
        return False
    tensors = load_file(str(file))
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    return True


# -- checksums ---------------------------------------------------------------------------------------------


def checksummed_files(path: Path) -> list[str]:
    """Every file of a checkpoint directory that SHA256SUMS covers, as sorted relative POSIX paths."""
    skip = {COMPLETE, SUMS}
    out = []
    for file in path.rglob("*"):
        rel = file.relative_to(path)
        hidden = any(part.startswith(".") for part in rel.parts)  # temp files and killed conversions
        if not file.is_file() or rel.parts[0] == UNIVERSAL or rel.name in skip or hidden:
            continue
        out.append(rel.as_posix())
    return sorted(out)


def write_checksums(path: Path, rank: int, world: int) -> None:
    """Collective: each rank hashes a share of the files (the reads are spread), rank 0 writes SHA256SUMS."""
    files = checksummed_files(path)
    mine = {name: sha256_file(path / name) for name in files[rank::world]}
    merged: dict[str, str] = {}
    # world == 1 is one process writing alone (a conversion on rank 0 while the others wait): no collective,
    # even when a process group of another size exists
    for part in _all_gather(mine) if world > 1 else [mine]:
        merged.update(part)
    if rank == 0:
        write_text_atomic(path / SUMS, format_sums({n: merged[n] for n in sorted(merged)}))


def verify_checkpoint(path: str | Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems found in this rank's share of the files of `path` ([] when intact); rank 0 also checks for files
    that SHA256SUMS does not list. A checkpoint saved before checksums existed has none and passes."""
    path = Path(path)
    if not (path / SUMS).is_file():
        return []
    try:
        sums = read_sums(path)
    except SclabelError as exc:
        return [str(exc)]
    problems = mismatched(path, sums, sorted(sums)[rank::world], why="corrupted after it was saved")
    if rank == 0:
        problems += [f"{path / n}: not listed in {SUMS}" for n in checksummed_files(path) if n not in sums]
    return problems


def find_verified_resume(root: str | Path, resume: str, rank: int = 0, world: int = 1) -> Path | None:
    """Collective: the newest candidate checkpoint whose files all match their checksums, logging each one
    skipped. A checkpoint named explicitly is never replaced by another: it verifies or it is an error."""
    candidates = resume_candidates(root, resume)
    failures = []
    for candidate in candidates:
        problems = [p for part in _all_gather(verify_checkpoint(candidate, rank, world)) for p in part]
        if not problems:
            if failures and rank == 0:
                print(f"checkpoint: resuming from {candidate} instead", file=sys.stderr, flush=True)
            return candidate
        summary = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        if resume != "auto":
            raise SclabelError(f"{candidate}: checkpoint fails verification: {summary}")
        if rank == 0:
            print(f"checkpoint: skipping {candidate}: {summary}", file=sys.stderr, flush=True)
        failures.append(summary)
    if failures:
        raise SclabelError(f"{root}: no complete checkpoint verifies; newest: {failures[0]}")
    return None


# -- save ----------------------------------------------------------------------------------------------------


def describe_write_error(file: str | Path, exc: BaseException) -> str:
    """One line for a failed checkpoint write: the file and the cause, disk full named as such.

    torch.save reports a full disk as a RuntimeError from its zip writer ("file write failed"), with no
    errno, so a filesystem with almost nothing left free is taken as the cause.
    """
    code = getattr(exc, "errno", None)
    cause = os.strerror(code) if isinstance(exc, OSError) and code else str(exc).strip().splitlines()[0]
    try:
        probe = Path(file)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (free is not None and free < 16 << 20):
        cause = (
            f"no space left on device ({free} bytes free)" if free is not None else "no space left on device"
        )
    return f"{file}: {cause}"


def save_checkpoint(
    engine: Any, root: str | Path, step: int, state: dict[str, Any], vocab: Any, rank: int, keep: int
) -> Path:
    """Save step `step` on every rank (collective), then mark it complete, point `latest` at it and rotate.

    Order matters for crash safety: shards and side files -> checksums -> COMPLETE -> `latest` -> delete old
    ones. A crash anywhere before COMPLETE leaves a directory that find_resume ignores. A failed write on any
    rank (disk full) is agreed on by all ranks, the partial step is deleted and every rank raises one line.
    """
    import torch.distributed as dist

    from sclabel_dist.distributed import engine as ds

    root = Path(root)
    tag = checkpoint_tag(step)
    path = root / tag
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def prepare() -> None:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if path.exists() and not is_complete(path):
                shutil.rmtree(path)  # the remains of a save that crashed: start clean
            path.mkdir(exist_ok=True)

    _agree_on_failure(prepare, path, tag)
    if is_complete(path):
        return path  # already saved (e.g. the final step coincides with a periodic save)

    def write_shards() -> None:
        # The train state is stored once, as JSON (STATE_FILE): not also in DeepSpeed's pickled client state.
        failed = ds.save_checkpoint(engine, root, tag, client_state={})
        if failed:
            raise _WriteFailed(describe_write_error(*failed))
        save_rng(path / "rng", rank)
        if rank == 0:
            write_text_atomic(path / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
            vocab.to_json(path / VOCAB_FILE)

    # every rank's shards are on disk before anything says so
    _agree_on_failure(write_shards, path, tag)
    _agree_on_failure(lambda: write_checksums(path, rank, world), path, tag)

    def commit() -> None:
        if rank == 0:
            write_text_atomic(path / COMPLETE, f"{step}\n")
            write_text_atomic(root / "latest", tag)

    _agree_on_failure(commit, path, tag)
    if rank == 0:
        rotate(root, keep)
    _barrier(dist)
    return path


class _WriteFailed(Exception):
    """A write of this rank failed; the message is already one line naming the file and the cause."""


def _agree_on_failure(phase: Callable[[], None], path: Path, tag: str) -> None:
    """Run one phase of a save on every rank, then agree (collective) on whether any rank failed.

    A rank that failed alone and raised would leave the others waiting forever in the next collective, so
    failures are exchanged instead; then rank 0 deletes the partial step (freeing what it took; nothing points
    at it) and every rank raises the same one line. `latest` and the older checkpoints are untouched.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    error = None
    try:
        phase()
    except _WriteFailed as exc:
        error = str(exc)
    except OSError as exc:
        error = describe_write_error(exc.filename or path, exc)
    except Exception as exc:  # torch.save / safetensors report write failures as RuntimeError (and
        # a full disk can surface elsewhere, depending on which write it hits): any failure of one rank is
        # exchanged, never raised alone, or the other rank dies in the next collective with a raw traceback
        error = describe_write_error(path, exc)
    errors = [e for e in _all_gather(error) if e]
    if not errors:
        return
    if rank == 0 and not is_complete(path):
        shutil.rmtree(path, ignore_errors=True)
    _barrier(dist)
    raise SclabelError(f"checkpoint {tag} was not saved: {errors[0]}; the previous checkpoints are intact")


def rotate(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest."""
    complete = list_complete(root)
    if not complete:
        return
    newest = int(_TAG.match(complete[-1].name).group(1))
    for old in complete[: max(0, len(complete) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.iterdir():
        m = _TAG.match(p.name)
        if m and int(m.group(1)) < newest and not is_complete(p):
            shutil.rmtree(p, ignore_errors=True)


# -- load ----------------------------------------------------------------------------------------------------


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON train state of a complete checkpoint."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise SclabelError(f"{path}: not a sclabel checkpoint (no {STATE_FILE})")
    return json.loads(file.read_text())


def load_checkpoint(
    engine: Any, path: str | Path, rank: int, to_universal: Callable[[Path], Path]
) -> dict[str, Any]:
    """Collective: restore model, optimizer, scheduler (DeepSpeed) and this rank's RNG; returns the train state.

    Another world size under ZeRO 1-3 loads the step's universal copy: ZeRO shards the optimizer state by
    data-parallel rank, and only the universal format can be re-sharded. Rank 0 converts it once with
    `to_universal` (universal.convert_to_universal, passed in: universal.py builds on this module, so this
    module must not import it; cached in the step), the others wait. ZeRO 0 needs none: its checkpoint is
    not sharded by rank.
    """
    import torch.distributed as dist

    from sclabel_dist.distributed import engine as ds

    path = Path(path)
    state = read_state(path)
    world, stage = engine.dp_world_size, engine.zero_optimization_stage()
    if state.get("world_size", world) != world and stage > 0:
        error = None
        if rank == 0:
            try:
                t0 = time.perf_counter()
                to_universal(path)
                print(
                    f"checkpoint: {path} as a universal checkpoint in {time.perf_counter() - t0:.2f}s",
                    flush=True,
                )
            except (OSError, RuntimeError) as exc:
                error = (
                    f"{path}: conversion to a universal checkpoint failed: {describe_write_error(path, exc)}"
                )
        errors = [e for e in _all_gather(error) if e]
        if errors:
            raise SclabelError(errors[0])
        ds.load_checkpoint(engine, path, UNIVERSAL, universal=True)
    else:
        ds.load_checkpoint(engine, path.parent, path.name)
    if not load_rng(path / "rng", rank):
        # a rank that did not exist when this was saved: a seed derived from (seed, step, rank), not rank 0's
        seed = int(state.get("config", {}).get("train", {}).get("seed", 0))
        torch.manual_seed(seed * 1_000_003 + int(state["step"]) * 1_009 + rank)
    _barrier(dist)
    return state


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (a small picklable value), in rank order; [obj] without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier(dist: Any) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
