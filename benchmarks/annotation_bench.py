"""Annotation quality on the labelled shared sets: does pretraining beat logistic regression and training from scratch?

Per seed (the README's stratified 70/30 split, random_state = seed):
  1. pretraining corpus = the two unlabelled sets + the non-test cells of every labelled set (never a test
     cell; the Drop-seq batch of cellbench is left out too, since it is the cross-protocol test below);
  2. `torchrun --nproc_per_node=2 -m sclabel_dist.pretrain` (DeepSpeed) on it, then `sclabel export`;
  3. per labelled set, `sclabel evaluate` on that seed's split:
       (a) logistic regression, (c) pretrained + fine-tuned with up-sampling, (d) the same without,
       and (b) `--arms scratch`: the same model with fresh weights (seeded by the seed), with up-sampling;
  4. cross-protocol transfer on cellbench: train on the CEL-seq2 batches, test on the Drop-seq batch,
     baseline / pretrained / from scratch.
The summary (mean and sample std over seeds) is written to WORK/summary.md and WORK/summary.json.

    python benchmarks/annotation_bench.py --work .bench/annotation --seeds 0 1 2
    python benchmarks/annotation_bench.py --work .bench/annotation --seeds 0 --pretrain-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LABELLED = (
    "pbmc_facs_zheng_fasttopics",
    "baron_mouse1_pancreas",
    "tabula_muris_immune_actinn",
    "zilionis_mouse_lung",
    "cellbench_lung_adenocarcinoma_lines",
)
UNLABELLED = ("pbmcA_frozen_unlabeled", "celltypist_sample_unlabeled", "pbmc3k_10x_unlabeled")
TRANSFER_SET, TRANSFER_TEST_BATCH = "cellbench_lung_adenocarcinoma_lines", "sc_dropseq"
LABEL_KEY = "cell_type"
METHODS = {
    "logistic regression": "(a) logistic regression",
    "from scratch (up-sampling)": "(b) from scratch, up-sampling",
    "fine-tuned (up-sampling)": "(c) pretrained, up-sampling",
    "fine-tuned (no up-sampling)": "(d) pretrained, no up-sampling",
}


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run `cmd`, output appended to `log`; minutes taken. A failure stops the benchmark with the log's tail."""
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return (time.perf_counter() - t0) / 60


def finetune_config(path: str) -> object:
    from sclabel_dist.config import FinetuneConfig, load_config

    return load_config(FinetuneConfig, path)


def non_test_cells(inp, seed: int, cfg: object) -> np.ndarray:
    """Rows of `inp` (an H5adInput) outside `sclabel evaluate`'s test split for `seed` (the same function
    computes both, with evaluate's default test fraction)."""
    from sclabel_dist.annotate.h5ad import read_labels
    from sclabel_dist.annotate.pipeline import make_split
    from sclabel_dist.annotate.splits import EVALUATE_TEST_FRACTION

    cfg.train.seed = seed
    cfg.data.test_fraction = EVALUATE_TEST_FRACTION
    split = make_split(read_labels(inp, LABEL_KEY), inp, cfg, None)
    keep = np.ones(inp.X.shape[0], dtype=bool)
    keep[split.test] = False
    if inp.path.stem == TRANSFER_SET:
        keep &= inp.obs["batch"].astype(str).to_numpy() != TRANSFER_TEST_BATCH
    return np.flatnonzero(keep)


def write_pretrain_inputs(data: Path, out: Path, seed: int, cfg: object) -> dict[str, int]:
    """The seed's pretraining .h5ad files (labels dropped); cells per set."""
    from sclabel_dist.annotate.h5ad import read_h5ad

    out.mkdir(parents=True, exist_ok=True)
    cells = {}
    for name in LABELLED + UNLABELLED:
        inp = read_h5ad(data / f"{name}.h5ad")
        rows = non_test_cells(inp, seed, cfg) if name in LABELLED else np.arange(inp.X.shape[0])
        sub = inp.adata[rows].copy()
        sub.obs = sub.obs.drop(columns=[LABEL_KEY], errors="ignore")
        sub.write_h5ad(out / f"{name}.h5ad")
        cells[name] = len(rows)
    return cells


def transfer_h5ad(data: Path, out: Path) -> Path:
    """cellbench with obs['transfer_split']: CEL-seq2 batches train, the Drop-seq batch test."""
    import anndata

    path = out / f"{TRANSFER_SET}_transfer.h5ad"
    if not path.exists():
        adata = anndata.read_h5ad(data / f"{TRANSFER_SET}.h5ad")
        batch = adata.obs["batch"].astype(str)
        adata.obs["transfer_split"] = np.where(batch == TRANSFER_TEST_BATCH, "test", "train")
        adata.write_h5ad(path)
    return path


def evaluate(
    model: Path, data: Path, out: Path, seed: int, arm: str, upsample: str, args, log: Path, split_key=None
) -> dict:
    if not (out / "results.json").exists():
        cmd = ["sclabel", "evaluate", "--model", str(model), "--data", str(data), "--label-key", LABEL_KEY]
        cmd += ["--seeds", str(seed), "--arms", arm, "--upsample", upsample, "--config", args.finetune_config]
        cmd += ["--out", str(out), "--overwrite"]
        if split_key:
            cmd += ["--split-key", split_key]
        run(cmd, log, env={"OMP_NUM_THREADS": str(args.threads)})
        print(
            f"  {out}: {(out / 'table.md').read_text().splitlines()[-1] if (out / 'table.md').exists() else ''}",
            flush=True,
        )
    return json.loads((out / "results.json").read_text())


def pretrain(seed: int, work: Path, args, log: Path) -> dict:
    """Corpus, DeepSpeed pretraining and export of one seed; returns what it took."""
    seed_dir = work / f"seed{seed}"
    export = seed_dir / "export"
    info_path = seed_dir / "pretrain.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    cfg = finetune_config(args.finetune_config)
    cells = write_pretrain_inputs(args.data, seed_dir / "pretrain_h5ad", seed, cfg)
    store = seed_dir / "pretrain_store"
    inputs = [str(seed_dir / "pretrain_h5ad" / f"{n}.h5ad") for n in LABELLED + UNLABELLED]
    run(
        [
            "sclabel-data",
            "ingest",
            *inputs,
            "-o",
            str(store),
            "--vocab",
            str(work / "vocab" / "vocab.json"),
            "--no-progress",
            "--overwrite",
        ],
        log,
    )
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sclabel_dist.pretrain",
        "--config",
        args.pretrain_config,
        f"--data.stores=[{store}]",
        f"--train.seed={seed}",
        f"--checkpoint.dir={seed_dir / 'ckpt'}",
        f"--log.dir={seed_dir / 'logs'}",
        "--checkpoint.resume=never",
    ]
    if args.pretrain_steps:
        cmd.append(f"--train.max_steps={args.pretrain_steps}")
    minutes = run(cmd, log, env={"OMP_NUM_THREADS": "1"})
    run(["sclabel", "export", str(seed_dir / "ckpt"), str(export)], log)
    bundle_cfg = json.loads((export / "config.json").read_text())
    from sclabel_dist.model.args import ModelArgs, count_params

    margs = ModelArgs.from_dict(bundle_cfg["model_args"])
    info = {
        "cells": cells,
        "total_cells": sum(cells.values()),
        "steps": bundle_cfg["pretrain"]["step"],
        "metrics": bundle_cfg["pretrain"]["metrics"],
        "minutes": minutes,
        "params": count_params(margs),
        "params_non_embedding": count_params(margs, embeddings=False),
        "model_args": bundle_cfg["model_args"],
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def seed_rows(seed: int, work: Path, args, log: Path) -> list[dict]:
    """Every method on every set (and the transfer) for one seed, from evaluate's results.json files.

    The evaluations run `--jobs` at a time, one torch thread each: a model this small keeps one core busy
    better than it splits its small matrices over two.
    """
    from concurrent.futures import ThreadPoolExecutor

    seed_dir = work / f"seed{seed}"
    sets = [(name, args.data / f"{name}.h5ad", None, name) for name in args.sets]
    if args.transfer:
        sets.append(
            ("transfer: CEL-seq2 -> Drop-seq", transfer_h5ad(args.data, work), "transfer_split", "transfer")
        )
    jobs = []
    for name, path, split_key, tag in sets:
        for arm, upsample in (("pretrained", "both"), ("scratch", "on")):
            out = seed_dir / "eval" / tag / arm
            jobs.append(
                (
                    name,
                    arm,
                    (
                        seed_dir / "export",
                        path,
                        out,
                        seed,
                        arm,
                        upsample,
                        args,
                        work / f"eval_seed{seed}_{tag}_{arm}.log",
                        split_key,
                    ),
                )
            )
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: evaluate(*job[2]), jobs))
    rows = []
    for (name, arm, _), result in zip(jobs, results, strict=True):
        for run_ in result["runs"]:
            if arm == "pretrained":
                rows.append({"set": name, "seed": seed, **run_, "method": METHODS[run_["method"]]})
            elif run_["method"] != "logistic regression":  # the baseline is already in the pretrained arm
                # by arm, not by name: results cached before `--arms` named this arm "fine-tuned (...)"
                rows.append(
                    {"set": name, "seed": seed, **run_, "method": METHODS["from scratch (up-sampling)"]}
                )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        for method in sorted({r["method"] for r in rows if r["set"] == name}):
            sel = [r for r in rows if r["set"] == name and r["method"] == method]
            acc, f1 = np.array([r["accuracy"] for r in sel]), np.array([r["macro_f1"] for r in sel])
            out.append(
                {
                    "set": name,
                    "method": method,
                    "seeds": len(sel),
                    "accuracy": acc.mean(),
                    "accuracy_sd": acc.std(ddof=1) if len(sel) > 1 else 0.0,
                    "macro_f1": f1.mean(),
                    "macro_f1_sd": f1.std(ddof=1) if len(sel) > 1 else 0.0,
                    "minutes": float(np.mean([r["minutes"] for r in sel])),
                }
            )
    return out


def markdown(summary: list[dict], pretrain_info: list[dict]) -> str:
    """One row per set, one column per method: accuracy / macro-F1, each mean ± sample std over seeds."""
    methods = list(METHODS.values())
    lines = ["| set | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for name in dict.fromkeys(s["set"] for s in summary):
        cells = []
        for method in methods:
            s = next((s for s in summary if s["set"] == name and s["method"] == method), None)
            cells.append(
                ""
                if s is None
                else f"{s['accuracy']:.3f} ± {s['accuracy_sd']:.3f} / {s['macro_f1']:.3f} ± {s['macro_f1_sd']:.3f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    p = pretrain_info[0]
    minutes = ", ".join(f"{i['minutes']:.1f}" for i in pretrain_info)
    finetune = {m: np.mean([s["minutes"] for s in summary if s["method"] == m]) for m in methods}
    lines += [
        "",
        "Accuracy / macro-F1, mean ± sample std over seeds "
        f"{', '.join(str(i.get('seed', '?')) for i in pretrain_info)}.",
        f"Pretraining per seed: {p['steps']} steps on {p['total_cells']:,} cells, "
        f"{p['params']:,} parameters ({p['params_non_embedding']:,} outside embeddings), "
        f"minutes {minutes}; final metrics of the first: "
        + ", ".join(f"{k} {v:.3f}" for k, v in p["metrics"].items())
        + ".",
        "Mean minutes per run: " + ", ".join(f"{m[:3]} {v:.1f}" for m, v in finetune.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(".bench/annotation"))
    p.add_argument(
        "--data", type=Path, default=Path(os.environ.get("SHARED_DATA", REPO.parent / "shared/data"))
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sets", nargs="+", default=list(LABELLED), choices=LABELLED)
    p.add_argument("--pretrain-config", default=str(REPO / "configs/pretrain/shared_sets.yaml"))
    p.add_argument(
        "--pretrain-steps", type=int, default=0, help="override train.max_steps (0 = the config's)"
    )
    p.add_argument("--finetune-config", default=str(REPO / "configs/finetune/default.yaml"))
    p.add_argument("--jobs", type=int, default=2, help="evaluations run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each evaluation")
    p.add_argument("--no-transfer", dest="transfer", action="store_false")
    p.add_argument(
        "--pretrain-only",
        action="store_true",
        help="build the vocabulary and pretrain + export each seed, then stop (no evaluations)",
    )
    args = p.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    t0 = time.perf_counter()
    if not (work / "vocab" / "vocab.json").exists():
        # one union vocabulary over all seven sets: every labelled set maps onto every seed's model
        run(
            [
                "sclabel-data",
                "ingest",
                *[str(args.data / f"{n}.h5ad") for n in LABELLED + UNLABELLED],
                "-o",
                str(work / "vocab"),
                "--no-progress",
                "--overwrite",
            ],
            log,
        )
    rows, infos = [], []
    for seed in args.seeds:
        info = pretrain(seed, work, args, log)
        infos.append({"seed": seed, **info})
        print(f"seed {seed}: pretrained {info['steps']} steps in {info['minutes']:.1f} min", flush=True)
        if not args.pretrain_only:
            rows += seed_rows(seed, work, args, log)
    if args.pretrain_only:
        print(f"pretrained seeds {args.seeds}: bundles in {work}/seed*/export; evaluations skipped")
        return 0
    summary = summarise(rows)
    text = markdown(summary, infos)
    (work / "summary.md").write_text(text)
    (work / "summary.json").write_text(
        json.dumps(
            {"summary": summary, "runs": rows, "pretrain": infos, "minutes": (time.perf_counter() - t0) / 60},
            indent=2,
            default=float,
        )
        + "\n"
    )
    print(text)
    print(f"wrote {work}/summary.md in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
