"""The rank-0 metrics logger and throughput arithmetic."""

from __future__ import annotations

import json

from sclabel_dist.config import LogConfig
from sclabel_dist.metrics import MetricsLogger, StepTimer


def test_logger_writes_jsonl_and_tensorboard(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, True, max_steps=10, start_step=0, log_cfg=LogConfig())
    logger.log(1, {"loss": 2.5, "loader": {"epoch": 0}})
    logger.log(1, {"loss": 2.0}, prefix="val")
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["loss"]) for r in records] == [("train", 2.5), ("val", 2.0)]
    assert records[0]["loader"] == {"epoch": 0}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "train step 1: loss 2.5" in capsys.readouterr().out
    MetricsLogger(tmp_path / "other", False, 10, 0, LogConfig()).log(1, {"loss": 1.0})  # non-zero rank: no-op
    assert not (tmp_path / "other").exists()


def test_step_timer_rates():
    timer = StepTimer()
    timer.start -= 2.0  # pretend 2 s passed
    timer.cells, timer.tokens, timer.steps, timer.data_wait = 10, 1000, 4, 0.5
    rates = timer.rates(world_size=2, flops_per_token=1e6, peak=1e12)
    assert abs(rates["tokens_per_s"] - 1000.0) < 5 and abs(rates["cells_per_s"] - 10.0) < 0.1
    assert abs(rates["data_wait_frac"] - 0.25) < 0.01 and abs(rates["step_time_s"] - 0.5) < 0.01
    assert abs(rates["mfu"] - 1000.0 * 1e6 / 2e12) < 1e-5
    assert "mfu" not in StepTimer().rates(1, 1e6, None)
