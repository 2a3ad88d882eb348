"""Elastic torchrun: two agents (`--nnodes=1:2`, one process each, c10d on 127.0.0.1); one agent is SIGKILLed
mid-run, the other re-rendezvous alone, resumes the newest complete checkpoint on world 1 (converted from the
2-rank ZeRO checkpoint), keeps 32 cells per step and finishes: every step's loss is the uninterrupted 2-rank
run's (data.elastic), and the epoch's cells are consumed exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._helpers import RUNNER, base_env, free_port, read_metrics, torchrun
from .test_pretrain_dist import TINY, check_sample_accounting, data_args

STEPS, EVERY = 16, 4


def agent(port: int, host: bool, overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    """One torchrun agent of an elastic 1-to-2-node job with one process. The first (host) serves the c10d
    store: it is the node that stays; short rendezvous timeouts so that the survivor does not wait 30 s."""
    conf = f"is_host={int(host)},last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=120"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1:2",
        "--nproc_per_node=1",
        "--max-restarts=3",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=elastic-test",
        f"--rdzv-conf={conf}",
        str(RUNNER),
        *overrides,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def logged_steps(log_dir: Path) -> list[int]:
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line being written
            steps.append(json.loads(line)["step"])
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_survivor_of_a_killed_agent_resumes_alone_and_finishes(run_dirs, tiny_store, zero):
    extra, env = data_args(tiny_store)
    common = [
        *TINY,
        *extra,
        "--data.batch_size=16",
        "--data.elastic=true",
        "--model.contrastive=0",
        "--train.lr=3e-3",
        f"--train.zero_stage={zero}",
        f"--train.max_steps={STEPS}",
        f"--checkpoint.every={EVERY}",
    ]
    ref_root, ref_dirs = run_dirs(f"ref{zero}")
    torchrun([*common, *ref_dirs])
    ref = {r["step"]: r for r in read_metrics(ref_root / "logs")}

    root, dirs = run_dirs(f"agents{zero}")
    port = free_port()
    run_env = base_env(**env, SCLABEL_TEST_STEP_SLEEP="0.4")  # the first attempt: slow enough to kill mid-run
    survivor = agent(port, True, [*common, *dirs], run_env)
    wait_until(lambda: listening(port) or survivor.poll() is not None, 60, "the c10d store")
    lost = agent(port, False, [*common, *dirs], run_env)
    try:
        # past the first checkpoint, well before the end: the loss of a node between checkpoints
        wait_until(
            lambda: max(logged_steps(root / "logs"), default=0) >= EVERY + 2 or survivor.poll() is not None,
            180,
            f"step {EVERY + 2}",
        )
        os.kill(lost.pid, signal.SIGKILL)  # the agent; its worker dies with it (die_with_parent)
        out = survivor.communicate(timeout=300)[0]
    finally:
        for p in (survivor, lost):
            if p.poll() is None:
                p.kill()
        lost.communicate()
    assert survivor.returncode == 0, out[-5000:]
    # (the first attempt's banner comes from whichever agent's worker was rank 0; the second is the survivor's)
    assert "world 1, ZeRO" in out and "world size 2 -> 1: keeping 32 cells per step" in out, out[-5000:]
    assert 2 in {r["loader"]["world_size"] for r in read_metrics(root / "logs")}  # it did start on 2 ranks
    resumed_at = int(out.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert EVERY <= resumed_at < STEPS and resumed_at % EVERY == 0, resumed_at

    records = read_metrics(root / "logs")
    # the survivor's attempt logged every step from the checkpoint on
    assert [r["step"] for r in records][resumed_at - STEPS :] == list(range(resumed_at + 1, STEPS + 1))
    last = {r["step"]: r for r in records}  # the replayed steps' later records win
    assert sorted(last) == list(range(1, STEPS + 1))
    # one global batch per step across the world change: no cell skipped or repeated
    check_sample_accounting([last[s] for s in range(1, STEPS + 1)], 32)
    assert last[STEPS]["loader"] == {**ref[STEPS]["loader"], "world_size": 1}
    # the survivor's steps are the uninterrupted 2-rank run's; a fresh model's loss is far from them
    deltas = [abs(last[s]["loss"] - ref[s]["loss"]) for s in range(resumed_at + 1, STEPS + 1)]
    print(f"ZeRO {zero}, agent lost after step {resumed_at}+: max |dloss| {max(deltas):.3g} (2 -> 1 rank)")
    assert ref[1]["loss"] - ref[STEPS]["loss"] > 0.1
    assert max(deltas) < 1e-5, deltas
