"""The DeepSpeed engine: the only training module that imports deepspeed (init, engine, checkpoints, consolidation)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from sclabel_dist.distributed.env import DistEnv, init_process_group
from sclabel_dist.distributed.safe_load import weights_only_loads
from sclabel_dist.optim import build_lr_scheduler


def init_distributed(device: str, env: DistEnv) -> None:
    """Create the process group (see env.init_process_group for why we do it ourselves), then let DeepSpeed
    adopt it: deepspeed.init_distributed reuses an initialised torch.distributed."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_process_group(device.split(":")[0], env)
    if device == "cpu":
        skip_shm_comm_op()
    # DeepSpeed 0.19's ZeRO gathers call torch.distributed.all_gather_into_tensor, which torch 2.13 deprecates
    # for all_gather_single: a FutureWarning on every rank that names neither our code nor anything a user
    # can change. Only that message is silenced; DeepSpeed moving to the new call makes this a no-op.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
    )
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend on plain gloo instead of building its shared-memory comm op.

    DeepSpeed's torch backend compiles the `deepspeed_shm_comm` C++ op with ninja the first time a process
    group starts on the CPU accelerator (~140 s on 2 cores, again in every new environment), yet the op
    serves only `inference_all_reduce` (DeepSpeed inference / AutoTP): training's all_reduce, all_gather and
    reduce_scatter go to torch.distributed (gloo) with or without it (measured in benchmarks/RESULTS.md,
    "First run"). The backend builds the op only when `deepspeed.ops.__compatible_ops__` marks it usable,
    so marking it unusable is DeepSpeed's own switch for "no such op here".
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_optimizer(model: torch.nn.Module, train_cfg: Any, device: str) -> torch.optim.Optimizer:
    """torch AdamW; matrices decay, biases / norms / vectors do not (nanoGPT's split)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused kernels exist on CUDA only; foreach is the fast path on CPU
    fused = {"fused": True} if device.startswith("cuda") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(0.9, 0.95), eps=1e-8, **fused)


def build_engine(model: torch.nn.Module, train_cfg: Any, ds_config: dict[str, Any], device: str):
    """Wrap `model` in a DeepSpeed engine with AdamW and a warmup-cosine LambdaLR stepped once per optimizer step."""
    import deepspeed

    optimizer = build_optimizer(model, train_cfg, device)
    scheduler = build_lr_scheduler(
        optimizer,
        warmup_steps=train_cfg.warmup_steps,
        max_steps=train_cfg.max_steps,
        min_lr_ratio=train_cfg.min_lr_ratio,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


def save_checkpoint(
    engine, root: str | Path, tag: str, client_state: dict[str, Any]
) -> tuple[str, Exception] | None:
    """DeepSpeed shards for `tag` under `root`; all ranks must call. Our own `latest` is written by checkpoint.py.

    Returns the first failed write of this rank (file, exception), or None. A failed write is caught inside
    DeepSpeed's checkpoint engine rather than raised, so that this rank still reaches DeepSpeed's closing
    barrier and the ranks can agree on the failure afterwards (a rank raising alone would hang the others).
    """
    failed: list[tuple[str, Exception]] = []
    writer = engine.checkpoint_engine
    save_file = writer.save

    def save(state_dict: Any, path: str) -> None:
        if failed:
            return  # the filesystem already failed: write nothing more, the step is discarded anyway
        try:
            save_file(state_dict, path)
        except (OSError, RuntimeError) as exc:  # torch.save reports ENOSPC as a RuntimeError
            failed.append((path, exc))

    copy_script = getattr(engine, "_copy_recovery_script", None)

    def copy_recovery_script(save_path: str) -> None:
        try:
            copy_script(save_path)
        except OSError as exc:
            failed.append((save_path, exc))

    writer.save = save
    if copy_script is not None:
        engine._copy_recovery_script = copy_recovery_script
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    finally:
        del writer.save  # back to the class's method
        if copy_script is not None:
            del engine._copy_recovery_script
    return failed[0] if failed else None


def load_checkpoint(engine, root: str | Path, tag: str, universal: bool = False) -> dict[str, Any]:
    """Restore model, optimizer and scheduler of `tag`; returns the client state saved with it.

    Every file is unpickled with weights_only=True (safe_load.py): a crafted checkpoint cannot run code.
    `universal`: `tag` is a universal checkpoint (another world size). DeepSpeed reads that switch from the
    engine's config at load time; it is set for this load only, because a config that keeps it also changes
    how later saves are written (DeepSpeed #7546).
    """
    config = engine._config
    config.load_universal_checkpoint = universal
    groups = _group_hyperparameters(engine.optimizer)
    try:
        with weights_only_loads():
            path, client_state = engine.load_checkpoint(
                str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {root}")
    if universal and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal_load(_inner_optimizer(engine.optimizer), groups)
    return client_state or {}


def _repair_zero3_universal_load(optimizer: Any, groups: list[dict[str, Any]]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (stage3.load_hp_checkpoint_state_from_checkpoint_
    dir_stage3, deepspeed 0.19.8), each of which made a resumed run drift from the uninterrupted one:

    - every group's state gets the *same* `step` tensor object, and AdamW increments it in place once per
      group, so each group's bias correction runs ahead after the first resumed step (alone: |dloss| 1.4e-4
      after 8 steps, 2 -> 1 ranks); each state gets its own copy;
    - every group gets the saved *first* group's hyperparameters: our no-decay group (biases, norms) came back
      with the matrices' weight decay (alone: 1.7e-5); the groups' own values (the config's) are put back.
    With both undone the resumed losses equal the uninterrupted run's (tests/train/test_elastic_resume.py).
    """
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        group.update(saved)


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer that holds the param groups (a ZeRO wrapper keeps it as .optimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


def _group_hyperparameters(optimizer: Any) -> list[dict[str, Any]]:
    """Each param group's fixed hyperparameters (not its params, nor the LR that the scheduler moves)."""
    moving = {"params", "lr", "initial_lr"}
    return [{k: v for k, v in g.items() if k not in moving} for g in _inner_optimizer(optimizer).param_groups]


def convert_universal(step_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ds_to_universal of ZeRO 1-3 checkpoint `step_dir` into `out_dir` (serial: no worker pool).

    inject_missing_state: a plain (non-Megatron) model's ZeRO-1/2 checkpoint lacks the universal-checkpoint
    info that the converter asserts on; it is only a version marker, added in memory (the input is not edited).
    The converter also writes a `latest_universal` pointer beside `out_dir`, which here is inside the step
    directory: removed, or the step would no longer match its SHA256SUMS and a second resume from it would
    refuse it.
    """
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = Namespace(
        input_folder=str(step_dir),
        output_folder=str(out_dir),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    pointer = Path(out_dir).parent / "latest_universal"
    ours = not pointer.exists()
    try:
        with weights_only_loads():
            ds_to_universal(args)
    finally:
        if ours:
            pointer.unlink(missing_ok=True)


def consolidate_checkpoint(root: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a ZeRO 0-3 checkpoint, using DeepSpeed's own zero_to_fp32 for 2 and 3."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Path(root) / tag
    if _zero_stage(ckpt) > 0:
        with weights_only_loads():  # zero_to_fp32 unpickles with weights_only=False
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:  # ZeRO 0: full weights sit in the model-states file
        blob = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        state = blob["module"]
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def _zero_stage(ckpt: Path) -> int:
    files = sorted(ckpt.glob("*model_states.pt"))
    blob = torch.load(files[0], map_location="cpu", weights_only=True)
    return int((blob.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
