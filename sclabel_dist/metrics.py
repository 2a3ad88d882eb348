"""One metrics logger for rank 0: a line on stdout and a JSONL record always, TensorBoard scalars, a tqdm bar on a tty."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

# bf16 dense peak per device, for MFU; unknown GPUs report no MFU rather than a wrong one
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def peak_flops(device: str) -> float | None:
    """Dense bf16 peak FLOP/s of this device, or None (CPU, unknown GPU)."""
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_gb(device: str) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU, in GB."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


class StepTimer:
    """Accumulates wall time, data-wait time, cells and non-pad tokens between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.cells = 0
        self.tokens = 0
        self.steps = 0

    def rates(self, world_size: int, flops_per_token: float, peak: float | None) -> dict[str, float]:
        """Throughput since the last reset; counts are this rank's, scaled by the world size (equal batches)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_s = self.tokens * world_size / elapsed
        out = {
            "cells_per_s": self.cells * world_size / elapsed,
            "tokens_per_s": tokens_s,
            "data_wait_frac": self.data_wait / elapsed,
            "step_time_s": elapsed / max(self.steps, 1),
        }
        if peak:
            out["mfu"] = tokens_s * flops_per_token / (peak * world_size)
        return out


def _json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None, through dicts and lists."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Writes metrics on rank 0 only; other ranks get a logger whose methods do nothing."""

    def __init__(
        self, log_dir: str | Path, enabled: bool, max_steps: int, start_step: int, log_cfg: Any
    ) -> None:
        self.enabled = enabled
        self.jsonl = self.tb = self.bar = None
        if not enabled:
            return
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (open for the run)
        if log_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tb"))
        if log_cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": time.time(), **metrics}
        # JSON has no NaN or Infinity: a diverged value is written as null (stdout and TensorBoard show it).
        self.jsonl.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)
        text = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if not isinstance(v, dict))
        if self.bar is not None:
            self.bar.write(f"{prefix} step {step}: {text}")
        else:
            print(f"{prefix} step {step}: {text}", flush=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
