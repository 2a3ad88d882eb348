"""No code from a checkpoint file, and one run per checkpoint directory: the pieces alone, without torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sclabel_dist.distributed.run_lock import LOCK_FILE, hold_run_lock
from sclabel_dist.distributed.safe_load import weights_only_loads
from sclabel_dist.errors import SclabelError


class Payload:
    """Unpickling this calls open(marker, 'w'): proof that code ran if the marker file appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(file: Path, marker: Path, real: dict | None = None) -> None:
    """A checkpoint file whose pickle calls open(marker, 'w') when loaded with weights_only=False."""
    torch.save({**(real or {}), "optimizer_state_dict": Payload(marker)}, file)


def test_weights_only_loads_refuses_a_code_payload(tmp_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    evil, marker = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "pwned"
    write_payload(evil, marker)
    original = torch.load
    with weights_only_loads(), pytest.raises(SclabelError, match="refusing to load") as err:
        torch.load(evil, map_location="cpu", weights_only=False)  # what DeepSpeed asks for
    assert str(evil) in str(err.value)
    assert not marker.exists()
    assert torch.load is original  # restored after the block
    # what DeepSpeed really stores still loads: tensors, plain values and its value classes
    plain = tmp_path / "plain.pt"
    value = {"w": torch.ones(2), "stage": ZeroStageEnum(2), "addr": fragment_address(4, 0), "n": [1, 2.0]}
    torch.save(value, plain)
    with weights_only_loads():
        loaded = torch.load(plain, weights_only=False)
    assert loaded["stage"] == ZeroStageEnum(2) and loaded["addr"] == fragment_address(4, 0)
    torch.testing.assert_close(loaded["w"], torch.ones(2))


def test_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    root = tmp_path / "ckpt"
    code = "import sys, time; from sclabel_dist.distributed.run_lock import hold_run_lock as h; h(sys.argv[1]); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(SclabelError, match=rf"in use by another run \(host \S+ pid {holder.pid} since"):
            hold_run_lock(root, wait_s=0.5)
        assert time.monotonic() - t0 < 5
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    fd = hold_run_lock(root, wait_s=0.5)  # the kernel dropped the killed holder's lock
    assert f"pid {os.getpid()} " in (root / LOCK_FILE).read_text()
    os.close(fd)
