"""The `sclabel-data` command (also `python -m data_tools`): ingest, synth, to-soma, inspect, validate,
compile-kernels."""

from __future__ import annotations

from collections.abc import Sequence

from sclabel_dist.cli_common import dispatch

COMMANDS = {
    "ingest": ("data_tools.ingest", "write .h5ad / 10x / SOMA input into a sharded Zarr cell store"),
    "commit": ("data_tools.ingest_commit", "check the parts of a planned ingest and commit its index"),
    "synth": ("data_tools.synth", "generate a seeded synthetic atlas into a store or .h5ad"),
    "to-soma": ("data_tools.to_soma", "convert an .h5ad or a cell store into a TileDB-SOMA experiment"),
    "inspect": ("data_tools.inspect", "summarise a cell store"),
    "validate": ("data_tools.validate", "verify a cell store's checksums and index"),
    "compile-kernels": (
        "sclabel_dist.data.kernel_warmup",
        "compile the loader's kernels once after an install (~20-40 s; cached for every later process)",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch("sclabel-data", COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
