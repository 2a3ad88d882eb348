"""sha256 checksums of files, directory trees and `sha256sum -c` compatible SHA256SUMS files (bundles, checkpoints, store shards)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from sclabel_dist.errors import SclabelError

SUMS = "SHA256SUMS"
_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of one file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """Hex sha256 over a directory's files: sorted relative POSIX paths and their bytes (a store shard's checksum)."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(_BLOCK), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def format_sums(sums: Mapping[str, str]) -> str:
    """SHA256SUMS text: `<hex>  <name>` a line, in the order given."""
    return "".join(f"{digest}  {name}\n" for name, digest in sums.items())


def read_sums(directory: str | Path) -> dict[str, str]:
    """{name: hex} from DIRECTORY/SHA256SUMS; SclabelError naming the file (and line) when absent or malformed."""
    sums_file = Path(directory) / SUMS
    if not sums_file.is_file():
        raise SclabelError(f"{directory}: not a sclabel bundle (no {SUMS})")
    sums: dict[str, str] = {}
    for n, line in enumerate(sums_file.read_text().splitlines(), 1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise SclabelError(f"{sums_file}:{n}: malformed checksum line")
        sums[parts[1].lstrip("*")] = parts[0]
    return sums


def mismatched(directory: str | Path, sums: Mapping[str, str], names: list[str], why: str) -> list[str]:
    """For each of `names`: a problem line when the file is missing or does not hash to `sums` (`why` says
    what that means to the reader); [] when all are intact."""
    directory = Path(directory)
    problems = []
    for name in names:
        file = directory / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif sha256_file(file) != sums[name]:
            problems.append(f"{file}: checksum mismatch ({why})")
    return problems
