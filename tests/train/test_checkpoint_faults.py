"""Checkpoint faults under torchrun (real DeepSpeed, gloo): a crafted pickle runs no code, a corrupt newest
checkpoint is skipped, a killed agent takes its workers along, one run per directory, and a full disk."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from sclabel_dist.checkpoint import checkpoint_tag, verify_checkpoint, write_checksums

from ._helpers import RUNNER, base_env, free_port, losses_by_step, read_metrics, torchrun
from .test_pretrain_dist import TINY, data_args
from .test_safe_load_and_lock import write_payload


def torchrun_cmd(overrides: list[str], nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master-port={free_port()}",
        str(RUNNER),
        *overrides,
    ]


def export(src, out) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sclabel_dist.cli", "export", str(src), str(out)],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_crafted_checkpoint_runs_no_code_on_resume_or_export(tmp_path, run_dirs, tiny_store):
    root, dirs = run_dirs("evil")
    extra, _ = data_args(tiny_store)
    common = [*TINY, *dirs, *extra, "--train.zero_stage=1", "--checkpoint.every=2"]
    torchrun([*common, "--train.max_steps=2"])
    step = root / "ckpt" / checkpoint_tag(2)
    shard = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    real = torch.load(shard, map_location="cpu", weights_only=False)  # our own file, just written
    marker = tmp_path / "pwned"
    write_payload(shard, marker, real)
    write_checksums(step, rank=0, world=1)  # whoever crafts a checkpoint rewrites its checksums too

    proc = export(step, tmp_path / "bundle")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sclabel export: error:")]
    assert len(errors) == 1 and "refusing to load" in errors[0] and str(shard) in errors[0], proc.stderr
    assert not marker.exists() and not (tmp_path / "bundle").exists()

    proc = torchrun([*common, "--train.max_steps=4"], check=False)
    assert proc.returncode != 0
    assert "sclabel_dist.pretrain: error:" in proc.stderr and "refusing to load" in proc.stderr
    assert not marker.exists()


@pytest.mark.slow  # ~20-30 s of two-rank runs: CI runs it with the slow tests
def test_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, run_dirs, tiny_store):
    root, dirs = run_dirs("corrupt")
    extra, _ = data_args(tiny_store)
    common = [*TINY, *dirs, *extra, "--train.zero_stage=2", "--checkpoint.every=2", "--checkpoint.keep=2"]
    torchrun([*common, "--train.max_steps=4"])
    ref = losses_by_step(read_metrics(root / "logs"))
    newest, previous = root / "ckpt" / checkpoint_tag(4), root / "ckpt" / checkpoint_tag(2)
    shard = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit inside a tensor: torch would load it without complaint
    shard.write_bytes(bytes(data))

    proc = export(newest, tmp_path / "bundle")
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr and str(shard) in proc.stderr

    proc = torchrun([*common, "--train.max_steps=5"])
    assert f"skipping {newest}: {shard}: checksum mismatch" in proc.stderr, proc.stderr[-3000:]
    assert f"resuming from {previous} instead" in proc.stderr
    records = read_metrics(root / "logs")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4, 5]
    for r in records[4:6]:  # the replayed steps are the same steps: the previous checkpoint was intact
        assert r["loss"] == pytest.approx(ref[r["step"]], abs=1e-6, rel=0)


def wait_for_steps(log_dir, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        file = log_dir / "metrics.jsonl"
        if file.is_file() and len(file.read_text().splitlines()) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"no {n} logged steps in {log_dir} after {timeout}s")


@pytest.mark.slow  # ~20-30 s of two-rank runs: CI runs it with the slow tests
def test_killed_agent_takes_its_workers_and_a_second_run_is_refused(run_dirs, tiny_store):
    root, dirs = run_dirs("locked")
    extra, _ = data_args(tiny_store)
    common = [*TINY, *dirs, *extra, "--train.zero_stage=2", "--checkpoint.every=10"]
    agent = subprocess.Popen(
        torchrun_cmd([*common, "--train.max_steps=100000"]),
        env=base_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[psutil.Process] = []
    try:
        wait_for_steps(root / "logs", 3)
        workers = psutil.Process(agent.pid).children()
        assert len(workers) == 2
        rank0 = next(w for w in workers if w.environ().get("RANK") == "0")

        # a second run into the same directory: refused in one line naming the first run's rank 0
        second = torchrun([*common, "--train.max_steps=3"], check=False, timeout=180)
        assert second.returncode != 0
        errors = [line for line in second.stderr.splitlines() if "sclabel_dist.pretrain: error:" in line]
        assert errors, second.stderr[-3000:]
        assert f"in use by another run (host {socket.gethostname()} pid {rank0.pid} since" in errors[0]
        assert rank0.is_running()

        # SIGKILL of the agent: its workers go with it, within seconds
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert alive == [], [p.pid for p in alive]
    finally:
        for proc in workers:
            if proc.is_running():
                proc.kill()
        agent.kill()
        agent.wait()
    # and the lock went with them: the next run starts
    torchrun([*common, "--train.max_steps=1", "--checkpoint.resume=never"], timeout=180)


def can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(
    not can_mount_tmpfs(), reason="needs `unshare -rm` (user namespaces) to mount a small tmpfs"
)
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, run_dirs, tiny_store
):
    root, dirs = run_dirs("full")
    extra, _ = data_args(tiny_store)
    ckpt, kept = root / "ckpt", tmp_path / "kept"
    ckpt.mkdir(parents=True)
    # a ZeRO-1 checkpoint of this model takes ~650 kB: the second save runs out of space half-way
    cmd = torchrun_cmd(
        [*TINY, *dirs, *extra, "--train.zero_stage=1", "--train.max_steps=4", "--checkpoint.every=2"]
    )
    script = (
        f"mount -t tmpfs -o size=1000k tmpfs {shlex.quote(str(ckpt))} && {shlex.join(cmd)}; rc=$?; "
        f"cp -a {shlex.quote(str(ckpt))} {shlex.quote(str(kept))}; exit $rc"  # the mount ends with the namespace
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], env=base_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "sclabel_dist.pretrain: error:" in line]
    # The ranks agree on the failure and each raises the same line, but torchrun's agent stops the other
    # worker as soon as one exits non-zero, so the second line is not always printed before it is killed.
    assert errors and len(set(errors)) == 1, proc.stderr[-3000:]
    assert f"checkpoint step_00000004 was not saved: {ckpt / checkpoint_tag(4)}/" in errors[0]
    assert "no space left on device" in errors[0]
    assert "inline_container" not in proc.stderr  # no raw torch traceback from the workers
    assert (kept / "latest").read_text() == checkpoint_tag(2)
    assert not (kept / checkpoint_tag(4)).exists()  # the partial step was removed, freeing its space
    assert verify_checkpoint(kept / checkpoint_tag(2)) == []
