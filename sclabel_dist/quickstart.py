"""`sclabel quickstart`: the whole loop (ingest, DeepSpeed pretraining, export, fine-tune, predict) in minutes.

With no arguments it runs on the 700 annotated PBMCs that ship inside the scanpy wheel (nothing to download);
`--data my.h5ad --label-key cell_type` runs it on a user's own file. Each step runs through the same command a
user would type, as a subprocess, so the quickstart exercises exactly the public entry points. Test cells
(a stratified 30%) never reach pretraining or fine-tuning; the summary scores the annotated test cells and a
logistic-regression baseline fitted on the same training cells.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from sclabel_dist.errors import SclabelError
from sclabel_dist.outdir import prepare_out_dir

EMBEDDED_NAME = "10x_pbmc68k_reduced.h5ad"
EMBEDDED_LABEL_KEY = "bulk_labels"
LABEL_COLUMN = "sclabel_truth"
SPLIT_COLUMN = "sclabel_split"


def embedded_dataset() -> Path:
    """The real PBMC sample inside the scanpy wheel, found without importing scanpy (slow to import)."""
    spec = importlib.util.find_spec("scanpy")
    if spec is None or not spec.submodule_search_locations:
        raise SclabelError(
            "the embedded dataset ships with scanpy: `pip install scanpy` (a listed dependency)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / EMBEDDED_NAME
    if not path.is_file():
        raise SclabelError(f"{path}: not found in this scanpy install; pass --data and --label-key instead")
    return path


def prepare_cells(source: Path, label_key: str, use_raw: bool, out: Path, seed: int) -> dict:
    """Write the input's cells with a truth column and a stratified train / test split column."""
    import anndata

    from sclabel_dist.annotate.splits import EVALUATE_TEST_FRACTION, stratified_split

    with warnings.catch_warnings():
        # scanpy's sample predates .obsp: anndata moves its neighbour graphs there on every read and says so
        # in a FutureWarning (twice) about a file the user cannot change; the quickstart never uses them.
        warnings.filterwarnings(
            "ignore", message=r"Moving element from \.uns\['neighbors'\]", category=FutureWarning
        )
        adata = anndata.read_h5ad(source)
    if label_key not in adata.obs:
        raise SclabelError(f"{source}: no obs column {label_key!r}; columns are {list(adata.obs.columns)}")
    if use_raw:
        # scanpy's sample keeps scaled values in X and log-normalised expression in .raw: use the latter.
        adata = anndata.AnnData(X=adata.raw.X, obs=adata.obs, var=adata.raw.var)
    labels = np.array([None if v != v else str(v) for v in adata.obs[label_key]], dtype=object)
    # the quickstart measures as `sclabel evaluate` does: its stratified hold-out, never seen in training
    split = stratified_split(
        labels, seed=seed, test_fraction=EVALUATE_TEST_FRACTION, val_fraction=0.0, where=str(source)
    )
    parts = np.full(adata.n_obs, "excluded", dtype=object)
    parts[split.train] = "train"
    parts[split.test] = "test"
    adata.obs[LABEL_COLUMN] = labels.astype(str)
    adata.obs[SPLIT_COLUMN] = parts.astype(str)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    adata[parts == "train"].copy().write_h5ad(out.with_name("train_cells.h5ad"))
    adata[parts == "test"].copy().write_h5ad(out.with_name("test_cells.h5ad"))
    return {
        "cells": int(adata.n_obs),
        "genes": int(adata.n_vars),
        "train": len(split.train),
        "test": len(split.test),
        "classes": split.classes,
    }


def run_step(title: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> float:
    """Run one command with its output streamed to the terminal and to a log; raise on failure."""
    print(f"\n==> {title}\n    $ {' '.join(argv)}", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{title.split(':')[0].strip().lower().replace(' ', '_')}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write("    " + line)
            log.write(line)
        code = proc.wait()
    if code != 0:
        raise SclabelError(f"step '{title}' failed with exit code {code}; its full output is in {log_path}")
    seconds = time.perf_counter() - start
    print(f"    done in {seconds:.0f} s", flush=True)
    return seconds


def score(annotated: Path, cells: Path) -> dict:
    """Accuracy and macro-F1 of the predictions and of the baseline on the same test cells.

    Ours are scored on each cell's top label, as the baseline (which always names a class) is: a cell that
    `sclabel predict` left 'Unassigned' under its confidence threshold would otherwise count as an error and
    add a class of F1 0 to the macro average. How many cells were left unassigned is reported beside it.
    """
    import anndata
    from sklearn.metrics import accuracy_score, f1_score

    from sclabel_dist.annotate.baseline import fit_predict
    from sclabel_dist.annotate.h5ad import read_h5ad
    from sclabel_dist.annotate.output import UNASSIGNED

    pred = anndata.read_h5ad(annotated)
    truth = pred.obs[LABEL_COLUMN].astype(str).to_numpy()
    ours = pred.obs["sclabel_top_label"].astype(str).to_numpy()
    unassigned = int((pred.obs["sclabel_label"].astype(str) == UNASSIGNED).sum())
    threshold = float(pred.uns["sclabel"]["threshold"])  # as predict recorded it
    inp = read_h5ad(cells)
    labels = inp.obs[LABEL_COLUMN].astype(str).to_numpy()
    parts = inp.obs[SPLIT_COLUMN].astype(str).to_numpy()
    classes = sorted(set(labels[parts == "train"]))
    y = np.array([classes.index(v) if v in classes else -1 for v in labels])
    train, test = np.flatnonzero(parts == "train"), np.flatnonzero(parts == "test")
    base = np.array(classes)[fit_predict(inp.X, y, train, test, inp.value_kind)]
    return {
        "sclabel": {
            "accuracy": accuracy_score(truth, ours),
            "macro_f1": f1_score(truth, ours, average="macro"),
            "unassigned": unassigned,
            "threshold": threshold,
        },
        "logistic_regression": {
            "accuracy": accuracy_score(labels[test], base),
            "macro_f1": f1_score(labels[test], base, average="macro"),
        },
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sclabel quickstart", description=__doc__.splitlines()[0])
    p.add_argument("--data", help=".h5ad to use (default: the PBMC sample shipped in the scanpy wheel)")
    p.add_argument(
        "--label-key", help=f"obs column of cell types (default for the sample: {EMBEDDED_LABEL_KEY})"
    )
    p.add_argument("--out", default="runs/quickstart", help="directory for every artefact")
    p.add_argument("--nproc", type=int, default=2, help="pretraining processes (torchrun --nproc_per_node)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="pretraining optimizer steps")
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=12,
        help="fine-tuning epochs (bounded so the whole loop stays well under 10 minutes on 2 CPU cores)",
    )
    p.add_argument("--flavour", default="debug", help="model size flavour")
    p.add_argument("--seed", type=int, default=0, help="split, pretraining and fine-tuning seed")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart in --out")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad arguments before anything on disk is looked at, so the message names the real mistake."""
    if args.data is not None and args.label_key is None:
        raise SclabelError("--label-key is required with --data")
    for flag, value in (
        ("--nproc", args.nproc),
        ("--pretrain-steps", args.pretrain_steps),
        ("--finetune-epochs", args.finetune_epochs),
    ):
        if value < 1:
            raise SclabelError(f"{flag} {value}: must be >= 1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    if args.data is None:
        source, label_key, use_raw = embedded_dataset(), args.label_key or EMBEDDED_LABEL_KEY, True
    else:
        source, label_key, use_raw = Path(args.data), args.label_key, False
        if not source.is_file():
            raise SclabelError(f"{source}: no such .h5ad file")
    out = Path(args.out)
    prepare_out_dir(out, args.overwrite)  # --overwrite deletes only what an earlier sclabel run wrote
    py, logs = sys.executable, out / "logs"
    paths = {
        "cells": out / "data" / "cells.h5ad",
        "store": out / "store",
        "checkpoints": out / "pretrain" / "checkpoints",
        "tensorboard": out / "pretrain" / "logs",
        "export": out / "export",
        "finetune": out / "finetune",
        "annotated": out / "annotated.h5ad",
    }
    started = time.perf_counter()
    print(f"sclabel quickstart: {source} (labels: obs[{label_key!r}]) -> {out}", flush=True)
    info = prepare_cells(source, label_key, use_raw, paths["cells"], args.seed)
    print(
        f"    {info['cells']} cells x {info['genes']} genes, {len(info['classes'])} classes; "
        f"{info['train']} train / {info['test']} test cells",
        flush=True,
    )

    run_step(
        "Ingest: training cells into a Zarr cell store",
        [
            py,
            "-m",
            "data_tools",
            "ingest",
            str(paths["cells"].with_name("train_cells.h5ad")),
            "-o",
            str(paths["store"]),
            "--dataset-name",
            "quickstart",
        ],
        logs,
    )
    run_step(
        f"Pretrain: DeepSpeed under torchrun, {args.nproc} processes",
        [
            py,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "sclabel_dist.pretrain",
            f"--data.stores=[{paths['store']}]",
            "--data.batch_size=16",
            "--data.chunk_size=16",
            "--data.val_fraction=0.1",
            "--tokenize.max_len=256",
            f"--model.flavour={args.flavour}",
            f"--train.max_steps={args.pretrain_steps}",
            f"--train.seed={args.seed}",
            "--train.warmup_steps=20",
            "--train.val_every=100",
            f"--checkpoint.dir={paths['checkpoints']}",
            f"--checkpoint.every={args.pretrain_steps}",
            f"--log.dir={paths['tensorboard']}",
            "--log.every=20",
        ],
        logs,
        env={"OMP_NUM_THREADS": "1"},
    )
    run_step(
        "Export: consolidate the checkpoint into a safetensors bundle",
        [py, "-m", "sclabel_dist.cli", "export", str(paths["checkpoints"]), str(paths["export"])],
        logs,
    )
    finetune = [
        py,
        "-m",
        "sclabel_dist.cli",
        "finetune",
        "--model",
        str(paths["export"]),
        "--data",
        str(paths["cells"]),
        "--label-key",
        LABEL_COLUMN,
        "--split-key",
        SPLIT_COLUMN,
        "--out",
        str(paths["finetune"]),
        "--seed",
        str(args.seed),
    ]
    finetune.append(f"--train.epochs={args.finetune_epochs}")
    run_step("Fine-tune: classifier on the training cells", finetune, logs)
    run_step(
        "Predict: annotate the held-out test cells",
        [
            py,
            "-m",
            "sclabel_dist.cli",
            "predict",
            "--model",
            str(paths["finetune"]),
            "--data",
            str(paths["cells"].with_name("test_cells.h5ad")),
            "--out",
            str(paths["annotated"]),
        ],
        logs,
    )

    scores = score(paths["annotated"], paths["cells"])
    minutes = (time.perf_counter() - started) / 60
    (out / "summary.json").write_text(
        json.dumps({"data": str(source), "minutes": minutes, **info, "scores": scores}, indent=2)
    )
    ours, base = scores["sclabel"], scores["logistic_regression"]
    print(f"\nDone in {minutes:.1f} min. Test cells: {info['test']} ({len(info['classes'])} classes)\n")
    print(f"  {'method':<28}{'accuracy':>10}{'macro-F1':>10}")
    print(f"  {'sclabel (pretrained+ft)':<28}{ours['accuracy']:>10.3f}{ours['macro_f1']:>10.3f}")
    print(f"  {'logistic regression':<28}{base['accuracy']:>10.3f}{base['macro_f1']:>10.3f}")
    print(
        f"  (sclabel scored on each cell's top label; {ours['unassigned']} of {info['test']} test cells are "
        f"'Unassigned' in the annotated .h5ad, under predict's {ours['threshold']} confidence threshold)"
    )
    print("\nArtefacts:")
    for name, where in [
        ("cell store", paths["store"]),
        ("TensorBoard / JSONL logs", paths["tensorboard"]),
        ("checkpoints", paths["checkpoints"]),
        ("export bundle", paths["export"]),
        ("fine-tuned bundle, metrics.json, plots", paths["finetune"]),
        ("annotated .h5ad (+ .csv)", paths["annotated"]),
        ("step logs", logs),
        ("summary", out / "summary.json"),
    ]:
        print(f"  {name:<40} {where}")
    return 0
