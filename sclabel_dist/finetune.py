"""`sclabel finetune`: fine-tune an exported bundle into a cell-type classifier on a labelled `.h5ad` (Accelerate)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sclabel_dist.annotate import pipeline
from sclabel_dist.config import FinetuneConfig
from sclabel_dist.config_cli import add_config_options, config_overrides
from sclabel_dist.outdir import prepare_out_dir as prepare_run_dir

USAGE_EXAMPLES = """examples:
  sclabel finetune --model runs/export --data train.h5ad --label-key cell_type --out runs/ft
  accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m sclabel_dist.finetune --model runs/export \
      --data train.h5ad --label-key cell_type --out runs/ft      (cpu_2proc.yaml: two CPU processes)
  overrides: --train.epochs=10 --upsample.cap=500 (any FinetuneConfig field)

Every labelled cell trains the model by default: validation cells choose the epoch count, then the refit
learns from them too. To measure accuracy on held-out cells use `sclabel evaluate`, or hold cells out of this
run with --data.test_fraction=0.3 or --split-key.
"""


def build_parser(prog: str = "sclabel finetune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a mistyped --section.key is an error, never a prefix of another
    )
    p.add_argument("--model", required=True, help="export bundle directory (from `sclabel export`)")
    p.add_argument("--data", required=True, help="labelled .h5ad file")
    p.add_argument("--label-key", required=True, help="obs column holding the cell types")
    p.add_argument(
        "--out", required=True, help="run directory to write (bundle in OUT/model, metrics, plots)"
    )
    p.add_argument("--split-key", default=None, help="obs column with train / val / test per cell")
    p.add_argument("--no-upsample", action="store_true", help="do not up-sample rare classes")
    p.add_argument("--train-mode", default=None, help="full | frozen | top:N (overrides train.train_mode)")
    p.add_argument("--seed", type=int, default=None, help="overrides train.seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    add_config_options(p, FinetuneConfig)  # --config configs/finetune/default.yaml, then --section.key=value
    return p


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import Accelerator

    args = build_parser().parse_args(argv)
    cfg = pipeline.finetune_config(
        args.config,
        config_overrides(args),
        upsample=not args.no_upsample,
        train_mode=args.train_mode,
        seed=args.seed,
    )
    # cpu=True on a machine without CUDA is what lets torchrun / accelerate launch run several CPU processes
    # (gloo); with it unset Accelerate falls back to one process per launch.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    log = print if accelerator.is_main_process else (lambda *_: None)
    t0 = time.perf_counter()
    out = Path(args.out)
    prepare_run_dir(out, args.overwrite, create=False)
    li = pipeline.read_labelled(args.model, args.data, args.label_key, cfg.data.layer)
    log(pipeline.describe(li))
    prep = pipeline.prepare_input(li.bundle, li.inp, cfg, log)
    split = pipeline.make_split(li.labels, li.inp, cfg, args.split_key)
    if accelerator.is_main_process:
        prepare_run_dir(out, args.overwrite, create=True)
    accelerator.wait_for_everyone()
    writer = pipeline.open_writer(out, cfg, accelerator)
    fitted = pipeline.fit(li.bundle, prep, split, cfg, accelerator, writer=writer, log=log)
    if writer is not None:
        writer.close()
    if accelerator.is_main_process:
        info = {
            "model": str(li.bundle.path),
            "data": str(li.inp.path),
            "label_key": args.label_key,
            "split_key": args.split_key,
            "num_processes": accelerator.num_processes,
            "minutes": (time.perf_counter() - t0) / 60,
        }
        pipeline.save_outputs(out, li.bundle, prep, split, fitted, cfg, info)
        log(
            f"wrote {out}/model (fine-tuned bundle), metrics.json, confusion_matrix.png, per_class_f1.png, "
            f"tensorboard/ in {(time.perf_counter() - t0) / 60:.1f} min"
        )
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":  # `python -m` / `accelerate launch -m`: same error handling as `sclabel finetune`
    from sclabel_dist.cli import main as sclabel_main

    sys.exit(sclabel_main(["finetune", *sys.argv[1:]]))
