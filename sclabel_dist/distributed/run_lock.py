"""One run per checkpoint directory: rank 0 holds an exclusive lock on DIR/.lock for as long as it lives."""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import time
from pathlib import Path

from sclabel_dist.errors import SclabelError

LOCK_FILE = ".lock"


def hold_run_lock(root: str | Path, wait_s: float = 5.0) -> int:
    """Take the exclusive lock on checkpoint directory `root` (created if needed) and return its descriptor.

    The descriptor is meant to stay open until the process exits: the kernel drops a flock however the process
    ends (SIGKILL included), so a crashed run never leaves a stale lock. The short wait covers a torchrun
    restart, where the previous attempt's rank 0 may still be exiting. Another live run gets one line naming it
    (host and pid, from the lock file). flock works across nodes on NFSv4 and Lustre (mounted with flock).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    file = root / LOCK_FILE
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown holder"
                os.close(fd)
                raise SclabelError(
                    f"{root}: checkpoint directory is in use by another run ({holder}); stop that run or "
                    "set checkpoint.dir to another directory"
                ) from None
            time.sleep(0.2)
    since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {since}\n".encode(), 0)
    return fd


def lock_run(root: str | Path, rank: int) -> None:
    """Collective: rank 0 takes the lock on `root` for the rest of its life; if another run holds it, every
    rank raises the same one-line SclabelError (so none is left waiting in a collective)."""
    import torch.distributed as dist

    error = None
    if rank == 0:
        try:
            hold_run_lock(root)  # the descriptor stays open on purpose: the lock lives as long as the process
        except SclabelError as exc:
            error = str(exc)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        raise SclabelError(error)
