"""Convert a ZeRO checkpoint to DeepSpeed's universal format once, beside it, so another world size can load it.

    step_00001000/universal/   ds_to_universal's output, its own SHA256SUMS, COMPLETE (written last)
The conversion runs in a temp directory that is renamed to `universal/` only when complete, so a conversion
killed half way leaves nothing that resume or export would pick up (the temp directory is removed by the
next conversion). It lives inside its step, so rotating the step removes it too.
`sclabel convert-checkpoint CKPT` does the same by hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from sclabel_dist.atomic import replaced_on_success, write_text_atomic
from sclabel_dist.checkpoint import (
    COMPLETE,
    UNIVERSAL,
    is_complete,
    verify_checkpoint,
    write_checksums,
)
from sclabel_dist.errors import SclabelError


def universal_dir(step_dir: str | Path) -> Path:
    return Path(step_dir) / UNIVERSAL


def convert_to_universal(step_dir: str | Path) -> Path:
    """The verified universal copy of complete checkpoint `step_dir`, converting it first if there is none.

    Single process (rank 0 alone under torchrun; the others wait). DeepSpeed's converter unpickles the shards,
    so it runs under weights_only_loads like every other checkpoint read.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported, when there is no GPU
    from sclabel_dist.distributed.engine import convert_universal

    step_dir = Path(step_dir)
    out = universal_dir(step_dir)
    if is_complete(out):
        problems = verify_checkpoint(out)
        if not problems:
            return out
        shutil.rmtree(out)  # a corrupt cache is rebuilt from the verified shards
    elif out.exists():
        shutil.rmtree(out)  # not ours to trust: only a renamed, complete conversion counts
    for stale in step_dir.glob(f".{UNIVERSAL}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)  # the remains of a killed conversion
    with replaced_on_success(out) as tmp:
        convert_universal(step_dir, tmp)
        write_checksums(tmp, rank=0, world=1)
        write_text_atomic(tmp / COMPLETE, f"{step_dir.name}\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sclabel convert-checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", help="a step_XXXXXXXX directory, or a checkpoint root (newest complete)"
    )
    args = parser.parse_args(argv)
    from sclabel_dist.export import resolve_checkpoint

    step_dir = resolve_checkpoint(args.checkpoint)
    if not step_dir.is_dir():
        raise SclabelError(f"{step_dir}: checkpoint directory not found")
    t0 = time.perf_counter()
    out = convert_to_universal(step_dir)
    print(f"sclabel convert-checkpoint: {out} ({time.perf_counter() - t0:.1f}s)")
    return 0
