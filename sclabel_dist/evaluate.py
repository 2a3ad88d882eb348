"""`sclabel evaluate`: fine-tune and test over seeds, beside the logistic-regression baseline on the same splits."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sclabel_dist.config import FinetuneConfig
from sclabel_dist.config_cli import add_config_options, config_overrides
from sclabel_dist.errors import SclabelError

UPSAMPLE_CHOICES = {"on": [True], "off": [False], "both": [True, False]}
ARMS = ("pretrained", "scratch")
ARM_NAMES = {"pretrained": "fine-tuned", "scratch": "from scratch"}

USAGE_EXAMPLES = """examples:
  sclabel evaluate --model runs/export --data x.h5ad --label-key cell_type
  sclabel evaluate --model runs/export --data x.h5ad --label-key cell_type --arms pretrained,scratch \
      --upsample both --seeds 0 1 2        (does pretraining help on this data? both arms, same splits)
  sclabel evaluate --model runs/export --data x.h5ad --label-key cell_type --split-key split --seeds 0
  overrides: --train.epochs=10 --upsample.cap=500 (any FinetuneConfig field)

Per seed, a stratified --test-fraction of the labelled cells (default {test:.0%}, or the 'test' cells of
--split-key) is held out; every method learns from the rest and is scored on it. `sclabel finetune` holds
nothing out: it trains the model you keep on every labelled cell.
"""


def parse_arms(text: str) -> list[str]:
    """'pretrained,scratch' -> ['pretrained', 'scratch'] (order kept, duplicates and unknowns refused)."""
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if not arms or unknown or len(set(arms)) != len(arms):
        raise SclabelError(f"--arms {text!r}: a comma-separated subset of {', '.join(ARMS)}")
    return arms


def build_parser() -> argparse.ArgumentParser:
    from sclabel_dist.annotate.splits import EVALUATE_TEST_FRACTION

    p = argparse.ArgumentParser(
        prog="sclabel evaluate",
        description=__doc__,
        epilog=USAGE_EXAMPLES.format(test=EVALUATE_TEST_FRACTION),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a mistyped --section.key is an error, never a prefix of another
    )
    p.add_argument("--model", required=True, help="export bundle directory (pretrained)")
    p.add_argument("--data", required=True, help="labelled .h5ad file")
    p.add_argument("--label-key", required=True, help="obs column holding the cell types")
    p.add_argument("--out", default=None, help="output directory (default runs/evaluate/<data name>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split / training seeds")
    p.add_argument(
        "--upsample",
        choices=sorted(UPSAMPLE_CHOICES),
        default="on",
        help="fine-tune with up-sampling, without, or both (default on)",
    )
    p.add_argument(
        "--arms",
        default="pretrained",
        help="comma-separated: 'pretrained' fine-tunes --model, 'scratch' the same model with fresh weights "
        "(seeded per seed, `sclabel init-bundle`); default pretrained",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=EVALUATE_TEST_FRACTION,
        help=f"stratified fraction of labelled cells held out as the test (default {EVALUATE_TEST_FRACTION}; "
        "ignored with --split-key)",
    )
    p.add_argument("--split-key", default=None, help="obs column with train / val / test per cell")
    p.add_argument("--train-mode", default=None, help="full | frozen | top:N")
    p.add_argument("--save-models", action="store_true", help="also write each fine-tuned bundle")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_config_options(p, FinetuneConfig)
    return p


def _sd(a: np.ndarray) -> float:
    return float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (sample std) per method over seeds."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        acc = np.array([r["accuracy"] for r in sel])
        f1 = np.array([r["macro_f1"] for r in sel])
        out.append(
            {
                "method": method,
                "seeds": len(sel),
                "accuracy": float(acc.mean()),
                "accuracy_sd": _sd(acc),
                "macro_f1": float(f1.mean()),
                "macro_f1_sd": _sd(f1),
                "minutes": float(np.mean([r["minutes"] for r in sel])),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import Accelerator

    from sclabel_dist.annotate import baseline, pipeline
    from sclabel_dist.annotate.report import classification_metrics, format_table
    from sclabel_dist.bundle import load_bundle
    from sclabel_dist.fresh import fresh_bundle_like
    from sclabel_dist.outdir import prepare_out_dir

    args = build_parser().parse_args(argv)
    arms = parse_arms(args.arms)
    if not 0.0 < args.test_fraction < 1.0:
        raise SclabelError(f"--test-fraction {args.test_fraction}: must be between 0 and 1")
    cfg = pipeline.finetune_config(args.config, config_overrides(args), train_mode=args.train_mode)
    # The test part is evaluation's own choice: `sclabel finetune` trains on every labelled cell by default.
    cfg.data.test_fraction = args.test_fraction
    # cpu=True on a machine without CUDA is what lets torchrun / accelerate launch run several CPU processes
    # (gloo); with it unset Accelerate falls back to one process per launch.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_proc = accelerator.is_main_process
    log = print if main_proc else (lambda *_: None)
    t_start = time.perf_counter()
    data = Path(args.data)
    out = Path(args.out or f"runs/evaluate/{data.stem}")
    prepare_out_dir(out, args.overwrite, create=False)
    li = pipeline.read_labelled(args.model, data, args.label_key, cfg.data.layer)
    bundle, inp = li.bundle, li.inp
    log(pipeline.describe(li))
    prep = pipeline.prepare_input(bundle, inp, cfg, log)
    if main_proc:
        prepare_out_dir(out, args.overwrite, create=True)
    accelerator.wait_for_everyone()

    def arm_bundle(arm: str, seed: int) -> Any:
        """The bundle an arm fine-tunes: --model itself, or its architecture with fresh weights of `seed`."""
        if arm == "pretrained":
            return bundle
        path = out / "scratch_models" / f"seed{seed}"
        if main_proc:
            fresh_bundle_like(bundle, path, seed=seed)
        accelerator.wait_for_everyone()
        return load_bundle(path)

    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        cfg.train.seed = seed
        split = pipeline.make_split(li.labels, inp, cfg, args.split_key)
        if len(split.test) == 0:
            raise SclabelError(
                f"{data}: the split column {args.split_key!r} names no 'test' cells to score on"
            )
        # The baseline learns from every non-test cell (it needs no validation split), as in the README.
        t0 = time.perf_counter()
        fit_cells = np.sort(np.concatenate([split.train, split.val]))
        pred = baseline.fit_predict(inp.X, split.y, fit_cells, split.test, inp.value_kind, seed=seed)
        m = classification_metrics(split.y[split.test], pred, split.classes)
        rows.append(
            {
                "method": "logistic regression",
                "seed": seed,
                "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"],
                "minutes": (time.perf_counter() - t0) / 60,
            }
        )
        log(f"seed {seed} baseline: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
        for arm in arms:
            start = arm_bundle(arm, seed)
            for upsample in UPSAMPLE_CHOICES[args.upsample]:
                cfg.upsample.enabled = upsample
                name = f"{ARM_NAMES[arm]} ({'up-sampling' if upsample else 'no up-sampling'})"
                log(f"seed {seed} {name}:")
                t0 = time.perf_counter()
                fitted = pipeline.fit(start, prep, split, cfg, accelerator, log=log)
                minutes = (time.perf_counter() - t0) / 60
                m = fitted.test_metrics
                rows.append(
                    {
                        "method": name,
                        "seed": seed,
                        "accuracy": m["accuracy"],
                        "macro_f1": m["macro_f1"],
                        "minutes": minutes,
                        "best_epoch": fitted.train.best_epoch + 1,  # counted from 1, as printed
                    }
                )
                if main_proc:
                    arm_dir = "" if arm == "pretrained" else "scratch_"
                    run = out / f"{arm_dir}seed{seed}_{'upsample' if upsample else 'no_upsample'}"
                    run.mkdir(parents=True, exist_ok=True)
                    info = {
                        "model": str(start.path),
                        "data": str(data),
                        "label_key": args.label_key,
                        "split_key": args.split_key,
                        "minutes": minutes,
                    }
                    pipeline.save_outputs(
                        run, start, prep, split, fitted, cfg, info, save_model=args.save_models
                    )
    summary = summarise(rows)
    test_part = (
        f"the 'test' cells of obs[{args.split_key!r}]"
        if args.split_key
        else f"stratified {args.test_fraction:.0%} hold-out"
    )
    table = format_table(
        summary, ["method", "seeds", "accuracy", "accuracy_sd", "macro_f1", "macro_f1_sd", "minutes"]
    )
    if main_proc:
        result = {
            "data": str(data),
            "model": str(bundle.path),
            "label_key": args.label_key,
            "seeds": args.seeds,
            "arms": arms,
            "test_fraction": None if args.split_key else args.test_fraction,
            "summary": summary,
            "runs": rows,
            "gene_match": prep.match_report,
            "value_note": prep.value_note,
            "minutes": (time.perf_counter() - t_start) / 60,
        }
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "table.md").write_text(f"{data.name}, seeds {args.seeds}, test = {test_part}\n\n{table}\n")
        print(table)
        print(
            f"wrote {out}/table.md, results.json and per-seed metrics / plots "
            f"in {(time.perf_counter() - t_start) / 60:.1f} min"
        )
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":  # `python -m` / `accelerate launch -m`: same error handling as `sclabel evaluate`
    from sclabel_dist.cli import main as sclabel_main

    sys.exit(sclabel_main(["evaluate", *sys.argv[1:]]))
