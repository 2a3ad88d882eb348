"""Workers die with their torchrun agent: a SIGKILLed agent must not leave orphans that keep training."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Ask for SIGKILL when the parent (the torchrun agent) dies; a watchdog thread where prctl is missing.

    Without it, killing the agent re-parents its workers to init and they keep training and checkpointing,
    and a rerun then trains into the same directory at the same time.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            # the agent may have died between our start and prctl: then we were already re-parented
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)
            return
    threading.Thread(target=_watch, args=(parent,), name="sclabel-lifeline", daemon=True).start()


def _watch(parent: int, period_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(period_s)
    os.kill(os.getpid(), signal.SIGKILL)
