"""Test harness run under torchrun: `sclabel_dist.pretrain` plus test-only instrumentation, never used in production.

SCLABEL_TEST_PROBE=PATH    after the final checkpoint, run the live engine on a fixed probe batch and write
                           its outputs to PATH (safetensors) so the export test can compare a bundle with it
SCLABEL_TEST_KILL_AT_STEP=k  rank 1 SIGKILLs itself after step k on the first attempt (pretrain's after_step hook)
SCLABEL_TEST_STEP_SLEEP=s  sleep s seconds after each step of the first attempt (so a test can kill an agent
                           mid-run, between checkpoints, however fast the machine is)
"""

from __future__ import annotations

import os


def probe_batch(vocab_size: int, num_bins: int, continuous: bool = False):
    """A fixed batch of 3 cells of different lengths (so padding is exercised)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    n = 24
    ids = torch.randint(2, vocab_size, (3, n), generator=g)
    vals = torch.randint(1, num_bins + 1, (3, n), generator=g)
    vals = vals.float() if continuous else vals
    am = torch.arange(n)[None] < torch.tensor([[n], [n // 2], [5]])
    ids[:, 0], vals[:, 0] = 1, 0
    # the gene bag: each cell's token genes plus 8 genes beyond its tokens, with positive log-values
    lengths = am.sum(1) - 1
    bag_ids = torch.cat(
        [
            torch.cat([ids[i, 1 : 1 + lengths[i]], torch.randint(2, vocab_size, (8,), generator=g)])
            for i in range(3)
        ]
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths + 8, 0)[:-1]])
    weights = torch.rand(len(bag_ids), generator=g) * 3
    return ids.masked_fill(~am, 0), vals.masked_fill(~am, 0), am, (bag_ids, offsets, weights)


def install_probe(path: str) -> None:
    import torch
    from safetensors.torch import save_file

    import sclabel_dist.pretrain as pretrain

    original = pretrain.save_checkpoint

    def save_and_probe(engine, root, step, state, vocab, rank, keep):
        out = original(engine, root, step, state, vocab, rank, keep)
        if step == state["config"]["train"]["max_steps"]:
            args = state["model_args"]
            ids, vals, am, bag = probe_batch(
                args["vocab_size"], args["num_bins"], args["value_encoding"] == "continuous"
            )
            engine.eval()
            with torch.no_grad():  # every rank runs it: under ZeRO-3 the forward gathers shards collectively
                res = engine(ids, vals, am, bag=bag)
            engine.train()
            if rank == 0:
                save_file(
                    {"cell": res.cell_embedding.float().contiguous(), "mlm": res.mlm.float().contiguous()},
                    path,
                )
        return out

    pretrain.save_checkpoint = save_and_probe


def kill_at_step(kill_at: int):
    """An after_step hook: rank 1 (rank 0 alone) SIGKILLs itself after step `kill_at`, on the first attempt only."""
    import signal

    from sclabel_dist.distributed.env import read_dist_env

    env = read_dist_env()

    def after_step(step: int) -> None:
        if step == kill_at and env.rank == min(1, env.world_size - 1) and env.restart_count == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    return after_step


def sleep_each_step(seconds: float):
    """An after_step hook: every rank sleeps `seconds` after each step, on the first attempt only."""
    import time

    from sclabel_dist.distributed.env import read_dist_env

    env = read_dist_env()

    def after_step(step: int) -> None:
        if env.restart_count == 0:
            time.sleep(seconds)

    return after_step


if __name__ == "__main__":
    if os.environ.get("SCLABEL_TEST_PROBE"):
        install_probe(os.environ["SCLABEL_TEST_PROBE"])
    kill_at = int(os.environ.get("SCLABEL_TEST_KILL_AT_STEP", "0"))
    sleep = float(os.environ.get("SCLABEL_TEST_STEP_SLEEP", "0"))
    from sclabel_dist.pretrain import cli

    hook = kill_at_step(kill_at) if kill_at else sleep_each_step(sleep) if sleep else None
    raise SystemExit(
        cli(after_step=hook)
    )  # as `-m sclabel_dist.pretrain`: a user error is one line and exit 2
