"""Helpers for the training tests: run `sclabel_dist.pretrain` under torchrun on CPU and read its metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parent / "runner.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def torchrun(
    overrides: list[str],
    *,
    nproc: int = 2,
    torchrun_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc runner.py OVERRIDES` on a free port; output captured."""
    args = torchrun_args if torchrun_args is not None else [f"--master-port={free_port()}"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        *args,
        str(RUNNER),
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env or base_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(log_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(log_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def losses_by_step(records: list[dict]) -> dict[int, float]:
    """The last logged loss per step (a restarted run logs the replayed steps again)."""
    return {r["step"]: r["loss"] for r in records}
