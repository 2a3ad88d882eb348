"""Two real processes under torchrun (gloo, CPU): equal batch counts per rank, the epoch covered once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_two_ranks_equal_batches_and_cover_epoch_once(store_a, tmp_path):
    path, _ = store_a
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("torchrun_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(worker), str(path), str(out)], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["batches"][0] == result["batches"][1] > 0
    assert sorted(result["ids"]) == list(range(470))
