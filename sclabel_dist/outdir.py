"""Output directories of the commands (finetune, evaluate, quickstart): created with a marker, and --overwrite
deletes only what a sclabel run wrote there, never a directory the project did not create.

Why a marker: a run directory cannot be recognised by its contents (a user's folder may well hold a `model/`),
so `--overwrite` once deleted a user's whole directory. The marker `.sclabel-run.json` is written when the
directory is created, and the entries the run wrote are recorded in it when the process exits (also after an
error; after a SIGKILL the list stays empty and every entry but the marker counts as the dead run's). Files a
user later puts beside them are kept.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import sys
from pathlib import Path

from sclabel_dist.atomic import write_json_atomic
from sclabel_dist.errors import SclabelError

MARKER = ".sclabel-run.json"


def _marker(out: Path) -> dict | None:
    try:
        raw = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) and raw.get("tool") == "sclabel" else None


def _ours(out: Path, marker: dict) -> list[Path]:
    """The entries of `out` a sclabel run wrote: those recorded, or all but the marker when none were."""
    written = marker.get("written")
    if written is None:  # the run was killed before it could record them
        kept = set(marker.get("kept") or ())
        return [p for p in out.iterdir() if p.name != MARKER and p.name not in kept]
    return [out / name for name in written if (out / name).exists() or (out / name).is_symlink()]


def prepare_out_dir(out: Path, overwrite: bool, *, create: bool = True) -> None:
    """Refuse an existing non-empty `out` unless --overwrite and a sclabel run created it; with create, delete
    that run's entries, then create `out` with a fresh marker whose entries are recorded at exit.

    Called with create=False first (a check before slow work) and create=True once the inputs have passed.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise SclabelError(f"{out}: output exists; pass --overwrite to replace it")
        marker = _marker(out) if out.is_dir() else None
        if marker is None:
            raise SclabelError(
                f"{out}: exists and is not a sclabel run directory (no {MARKER}); refusing to delete "
                "anything in it: choose another --out"
            )
        if create:
            for p in _ours(out, marker):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if create:
        out.mkdir(parents=True, exist_ok=True)
        kept = sorted(p.name for p in out.iterdir() if p.name != MARKER)
        write_json_atomic(out / MARKER, {"tool": "sclabel", "argv": sys.argv, "kept": kept, "written": None})
        atexit.register(_record_written, out, set(kept))


def _record_written(out: Path, kept: set[str]) -> None:
    """At exit: the entries that appeared in `out` during this run are the ones a later --overwrite may delete."""
    marker = _marker(out)
    if marker is None:
        return
    marker["written"] = sorted(p.name for p in out.iterdir() if p.name != MARKER and p.name not in kept)
    # A full disk at exit leaves "written": null, which still names only what appeared in this directory.
    with contextlib.suppress(OSError):
        write_json_atomic(out / MARKER, marker)
