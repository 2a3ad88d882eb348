"""Pure pieces of the training setup: DeepSpeed config, LR schedule, torchrun env, CLI overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sclabel_dist.config import PretrainConfig, TrainConfig, load_config
from sclabel_dist.distributed.ds_config import build_deepspeed_config
from sclabel_dist.distributed.env import read_dist_env
from sclabel_dist.errors import SclabelError
from sclabel_dist.optim import warmup_cosine

ROOT = Path(__file__).resolve().parents[2]


def test_deepspeed_config_from_train_config():
    tc = TrainConfig(zero_stage=3, precision="bf16", grad_accum=4, grad_clip=0.5)
    cfg = build_deepspeed_config(tc, micro_batch_size=8, world_size=16, device_type="cuda")
    assert cfg["train_batch_size"] == 8 * 4 * 16
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"] == {"enabled": True}
    assert cfg["gradient_clipping"] == 0.5
    assert "optimizer" not in cfg and "scheduler" not in cfg
    json.dumps(cfg)  # DeepSpeed takes it as JSON


def test_presets_merge_under_run_values_and_cpu_drops_offload():
    for stage in (1, 2, 3):
        preset = json.loads((ROOT / f"configs/deepspeed/zero{stage}.json").read_text())
        cfg = build_deepspeed_config(TrainConfig(zero_stage=stage), 4, 2, "cuda", preset)
        assert cfg["zero_optimization"]["stage"] == stage
    preset = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "optimizer": {"type": "Adam"}}
    cfg = build_deepspeed_config(TrainConfig(zero_stage=3), 4, 2, "cpu", preset)
    assert "offload_optimizer" not in cfg["zero_optimization"] and "optimizer" not in cfg
    with pytest.raises(SclabelError, match="zero_stage"):
        build_deepspeed_config(TrainConfig(zero_stage=4), 4, 2)
    with pytest.raises(SclabelError, match="precision"):
        build_deepspeed_config(TrainConfig(precision="fp16"), 4, 2)


def test_warmup_cosine():
    lrs = [warmup_cosine(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_dist_env_and_overrides():
    env = read_dist_env(
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "TORCHELASTIC_RESTART_COUNT": "1"}
    )
    assert (env.rank, env.local_rank, env.world_size, env.restart_count) == (3, 1, 4, 1)
    assert read_dist_env({}).world_size == 1


@pytest.mark.parametrize("name", ["debug", "lung_100k", "atlas", "shared_sets"])
def test_shipped_configs_load(name):
    cfg = load_config(PretrainConfig, ROOT / f"configs/pretrain/{name}.yaml")
    if cfg.train.deepspeed:
        assert (ROOT / cfg.train.deepspeed).is_file()


def test_finetune_yaml_is_the_built_in_default():
    """`sclabel finetune` without --config must run the configuration configs/finetune/default.yaml documents."""
    from sclabel_dist.config import FinetuneConfig

    assert load_config(FinetuneConfig, ROOT / "configs/finetune/default.yaml") == FinetuneConfig()
