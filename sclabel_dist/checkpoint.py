"""Save, find, resume and rotate checkpoints: DeepSpeed shards plus loader / train state, crash-safe `latest`.

Layout of `root/`:
    step_00001000/   DeepSpeed shards, sclabel_state.json (step, loader, metrics, config, model args, vocab hash),
                     vocab.json, rng/rank_00000.safetensors (one per rank), COMPLETE (written last)
    latest           the tag of the newest complete checkpoint, replaced atomically (DeepSpeed reads it too)
A directory without COMPLETE is a save that crashed half-way: it is never resumed from, and is deleted later.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from sclabel_dist.errors import SclabelError

COMPLETE = "COMPLETE"
STATE_FILE = "sclabel_state.json"
VOCAB_FILE = "vocab.json"
_TAG = re.compile(r"^step_(\d{8,})$")


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
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise SclabelError(
                f"checkpoint.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)"
            )
        return path
    root = Path(root)
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(root / tag):
            return root / tag
    # `latest` missing or stale (e.g. it was being replaced): fall back to scanning for markers
    complete = list_complete(root)
    return complete[-1] if complete else None


def write_text_atomic(path: Path, text: str) -> None:
    """Write then rename: a reader sees the old file or the new one, never half of either."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(
    engine: Any, root: str | Path, step: int, state: dict[str, Any], vocab: Any, rank: int, keep: int
) -> Path:
    """Save step `step` on every rank (collective), then mark it complete, point `latest` at it and rotate.

    Order matters for crash safety: shards and side files -> barrier -> COMPLETE -> `latest` -> delete old ones.
    A crash anywhere before COMPLETE leaves a directory that find_resume ignores.
    """
    import torch.distributed as dist

    from sclabel_dist.distributed import engine as ds

    root = Path(root)
    tag = checkpoint_tag(step)
    path = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists() and not is_complete(path):
            shutil.rmtree(path)  # the remains of a save that crashed: start clean
    _barrier(dist)
    if is_complete(path):
        return path  # already saved (e.g. the final step coincides with a periodic save)
    ds.save_checkpoint(engine, root, tag, client_state={"sclabel_state": state})
    save_rng(path / "rng", rank)
    if rank == 0:
        write_text_atomic(path / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
        vocab.to_json(path / VOCAB_FILE)
    _barrier(dist)  # every rank's shards are on disk before the marker says so
    if rank == 0:
        write_text_atomic(path / COMPLETE, f"{step}\n")
        write_text_atomic(root / "latest", tag)
        rotate(root, keep)
    _barrier(dist)
    return path


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


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON train state of a complete checkpoint."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise SclabelError(f"{path}: not a sclabel checkpoint (no {STATE_FILE})")
    return json.loads(file.read_text())


def load_checkpoint(engine: Any, path: str | Path, rank: int) -> dict[str, Any]:
    """Restore model, optimizer, scheduler (DeepSpeed) and this rank's RNG; returns the saved train state."""
    from sclabel_dist.distributed import engine as ds

    path = Path(path)
    state = read_state(path)
    world, stage = engine.dp_world_size, engine.zero_optimization_stage()
    if state.get("world_size", world) != world and stage > 0:
        # ZeRO shards the optimizer state by data-parallel rank; DeepSpeed cannot re-shard it on load
        raise SclabelError(
            f"{path}: saved by {state['world_size']} ranks with ZeRO {stage}, resumed with {world}; resume "
            f"with {state['world_size']} ranks, or export it and start a new run with train.init_from=BUNDLE"
        )
    ds.load_checkpoint(engine, path.parent, path.name)
    load_rng(path / "rng", rank)
    return state


def _barrier(dist: Any) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
