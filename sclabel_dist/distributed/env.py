"""The torchrun environment (rank, world size, restart count) read into one frozen value, and process setup."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; a plain run without torchrun is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    restart_count: int = 0
    under_torchrun: bool = False  # started by a torchrun agent (its workers carry TORCHELASTIC_RUN_ID)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return "MASTER_ADDR" in os.environ or self.world_size > 1


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Parse torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, TORCHELASTIC_RESTART_COUNT)."""
    env = os.environ if environ is None else environ
    return DistEnv(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
        under_torchrun="TORCHELASTIC_RUN_ID" in env,
    )


def device_type() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_process(env: DistEnv) -> str:
    """Pick the device for this rank and point DeepSpeed at the CPU accelerator when there is no GPU.

    Must run before deepspeed is imported: DeepSpeed picks its accelerator once, at import.
    Returns the torch device string for this rank.
    """
    kind = device_type()
    if kind == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # a single-process run still needs a rendezvous address for the (size-1) process group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        return "cpu"
    import torch

    torch.cuda.set_device(env.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    return f"cuda:{env.local_rank}"


def init_process_group(device: str, env: DistEnv, timeout_s: float = 1800.0) -> None:
    """torch.distributed over torchrun's store: gloo on CPU, nccl on CUDA.

    Under torchrun every restart attempt talks to the same agent-hosted TCPStore, and (torch 2.13) the
    process group's keys are not namespaced per attempt: a restarted rank would read the dead ranks' old
    addresses and fail to connect. Prefixing the store with the restart count gives each attempt its own keys.
    """
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "gloo" if device == "cpu" else "nccl"
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, False, timeout=timeout
        )
        store = dist.PrefixStore(f"/sclabel/attempt_{env.restart_count}", store)
        dist.init_process_group(
            backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
        )
    else:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
