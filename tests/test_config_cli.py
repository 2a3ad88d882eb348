"""The config tree owns validation and the command line (issue 17): Literal choices, validate() per section,
one parser for pretrain / finetune / evaluate whose --help shows every field with its default and doc."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from sclabel_dist.config import (
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    TokenizeConfig,
    TrainConfig,
    load_config,
)
from sclabel_dist.errors import SclabelError
from sclabel_dist.model.args import FLAVOURS


def _fields(cls: type) -> list[tuple[str, dataclasses.Field, object]]:
    out = []
    for section in dataclasses.fields(cls):
        section_cls = typing.get_type_hints(cls)[section.name]
        for f in dataclasses.fields(section_cls):
            out.append((f"--{section.name}.{f.name}", f, getattr(section_cls(), f.name)))
    return out


@pytest.mark.parametrize(
    ("module", "cls"),
    [
        ("sclabel_dist.pretrain", PretrainConfig),
        ("sclabel_dist.finetune", FinetuneConfig),
        ("sclabel_dist.evaluate", FinetuneConfig),
    ],
)
def test_help_shows_every_field_with_its_default_and_doc(module: str, cls: type) -> None:
    import importlib

    text = importlib.import_module(module).build_parser().format_help()
    packed = "".join(text.split())  # help is wrapped at any space (and after hyphens)
    for flag, f, default in _fields(cls):
        assert flag in text
        assert "".join(f.metadata["doc"].split()) in packed, flag
        assert "".join(f"(default: {default!r})".split()) in packed, flag


def test_both_override_forms_and_the_order_given() -> None:
    from sclabel_dist.pretrain import parse_args

    cfg = parse_args(["--train.max_steps=5", "--checkpoint.resume", "never", "--train.max_steps", "7"])
    assert (cfg.train.max_steps, cfg.checkpoint.resume) == (7, "never")


@pytest.mark.parametrize("argv", [["stray"], ["--train.max_step=5"], ["--nope.x=1"]])
def test_unknown_or_abbreviated_options_are_refused(argv: list[str]) -> None:
    from sclabel_dist.pretrain import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("override", "what"),
    [
        ("train.zero_stage=4", "train.zero_stage=4: choose from [0, 1, 2, 3]"),
        ("train.precision=fp16", "train.precision='fp16': choose from"),
        ("model.flavour=huge", "model.flavour='huge': choose from"),
        ("tokenize.mask_ratio=1.5", "tokenize.mask_ratio=1.5: must be in [0, 1)"),
        ("tokenize.max_len=1", "tokenize.max_len=1"),
        ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
        ("data.weights=[1, 2]", "data.weights has 2 entries for 0 stores"),
    ],
)
def test_load_config_validates_every_section(override: str, what: str) -> None:
    with pytest.raises(SclabelError) as exc:
        load_config(PretrainConfig, None, [override])
    assert what in str(exc.value)


@pytest.mark.parametrize(
    ("override", "what"),
    [
        ("data.genes=markers", "data.genes='markers': choose from"),
        ("train.dropout=1.0", "train.dropout=1.0: must be in [0, 1)"),
        ("upsample.target=lots", "upsample.target='lots'"),
        ("data.train_gene_selection=best", "data.train_gene_selection='best'"),
    ],
)
def test_finetune_config_validates_too(override: str, what: str) -> None:
    with pytest.raises(SclabelError) as exc:
        load_config(FinetuneConfig, None, [override])
    assert what in str(exc.value)


def test_sections_built_in_code_are_checked_where_they_are_used() -> None:
    from sclabel_dist.distributed.ds_config import build_deepspeed_config

    with pytest.raises(SclabelError, match="zero_stage"):
        build_deepspeed_config(TrainConfig(zero_stage=4), 4, 2)  # type: ignore[arg-type]
    with pytest.raises(SclabelError, match="mask_ratio"):
        TokenizeConfig(mask_ratio=2.0).validate()


def test_flavour_choices_are_the_flavour_table() -> None:
    hint = typing.get_type_hints(ModelConfig)["flavour"]
    assert set(typing.get_args(hint)) == set(FLAVOURS)


def test_defaults_and_shipped_values_pass() -> None:
    assert load_config(PretrainConfig, None, []) == PretrainConfig()
    assert load_config(FinetuneConfig, None, ["upsample.target=500"]).upsample.target == "500"
