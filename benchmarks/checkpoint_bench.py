"""Checkpoint costs of a 2-rank run: size and save time, universal conversion time, resume time, |dloss| after
resuming on another world size. Uses the real pretraining under torchrun (CPU: gloo, DS_ACCELERATOR=cpu).

    python benchmarks/checkpoint_bench.py --store runs/data/synth.zarr --flavour small --out /tmp/ckbench
    python benchmarks/checkpoint_bench.py ... --elastic --worlds 2,1,4   # the world-size-invariant order
Prints one JSON line per measurement (the figures in benchmarks/RESULTS.md). --elastic runs every pass with
data.elastic=true and model.contrastive=0 (the MLM objective alone), where resumed losses must be exact.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def run(nproc: int, overrides: list[str]) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    with socket.socket() as s:  # a fresh port per run: a fixed one can still be held by the previous run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master-port={port}",
    ]
    proc = subprocess.run(
        [*cmd, "-m", "sclabel_dist.pretrain", *overrides], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
        raise SystemExit("\n".join(errors[-5:]) + "\n" + proc.stderr[-4000:])
    return proc.stdout


def losses(log_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def seconds(pattern: str, text: str) -> float | None:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--flavour", default="small")
    parser.add_argument("--zero", default="1,2,3")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="/tmp/ckbench")
    parser.add_argument("--worlds", default="2,1", help="world sizes to resume on (2 = the saving one)")
    parser.add_argument("--elastic", action="store_true", help="data.elastic=true, model.contrastive=0")
    args = parser.parse_args()
    out, at = Path(args.out), args.steps // 2
    shutil.rmtree(out, ignore_errors=True)
    common = [
        f"--data.stores=[{args.store}]",
        "--data.batch_size=16",
        "--data.chunk_size=16",
        "--tokenize.max_len=64",
        f"--model.flavour={args.flavour}",
        "--log.every=1",
        "--log.tensorboard=false",
        f"--train.max_steps={args.steps}",
        *(["--data.elastic=true", "--model.contrastive=0"] if args.elastic else []),
    ]
    for zero in map(int, args.zero.split(",")):
        ref = out / f"z{zero}_ref"
        text = run(
            2,
            [
                *common,
                f"--train.zero_stage={zero}",
                f"--checkpoint.every={at}",
                f"--checkpoint.dir={ref}/ckpt",
                f"--log.dir={ref}/logs",
            ],
        )
        step = ref / "ckpt" / f"step_{at:08d}"
        size = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
        save_s = seconds(rf"checkpoint: saved {step} in ([\d.]+)s", text)
        row = {
            "zero": zero,
            "flavour": args.flavour,
            "elastic": args.elastic,
            "ckpt_mb": round(size / 1e6, 2),
            "save_s": save_s,
        }
        for nproc in map(
            int, args.worlds.split(",")
        ):  # the first other world size converts, later ones reuse
            run_dir = out / f"z{zero}_w{nproc}"
            text = run(
                nproc,
                [
                    *common,
                    f"--train.zero_stage={zero}",
                    f"--checkpoint.resume={step}",
                    "--checkpoint.every=1000",
                    f"--checkpoint.dir={run_dir}/ckpt",
                    f"--log.dir={run_dir}/logs",
                ],
            )
            row[f"resume_w{nproc}_s"] = seconds(r"\(([\d.]+)s to load\)", text)
            if nproc != 2 and "convert_s" not in row:
                row["convert_s"] = seconds(r"as a universal checkpoint in ([\d.]+)s", text)
            base, got = losses(ref / "logs"), losses(run_dir / "logs")
            row[f"max_dloss_w{nproc}"] = max(abs(got[s] - base[s]) for s in got)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
