"""The DeepSpeed config as a pure function of the run config: no file, environment or device look-ups inside."""

from __future__ import annotations

import copy
from typing import Any

from sclabel_dist.errors import SclabelError


def build_deepspeed_config(
    train_cfg: Any,
    micro_batch_size: int,
    world_size: int,
    device_type: str = "cpu",
    preset: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """DeepSpeed JSON config for one run; values from `train_cfg` win over the optional `preset` (a ZeRO preset file).

    The optimizer and scheduler are created by engine.py (torch AdamW + our warmup-cosine), so none appear here.
    """
    train_cfg.validate()
    if micro_batch_size < 1 or world_size < 1:
        raise SclabelError("data.batch_size and the world size must be >= 1")
    cfg = copy.deepcopy(preset or {})
    for key in ("optimizer", "scheduler", "fp16"):
        cfg.pop(key, None)  # ours are built in code; fp16 is not supported (bf16 is)
    zero = dict(cfg.get("zero_optimization") or {})
    zero["stage"] = train_cfg.zero_stage
    cfg.update(
        {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": train_cfg.grad_accum,
            "train_batch_size": micro_batch_size * train_cfg.grad_accum * world_size,
            "gradient_clipping": float(train_cfg.grad_clip),
            "zero_optimization": zero,
            "bf16": {"enabled": train_cfg.precision == "bf16"},
            "zero_allow_untested_optimizer": True,
            # our metrics logger prints; DeepSpeed's own per-step prints would only add noise
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
    )
    if device_type == "cpu":
        # offloading to CPU is meaningless when the "device" already is the CPU
        cfg["zero_optimization"].pop("offload_optimizer", None)
        cfg["zero_optimization"].pop("offload_param", None)
    return cfg


def rescale_batch(global_batch: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) that keep `global_batch` cells per optimizer step on `world_size`
    ranks: the largest micro-batch not above `micro_batch` (memory per rank stays within what ran before)
    that divides each rank's share. No integer split: a SclabelError naming the world sizes that work."""
    if global_batch % world_size:
        fits = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
        raise SclabelError(
            f"the global batch of {global_batch} cells per optimizer step cannot be split over {world_size} "
            f"ranks; world sizes that keep it: {', '.join(map(str, fits))}"
        )
    per_rank = global_batch // world_size
    micro = max(m for m in range(1, min(micro_batch, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro
