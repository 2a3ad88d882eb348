"""Issue 15: `sclabel predict` over many cells (cells/s with 1 and 2 processes, peak RSS), beside CellTypist.

Real cells replicated: pbmc_facs_zheng (../shared/data) is split 70/30 (stratified, seed 0); a debug and a small
bundle (fresh weights, `sclabel init-bundle`) are fine-tuned briefly on the 70%, CellTypist (SGD logistic
regression, log1p CP10k, all genes) is trained on the same 70%, and both annotate the 30% replicated to N
cells (an .h5ad written block by block). Accuracy is over the N cells (= the test cells' accuracy).
Peak RSS is the largest sum of the resident memory of the command's whole process tree (sampled 10x/s); the rows
also give the largest peak of one process in it (under torchrun: a rank).
`--methods embed` adds `sclabel embed` (the debug flavour's pretrained bundle, i.e. `init-bundle`'s) over the
same cells.

Every measured configuration is appended to <work>/results.jsonl and skipped by a later run of the same work
directory, so a long benchmark is split into commands of a few minutes each (the shared machine's lock):

  B="flock /tmp/sclabel-heavy.lock python benchmarks/predict_bench.py --work .bench/predict"
  $B --sizes 1000000 --small-sizes '' --procs 1 --methods sclabel
  $B --sizes 1000000 --small-sizes '' --procs 2 --methods sclabel
  $B --sizes 1000000 --small-sizes '' --methods celltypist --celltypist-budget 780   # again until complete
  $B --sizes 1000000 --small-sizes '' --procs 1 --methods embed

CellTypist annotates chunks of 10,000 cells and keeps each chunk's labels and seconds, so with a time budget it
stops between chunks and the next command continues; its row (seconds = the sum over chunks, peak RSS = the
largest of the commands) is written once every chunk is done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 10_000
DATA = ROOT.parent / "shared" / "data" / "pbmc_facs_zheng_fasttopics.h5ad"


def write_replicated(src, rows: np.ndarray, n: int, path: Path) -> None:
    """An .h5ad of `n` cells: the cells `rows` of `src` repeated in order, written in blocks (CSR, int32)."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    X = src.X[rows].tocsr()
    X.sort_indices()
    reps = -(-n // len(rows))
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = (n, X.shape[1])
        lengths = np.tile(np.diff(X.indptr), reps)[:n]
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        g.create_dataset("indptr", data=indptr)
        nnz = int(indptr[-1])
        data = g.create_dataset("data", shape=(nnz,), dtype=np.int32, chunks=(1 << 20,))
        indices = g.create_dataset("indices", shape=(nnz,), dtype=np.int32, chunks=(1 << 20,))
        at, done = 0, 0
        while done < n:
            k = min(len(rows), n - done)
            m = int(X.indptr[k])
            data[at : at + m] = X.data[:m].astype(np.int32)
            indices[at : at + m] = X.indices[:m]
            at, done = at + m, done + k
        write_elem(f, "obs", pd.DataFrame(index=[f"c{i}" for i in range(n)]))
        write_elem(f, "var", src.var)
        write_elem(f, "uns", {"X_is_integer_counts": True})
        for key in ("obsm", "varm", "layers", "obsp", "varp"):
            write_elem(f, key, {})
    os.replace(tmp, path)
    assert ad.read_h5ad(path, backed="r").shape == (n, X.shape[1])


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str, float]:
    """(seconds, peak RSS of the whole process tree in GB, stdout, the largest peak RSS of one process in
    the tree in GB: a rank's under torchrun) of a command."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    root = psutil.Process(proc.pid)
    peak = 0
    per_process: dict[int, int] = {}
    out_lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss = p.memory_info().rss
                    total += rss
                    per_process[p.pid] = max(per_process.get(p.pid, 0), rss)
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.1)
    reader.join()
    seconds = time.perf_counter() - t0
    text = "".join(out_lines)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{text[-3000:]}")
    return seconds, peak / 1e9, text, max(per_process.values(), default=0) / 1e9


def sclabel(*args: str) -> list[str]:
    return [sys.executable, "-m", "sclabel_dist.cli", *args]


def prepare(work: Path, flavours: list[str]) -> dict:
    import anndata as ad
    from sklearn.model_selection import train_test_split

    from sclabel_dist.vocab import GeneVocab

    src = ad.read_h5ad(DATA)
    y = src.obs["cell_type"].astype(str).to_numpy()
    train, test = train_test_split(np.arange(src.n_obs), test_size=0.3, stratify=y, random_state=0)
    train, test = np.sort(train), np.sort(test)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "train.h5ad").is_file():
        src[train].write_h5ad(work / "train.h5ad")
        GeneVocab([str(g) for g in src.var_names], [str(e) for e in src.var["ensembl"]]).to_json(
            work / "vocab.json"
        )
    for flavour in flavours:
        run = work / f"run_{flavour}"
        if (run / "model" / "SHA256SUMS").is_file():
            continue
        bundle = work / f"bundle_{flavour}"
        subprocess.run(
            sclabel("init-bundle", "--config", str(ROOT / "configs/pretrain/debug.yaml"), "--vocab",
                    str(work / "vocab.json"), "--out", str(bundle), f"--model.flavour={flavour}", "--overwrite"),
            check=True,
        )  # fmt: skip
        steps = "60" if flavour == "debug" else "25"
        subprocess.run(
            sclabel("finetune", "--model", str(bundle), "--data", str(work / "train.h5ad"), "--label-key",
                    "cell_type", "--out", str(run), "--overwrite", "--train.epochs=3", "--train.min_epochs=3",
                    f"--train.max_steps_per_epoch={steps}", "--train.refit=false"),
            check=True,
        )  # fmt: skip
    return {"src": src, "y": y, "train": train, "test": test}


def accuracy_of_table(path: Path, truth: np.ndarray) -> float:
    import pandas as pd

    pred = pd.read_parquet(path, columns=["top_label"])["top_label"].astype(str).to_numpy()
    return float((pred == truth).mean())


def celltypist_child(work: Path, data: Path, n: int, budget_s: float) -> None:
    """Train CellTypist on the training cells (once) and annotate `data` in chunks, for at most `budget_s`
    seconds; run in its own process, for its RSS. Each chunk's labels and seconds are kept (temp-and-rename)."""
    import anndata as ad
    import celltypist

    from sclabel_dist.annotate.baseline import lognormalise

    saved = work / "celltypist_model.pkl"  # CellTypist's own format (a pickle we wrote ourselves, this run)
    trained = work / "celltypist_train.json"
    if saved.is_file():
        model = celltypist.models.Model.load(str(saved))
    else:
        t0 = time.perf_counter()
        train = ad.read_h5ad(work / "train.h5ad")
        train_ad = ad.AnnData(lognormalise(train.X, "counts").astype(np.float32), var=train.var[[]])
        train_ad.obs["label"] = train.obs["cell_type"].astype(str).to_numpy()
        model = celltypist.train(
            train_ad, labels="label", check_expression=False, n_jobs=1, use_SGD=True, max_iter=1000
        )
        model.write(str(saved))
        trained.write_text(json.dumps({"train_s": time.perf_counter() - t0}))
    # CellTypist's annotate scales a dense copy of its input (100k cells x 16k genes in float64 is ~13 GB: it
    # was killed on this 23 GB machine), so it annotates chunks of CHUNK cells read from the backed file.
    parts = work / f"celltypist_{n}_parts"
    parts.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    backed = ad.read_h5ad(data, backed="r")
    for lo in range(0, n, CHUNK):
        done = parts / f"{lo:010d}.npz"
        if done.is_file():
            continue
        if time.perf_counter() - t_start > budget_s:
            break
        t0 = time.perf_counter()
        X = backed.X[lo : min(n, lo + CHUNK)]
        query = ad.AnnData(lognormalise(X, "counts").astype(np.float32), var=backed.var[[]])
        result = celltypist.annotate(query, model=model, majority_voting=False)
        pred = result.predicted_labels["predicted_labels"].astype(str).to_numpy()
        tmp = parts / f".{lo:010d}.tmp.npz"
        np.savez(tmp, labels=np.asarray(pred, dtype=str), seconds=time.perf_counter() - t0)
        os.replace(tmp, done)
    chunks = [parts / f"{lo:010d}.npz" for lo in range(0, n, CHUNK)]
    complete = all(c.is_file() for c in chunks)
    annotate_s = 0.0
    if complete:
        labels = []
        for c in chunks:
            with np.load(c) as z:
                labels.append(z["labels"])
                annotate_s += float(z["seconds"])
        np.save(work / f"celltypist_{n}.npy", np.concatenate(labels))
    train_s = json.loads(trained.read_text())["train_s"] if trained.is_file() else None
    summary = {"train_s": train_s, "annotate_s": annotate_s, "complete": complete}
    summary["chunks_done"] = sum(c.is_file() for c in chunks)
    summary["chunks"] = len(chunks)
    print(json.dumps(summary))


def machine_state() -> dict:
    """UTC time and load average, for the row (the machine is shared)."""
    return {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load": round(os.getloadavg()[0], 2)}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def record(results: Path, rows: list[dict], row: dict) -> None:
    print(json.dumps(row), flush=True)
    rows.append(row)
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=".bench/predict")
    p.add_argument("--sizes", default="100000,300000", help="numbers of cells (debug flavour)")
    p.add_argument("--small-sizes", default="20000", help="numbers of cells for the small flavour")
    p.add_argument("--procs", default="1,2")
    p.add_argument("--methods", default="sclabel,celltypist", help="any of sclabel, celltypist, embed")
    p.add_argument("--tag", default="", help="appended to the sclabel rows' method (e.g. a code version)")
    p.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16"), help="passed to predict / embed"
    )
    p.add_argument("--block-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--celltypist-budget", type=float, default=1e9, help="seconds of CellTypist chunks per run"
    )
    p.add_argument("--prepare-only", action="store_true", help="fine-tune the bundles and write the inputs")
    p.add_argument("--celltypist-child", nargs=2, metavar=("DATA", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    work = (ROOT / args.work).resolve() if not Path(args.work).is_absolute() else Path(args.work)
    if args.celltypist_child:
        celltypist_child(
            work, Path(args.celltypist_child[0]), int(args.celltypist_child[1]), args.celltypist_budget
        )
        return 0
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    methods = set(args.methods.split(","))
    sizes = {"debug": [int(s) for s in args.sizes.split(",") if s]}
    sizes["small"] = [int(s) for s in args.small_sizes.split(",") if s]
    ctx = prepare(work, [f for f, s in sizes.items() if s])
    if args.prepare_only:  # its own command: the bundles and the million-cell file take minutes
        for n in sorted({n for s in sizes.values() for n in s}):
            if not (work / f"cells_{n}.h5ad").is_file():
                write_replicated(ctx["src"], ctx["test"], n, work / f"cells_{n}.h5ad")
        return 0
    results = work / "results.jsonl"
    # rows measured by an earlier (interrupted) run of the same work directory are kept, not measured again
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    measured = {(r["method"], r["cells"], r["procs"]) for r in rows}
    tag = (f" {args.tag}" if args.tag else "") + ("" if args.precision == "auto" else f" {args.precision}")
    # every size with sclabel first, then CellTypist: the scaling figures come before the comparison
    for phase in ("sclabel", "embed", "celltypist"):
        if phase not in methods:
            continue
        for n in sorted({n for s in sizes.values() for n in s}):
            data = work / f"cells_{n}.h5ad"
            if not data.is_file():
                write_replicated(ctx["src"], ctx["test"], n, data)
            truth = np.resize(ctx["y"][ctx["test"]], n)
            flavours = [f for f, s in sizes.items() if n in s] if phase != "celltypist" else []
            if phase == "embed":
                flavours = [f for f in flavours if f == "debug"]
            for flavour in flavours:
                for nproc in [int(x) for x in args.procs.split(",")]:
                    method = (
                        f"sclabel {flavour}{tag}" if phase == "sclabel" else f"sclabel embed {flavour}{tag}"
                    )
                    if (method, n, nproc) in measured:
                        continue
                    out = work / f"pred_{flavour}_{n}_{nproc}.parquet"
                    out.unlink(missing_ok=True)
                    # predict: the fine-tuned run; embed: the pretrained bundle (the zero-shot use)
                    model = work / (f"run_{flavour}" if phase == "sclabel" else f"bundle_{flavour}")
                    flags = ["--model", str(model), "--data", str(data), "--out", str(out),
                             "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
                             "--precision", args.precision]  # fmt: skip
                    env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}
                    before = machine_state()
                    if nproc == 1:
                        cmd = sclabel("predict" if phase == "sclabel" else "embed", *flags)
                    else:
                        module = "sclabel_dist.predict" if phase == "sclabel" else "sclabel_dist.embed"
                        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", module, *flags]  # fmt: skip
                    seconds, rss, text, rss_one = run_measured(cmd, env)
                    row = {
                        "method": method, "cells": n, "procs": nproc, "seconds": round(seconds, 1),
                        "cells_per_s": round(n / seconds), "peak_rss_gb": round(rss, 2),
                        "peak_rss_one_process_gb": round(rss_one, 2),
                        "accuracy": round(accuracy_of_table(out, truth), 4) if phase == "sclabel" else None,
                        "inference_line": next((ln for ln in text.splitlines() if ln.startswith("inference:")), ""),
                        "start": before, "end": machine_state(),
                    }  # fmt: skip
                    record(results, rows, row)
                    out.unlink(missing_ok=True)
            if phase != "celltypist" or ("celltypist (SGD)", n, 1) in measured:
                continue
            progress = work / f"celltypist_{n}_parts" / "runs.json"
            before = machine_state()
            seconds, rss, text, _ = run_measured(
                [sys.executable, __file__, "--work", str(work), "--celltypist-child", str(data), str(n),
                 "--celltypist-budget", str(args.celltypist_budget)]
            )  # fmt: skip
            times = json.loads(text.strip().splitlines()[-1])
            runs = json.loads(progress.read_text()) if progress.is_file() else []
            runs.append({"peak_rss_gb": round(rss, 2), "seconds": round(seconds, 1), "start": before,
                         "end": machine_state(), "chunks_done": times["chunks_done"]})  # fmt: skip
            tmp = progress.with_suffix(".tmp")
            tmp.write_text(json.dumps(runs, indent=1))
            os.replace(tmp, progress)
            if not times["complete"]:
                print(
                    f"CellTypist at {n:,} cells: {times['chunks_done']} of {times['chunks']} chunks; run again"
                )
                continue
            pred = np.load(work / f"celltypist_{n}.npy")
            row = {
                "method": "celltypist (SGD)", "cells": n, "procs": 1, "seconds": round(times["annotate_s"], 1),
                "cells_per_s": round(n / times["annotate_s"]), "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
                "accuracy": round(float((pred == truth).mean()), 4), "train_s": times["train_s"],
                "commands": len(runs), "start": runs[0]["start"], "end": runs[-1]["end"],
            }  # fmt: skip
            record(results, rows, row)
    print("\n| method | cells | processes | seconds | cells/s | peak RSS (GB) | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['accuracy']:.3f}" if r.get("accuracy") is not None else "-"
        print(
            f"| {r['method']} | {r['cells']:,} | {r['procs']} | {r['seconds']} | {r['cells_per_s']:,} | "
            f"{r['peak_rss_gb']} | {acc} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
