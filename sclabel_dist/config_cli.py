"""The command line of a config tree: one `--section.key` option per field, shown by --help with its default and
doc, shared by pretrain, finetune and evaluate (each adds only its own flags)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from sclabel_dist.config import load_config

T = TypeVar("T")
_PREFIX = "config:"  # argparse dest of a config option: never clashes with a command's own flags


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "{" + ",".join(str(c) for c in typing.get_args(hint)) + "}"
    return getattr(hint, "__name__", str(hint)).upper()


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add `--section.key VALUE` (or `=VALUE`; values are YAML) for every field of config tree `cls`, one
    argument group per section whose help lists each field's doc and default."""
    parser.add_argument(
        "--config", default=None, help=f"YAML file of {cls.__name__} (then the options below)"
    )
    for section in dataclasses.fields(cls):
        section_cls = typing.get_type_hints(cls)[section.name]
        hints = typing.get_type_hints(section_cls)
        defaults = section_cls()
        title = (section_cls.__doc__ or "").strip().splitlines()[0].rstrip(".")
        group = parser.add_argument_group(f"--{section.name}.* ({title})")
        for f in dataclasses.fields(section_cls):
            text = f"{f.metadata.get('doc', '')} (default: {getattr(defaults, f.name)!r})"
            group.add_argument(
                f"--{section.name}.{f.name}",
                dest=f"{_PREFIX}{section.name}.{f.name}",
                metavar=_type_name(hints[f.name]),
                default=argparse.SUPPRESS,
                help=text.replace("%", "%%"),
            )


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The `section.key=value` overrides given on the command line, in the order given."""
    return [f"{k[len(_PREFIX) :]}={v}" for k, v in vars(args).items() if k.startswith(_PREFIX)]


def load_from_args(cls: type[T], args: argparse.Namespace, extra: Sequence[str] = ()) -> T:
    """The config tree of a parsed command line: --config, then its options, then `extra` (a command's own
    flags turned into overrides); validated by load_config."""
    return load_config(cls, args.config, [*config_overrides(args), *extra])
