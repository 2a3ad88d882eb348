"""Label efficiency and transfer: where does pretraining pay? (issues 16 and 21)

Per seed (the README baseline's stratified 70/30 split, random_state = seed):
  1. the pretraining corpus and model of `annotation_bench.py` (every shared set pooled, pbmc3k included,
     never a test cell; the Drop-seq batch of cellbench left out), pretrained under torchrun + DeepSpeed and
     exported, plus the same model with fresh weights (the from-scratch arm); reused when already there;
  2. per labelled set and per k in --k (labelled cells per class, all cells of smaller classes; 0 = the whole
     training split), the same k cells for every arm, drawn from the training split (annotate.splits.
     few_shot_split), scored on the fixed test split:
       pretrained + fine-tuned, the same model from scratch, logistic regression (the README baseline on the
       same cells), CellTypist (its own logistic regression, trained on the same cells);
  3. transfer: train on one set's training split (k per class), test on another's test split, on the
     classes they share (TRANSFERS below: the label mapping), all four arms.
Rows go to WORK/rows/*.json as they finish (a rerun skips what is done); the summary table is WORK/summary.md,
the plot WORK/label_efficiency.png.

    python benchmarks/label_efficiency.py --work .bench/label_efficiency --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import annotation_bench as ab  # noqa: E402  (the shared pretraining corpus and model)

LABEL_KEY = "cell_type"
ARMS = ("pretrained", "scratch", "logistic regression", "celltypist")
# Transfers: (name, source set, target set, mapping of each set's labels to the shared class names; labels
# outside the mapping are left out). B, T and NK cells of mouse spleen-type immune cells (Tabula Muris,
# droplet) against CD45+ mouse lung cells (Zilionis, another lab and protocol, log values, upper-case genes).
TABULA_ZILIONIS = {
    "tabula_muris_immune_actinn": {"B cell": "B", "T cell": "T", "NK cell": "NK"},
    "zilionis_mouse_lung": {"B cells": "B", "T cells": "T", "NK cells": "NK"},
}
TRANSFERS = (
    ("tabula -> zilionis", "tabula_muris_immune_actinn", "zilionis_mouse_lung", TABULA_ZILIONIS),
    ("zilionis -> tabula", "zilionis_mouse_lung", "tabula_muris_immune_actinn", TABULA_ZILIONIS),
)


def mapped_labels(inp, mapping: dict[str, str] | None) -> np.ndarray:
    from sclabel_dist.annotate.h5ad import read_labels

    labels = read_labels(inp, LABEL_KEY)
    if mapping is None:
        return labels
    return np.array([mapping.get(v) if v is not None else None for v in labels], dtype=object)


def task_data(task: dict, bundle, cfg, seed: int):
    """(Prepared input in the bundle's gene space, full Split) of a set or a transfer pair, for `seed`.

    A transfer stacks source and target cells (both log-normalised, in the vocabulary's gene space): the
    split's training part comes from the source's training split, its test part is the target's test split.
    """
    from sclabel_dist.annotate.baseline import lognormalise
    from sclabel_dist.annotate.h5ad import read_h5ad
    from sclabel_dist.annotate.pipeline import Prepared, make_split, prepare_input
    from sclabel_dist.annotate.splits import Split

    quiet = lambda *_: None  # noqa: E731
    cfg.train.seed = seed
    if task["kind"] == "set":
        inp = read_h5ad(task["data"] / f"{task['name']}.h5ad")
        return prepare_input(bundle, inp, cfg, quiet), make_split(mapped_labels(inp, None), inp, cfg, None)
    parts = []
    for name in (task["source"], task["target"]):
        inp = read_h5ad(task["data"] / f"{name}.h5ad")
        prep = prepare_input(bundle, inp, cfg, quiet)
        labels = mapped_labels(inp, task["mapping"][name])
        parts.append((prep, make_split(labels, inp, cfg, None), labels))
    (src, src_split, src_labels), (tgt, tgt_split, tgt_labels) = parts
    import scipy.sparse as sp

    csr = sp.vstack(
        [lognormalise(src.csr, src.value_kind), lognormalise(tgt.csr, tgt.value_kind)], format="csr"
    ).astype(np.float32)
    classes = sorted(set(src_split.classes) & set(tgt_split.classes))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(v, -1) for v in [*src_labels, *tgt_labels]], dtype=np.int64)
    n = src.csr.shape[0]
    keep = lambda idx, off: idx[y[idx + off] >= 0] + off  # noqa: E731
    split = Split(keep(src_split.train, 0), keep(src_split.val, 0), keep(tgt_split.test, n), classes, y, [])
    return Prepared(csr, src.tok_cfg, "lognorm", src.match_report, src.value_note), split


def celltypist_predict(X, value_kind: str, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """CellTypist trained on the training cells (log1p CP10k, all genes; SGD logistic regression), predicting
    the test cells."""
    import anndata
    import celltypist

    from sclabel_dist.annotate.baseline import lognormalise

    Xn = lognormalise(X, value_kind).astype(np.float32)
    genes = [f"g{i}" for i in range(X.shape[1])]
    train_ad = anndata.AnnData(Xn[train], var={"gene": genes})
    train_ad.var_names = genes
    train_ad.obs["label"] = y[train].astype(str)
    # CellTypist 1.7.1's default (sklearn LogisticRegression(multi_class=...)) fails on scikit-learn >= 1.8,
    # which removed that argument; its SGD logistic regression is the path that runs.
    model = celltypist.train(
        train_ad, labels="label", check_expression=False, n_jobs=1, use_SGD=True, max_iter=1000
    )
    test_ad = anndata.AnnData(Xn[test])
    test_ad.var_names = genes
    pred = celltypist.annotate(test_ad, model=model, majority_voting=False).predicted_labels
    return pred["predicted_labels"].astype(int).to_numpy()


def run_job(job: dict) -> list[dict]:
    """One (task, seed, arm, k): a fine-tuning or a baseline, as a one-row list."""
    import torch

    torch.set_num_threads(1)
    from accelerate import Accelerator

    from sclabel_dist.annotate import baseline
    from sclabel_dist.annotate.pipeline import fit
    from sclabel_dist.annotate.report import classification_metrics
    from sclabel_dist.annotate.splits import EVALUATE_TEST_FRACTION, few_shot_split
    from sclabel_dist.bundle import load_bundle
    from sclabel_dist.config import FinetuneConfig, load_config

    cfg = load_config(FinetuneConfig, job["finetune_config"], job["overrides"])
    cfg.data.test_fraction = EVALUATE_TEST_FRACTION  # the README baseline's 70/30: every arm is scored on it
    seed, arm = job["seed"], job["arm"]
    bundle = load_bundle(Path(job["bundles"]["scratch" if arm == "scratch" else "pretrained"]))
    prep, full = task_data(job["task"], bundle, cfg, seed)
    accelerator = Accelerator(cpu=True)
    rows = []
    for k in [job["k"]]:
        cfg.train.seed = seed
        split = few_shot_split(full, k, seed=seed, val_fraction=cfg.data.val_fraction) if k else full
        cells = np.sort(np.concatenate([split.train, split.val]))
        t0 = time.perf_counter()
        extra = {}
        if arm == "logistic regression":
            pred = baseline.fit_predict(prep.csr, split.y, cells, split.test, prep.value_kind, seed=seed)
        elif arm == "celltypist":
            pred = celltypist_predict(prep.csr, prep.value_kind, split.y, cells, split.test)
        else:
            fitted = fit(bundle, prep, split, cfg, accelerator, log=lambda *_: None)
            pred = fitted.test_prob.argmax(1)
            extra = {"best_epoch": fitted.train.best_epoch, "steps": fitted.train.steps}
        m = classification_metrics(split.y[split.test], pred, split.classes)
        rows.append(
            {
                "task": job["task"]["label"],
                "seed": seed,
                "arm": arm,
                "k": k,
                "train_cells": len(cells),
                "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"],
                "minutes": (time.perf_counter() - t0) / 60,
                **extra,
            }
        )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["task"], r["k"], r["arm"]) for r in rows}, key=lambda t: (t[0], t[1] or 10**6, t[2]))
    for task, k, arm in keys:
        sel = [r for r in rows if (r["task"], r["k"], r["arm"]) == (task, k, arm)]
        f1, acc = np.array([r["macro_f1"] for r in sel]), np.array([r["accuracy"] for r in sel])
        sd = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0  # noqa: E731
        out.append(
            {
                "task": task,
                "k": k,
                "arm": arm,
                "seeds": len(sel),
                "macro_f1": float(f1.mean()),
                "macro_f1_sd": sd(f1),
                "accuracy": float(acc.mean()),
                "accuracy_sd": sd(acc),
            }
        )
    return out


def markdown(summary: list[dict]) -> str:
    """One row per (task, k), one column per arm: macro-F1 ± sd / accuracy."""
    lines = ["| task | k | " + " | ".join(ARMS) + " |", "|---|---|" + "---|" * len(ARMS)]
    for task, k in dict.fromkeys((s["task"], s["k"]) for s in summary):
        cells = []
        for arm in ARMS:
            s = next((s for s in summary if (s["task"], s["k"], s["arm"]) == (task, k, arm)), None)
            cells.append(
                "" if s is None else f"{s['macro_f1']:.3f} ± {s['macro_f1_sd']:.3f} / {s['accuracy']:.3f}"
            )
        lines.append(f"| {task} | {k or 'all'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    """Macro-F1 against labelled cells per class, one panel per task, one line per arm (± sd bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(s["task"] for s in summary))
    cols = 4
    fig, axes = plt.subplots(
        (len(tasks) + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((len(tasks) + 3) // 4))
    )
    for ax, task in zip(np.ravel(axes), tasks, strict=False):
        ks = sorted({s["k"] for s in summary if s["task"] == task}, key=lambda k: k or 10**6)
        xs = np.arange(len(ks))
        for arm in ARMS:
            pts = [
                next((s for s in summary if (s["task"], s["k"], s["arm"]) == (task, k, arm)), None)
                for k in ks
            ]
            if any(p is None for p in pts):
                continue
            mean, sd = np.array([p["macro_f1"] for p in pts]), np.array([p["macro_f1_sd"] for p in pts])
            ax.plot(xs, mean, marker="o", label=arm)
            ax.fill_between(xs, mean - sd, mean + sd, alpha=0.15)
        ax.set_xticks(xs, [str(k or "all") for k in ks])
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("labelled cells per class")
        ax.set_ylabel("macro-F1")
    for ax in np.ravel(axes)[len(tasks) :]:
        ax.axis("off")
    np.ravel(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from sclabel_dist.bundle import load_bundle
    from sclabel_dist.fresh import fresh_bundle_like

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(".bench/label_efficiency"))
    p.add_argument(
        "--data", type=Path, default=Path(os.environ.get("SHARED_DATA", REPO.parent / "shared/data"))
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[10, 25, 5, 50, 0],
        help="cells per class, run in this order; 0 = all",
    )
    p.add_argument("--sets", nargs="+", default=list(ab.LABELLED), choices=ab.LABELLED)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--no-transfer", dest="transfer", action="store_false")
    p.add_argument("--pretrain-config", default=str(REPO / "configs/pretrain/shared_sets.yaml"))
    p.add_argument(
        "--pretrain-steps", type=int, default=0, help="override train.max_steps (0 = the config's)"
    )
    p.add_argument("--finetune-config", default=str(REPO / "configs/finetune/default.yaml"))
    p.add_argument("--jobs", type=int, default=2, help="fine-tunings run at once (one torch thread each)")
    p.add_argument("overrides", nargs="*", help="fine-tune config overrides, --section.key=value")
    args, extra = p.parse_known_args(argv)
    overrides = [*args.overrides, *extra]
    work = args.work
    (work / "rows").mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    t0 = time.perf_counter()
    if not (work / "vocab" / "vocab.json").exists():
        names = ab.LABELLED + ab.UNLABELLED
        ab.run(
            [
                "sclabel-data",
                "ingest",
                *[str(args.data / f"{n}.h5ad") for n in names],
                "-o",
                str(work / "vocab"),
            ]
            + ["--no-progress", "--overwrite"],
            log,
        )
    tasks = [{"kind": "set", "name": s, "label": s, "data": args.data} for s in args.sets]
    if args.transfer:
        tasks += [
            {"kind": "transfer", "label": name, "source": s, "target": t, "mapping": m, "data": args.data}
            for name, s, t, m in TRANSFERS
        ]
    for seed in args.seeds:
        info = ab.pretrain(seed, work, args, log)
        print(f"seed {seed}: pretrained {info['steps']} steps in {info['minutes']:.1f} min", flush=True)
        scratch = work / f"seed{seed}/scratch"
        if not (scratch / "config.json").is_file():  # the from-scratch arm: the same model, fresh weights
            fresh_bundle_like(load_bundle(work / f"seed{seed}/export"), scratch, seed=seed)
    # k outermost, in the order given: one k's table is complete before the next k starts
    jobs = [
        {
            "task": task,
            "seed": seed,
            "arm": arm,
            "k": k,
            "bundles": {
                "pretrained": str(work / f"seed{seed}/export"),
                "scratch": str(work / f"seed{seed}/scratch"),
            },
            "finetune_config": args.finetune_config,
            "overrides": overrides,
        }
        for k in args.k
        for seed in args.seeds
        for task in tasks
        for arm in args.arms
    ]
    todo = []
    for job in jobs:
        name = f"{job['task']['label']}_{job['seed']}_{job['arm']}_k{job['k']}"
        out = work / "rows" / (name.replace(" -> ", "_to_").replace(" ", "_") + ".json")
        job["out"] = out
        if not out.exists():
            todo.append(job)
    print(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already done; running {len(todo)}", flush=True)
    import multiprocessing as mp

    failed = 0
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job): job for job in todo}
        for future in as_completed(futures):  # each row is kept as soon as it exists
            job = futures[future]
            what = f"{job['task']['label']} seed {job['seed']} {job['arm']} k={job['k']}"
            try:
                rows = future.result()
            except Exception as exc:  # one arm failing must not lose the others' hours
                failed += 1
                print(f"  FAILED {what}: {type(exc).__name__}: {exc}", flush=True)
                continue
            tmp = job["out"].with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=1) + "\n")
            tmp.replace(job["out"])
            print(f"  {what}: macro-F1 {rows[0]['macro_f1']:.3f}", flush=True)
    rows = [r for f in sorted((work / "rows").glob("*.json")) for r in json.loads(f.read_text())]
    summary = summarise(rows)
    text = markdown(summary)
    (work / "summary.md").write_text(text)
    (work / "summary.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    plot(summary, work / "label_efficiency.png")
    print(text)
    print(f"wrote {work}/summary.md and label_efficiency.png in {(time.perf_counter() - t0) / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
