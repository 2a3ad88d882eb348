"""Shared CLI plumbing: subcommand dispatch with user errors turned into one line and exit code 2."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from sclabel_dist.errors import SclabelError


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: Sequence[str] | None = None) -> int:
    """Run `prog COMMAND ...`: `commands` maps a name to ("module", "one-line help"); module.main(argv) runs it.

    Modules are imported only when their command runs, so `--help` and light commands stay fast.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        width = max(map(len, commands))
        lines = [f"usage: {prog} COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in commands.items()]
        print("\n".join(lines))
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in commands:
        print(f"{prog}: unknown command {name!r}; choose from {', '.join(commands)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(commands[name][0])
        return int(module.main(rest) or 0)
    except SclabelError as exc:
        print(f"{prog} {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {name}: interrupted", file=sys.stderr)
        return 130
