"""Temporary files of the writers, named by their owner's pid so that the next run removes what a killed one left.

One rule for all of them: the store writer's staged directories, the 10x spill and the --shuffle buckets.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, prefix: str) -> None:
    """Remove `prefix<pid>...` entries left by writers that died (their pid is gone)."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        m = re.match(r"(\d+)", p.name[len(prefix) :])
        if m and (int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1)))):
            continue  # ours, or a live writer's
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def spill_dir(kind: str, workdir: str | Path | None) -> Path:
    """A fresh temp dir `sclabel-KIND-HOST-PID-*` in workdir (default: the system's), after removing the ones
    of dead processes of this host (the host in the name: a --tmp-dir shared by cluster nodes holds other
    hosts' live pids)."""
    parent = Path(workdir) if workdir else Path(tempfile.gettempdir())
    prefix = f"sclabel-{kind}-{socket.gethostname()}-"
    clean_stale(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
