"""Config overrides and metrics files: bad values give one clear line, and metrics.jsonl stays JSON (issue 19, item 9)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sclabel_dist.config import LogConfig, apply_overrides
from sclabel_dist.errors import SclabelError
from sclabel_dist.metrics import MetricsLogger


@pytest.mark.parametrize("value", ["!!python/object/apply:os.system [echo hi]", "!custom 3", "[1, 2"])
def test_override_with_a_yaml_tag_or_bad_yaml_is_one_clear_error(value: str) -> None:
    with pytest.raises(SclabelError, match=r"override 'train\.lr=.*': the value is not plain YAML"):
        apply_overrides({}, [f"train.lr={value}"])


def test_metrics_jsonl_holds_no_bare_nan(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, True, max_steps=3, start_step=0, log_cfg=LogConfig(tensorboard=False))
    logger.log(1, {"loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "loader": {"wait": -math.inf}})
    logger.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics.jsonl"))
    assert record["loss"] is None and record["grad_norm"] is None and record["loader"] == {"wait": None}
    assert record["lr"] == 1e-3
