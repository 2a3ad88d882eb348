"""predict / embed over blocks (issue 15): results independent of block size, reader and process count; the
annotated .h5ad's X copied byte for byte; a killed run resumed; bad inputs refused with nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import gene_names, make_bundle, make_counts, write_h5ad

from sclabel_dist.cli import main

ROOT = Path(__file__).resolve().parents[2]
NUM_GENES = 200  # as conftest.py's tiny set


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    """320 unlabelled cells, X gzip-compressed CSR with a counts layer and an extra obs column."""
    import anndata as ad
    import pandas as pd

    X1, _ = make_counts(num_genes=NUM_GENES, seed=5)
    X2, _ = make_counts(num_genes=NUM_GENES, seed=6)
    X = sp.vstack([X1, X2]).tocsr()
    adata = ad.AnnData(
        X=X.astype(np.float32),
        obs=pd.DataFrame(
            {"donor": ["a", "b"] * (X.shape[0] // 2)}, index=[f"c{i}" for i in range(X.shape[0])]
        ),
        var=pd.DataFrame(index=gene_names(NUM_GENES)),
        layers={"counts": X.copy()},
    )
    path = tmp_path_factory.mktemp("stream") / "cells.h5ad"
    adata.write_h5ad(path, compression="gzip")
    return path


def table(path: Path):
    import pandas as pd

    return pd.read_parquet(path)


def same_results(a, b, *, labels: bool = True) -> None:
    assert list(a["cell"]) == list(b["cell"])
    np.testing.assert_allclose(np.stack(a["embedding"]), np.stack(b["embedding"]), atol=1e-5)
    if labels:
        assert list(a["top_label"]) == list(b["top_label"])
        np.testing.assert_allclose(a["confidence"], b["confidence"], atol=1e-5)


def predict(*argv: str) -> None:
    assert main(["predict", *argv]) == 0


def test_block_size_and_backed_vs_in_memory_give_the_same_results(finetuned, unlabelled, tmp_path):
    base = ["--model", str(finetuned), "--data", str(unlabelled)]
    predict(*base, "--out", str(tmp_path / "b7.parquet"), "--block-size", "7", "--batch-size", "5")
    predict(*base, "--out", str(tmp_path / "b1k.parquet"), "--block-size", "1000")
    predict(*base, "--out", str(tmp_path / "mem.parquet"), "--in-memory", "--block-size", "100")
    first = table(tmp_path / "b7.parquet")
    assert len(first) == 320 and first["cell"][0] == "c0"
    assert set(first["label"]) <= {"type_0", "type_1", "type_2", "type_3", "Unassigned"}
    assert (first["top1_label"] == first["top_label"]).all() and (
        first["top1_prob"] >= first["top2_prob"]
    ).all()
    for other in ("b1k", "mem"):
        same_results(first, table(tmp_path / f"{other}.parquet"))
    # the layer holds the same counts as X: the same results through --layer
    predict(*base, "--out", str(tmp_path / "layer.parquet"), "--layer", "counts")
    same_results(first, table(tmp_path / "layer.parquet"))


def test_bf16_on_cpu_gives_float32_outputs_close_to_fp32(finetuned, unlabelled, tmp_path):
    """--precision bf16 runs the model under CPU autocast: the outputs stay float32 and near the exact ones
    (bf16 keeps 8 bits of mantissa); labels may differ only where the two top probabilities nearly tie."""
    base = ["--model", str(finetuned), "--data", str(unlabelled)]
    predict(*base, "--out", str(tmp_path / "fp32.parquet"))
    predict(*base, "--out", str(tmp_path / "bf16.parquet"), "--precision", "bf16", "--block-size", "50")
    exact, fast = table(tmp_path / "fp32.parquet"), table(tmp_path / "bf16.parquet")
    assert list(exact["cell"]) == list(fast["cell"])
    emb_exact, emb_fast = np.stack(exact["embedding"]), np.stack(fast["embedding"])
    assert emb_fast.dtype == np.float32
    assert not np.array_equal(emb_exact, emb_fast)  # autocast really ran: bf16 rounding shows
    cos = (emb_exact * emb_fast).sum(1) / np.linalg.norm(emb_exact, axis=1) / np.linalg.norm(emb_fast, axis=1)
    assert cos.min() > 0.99
    np.testing.assert_allclose(fast["confidence"], exact["confidence"], atol=0.05)
    differ = exact["top_label"] != fast["top_label"]
    margin = exact["top1_prob"] - exact["top2_prob"]
    assert (margin[differ] < 0.05).all()


def test_small_output_matches_stream_output_and_x_is_copied_byte_for_byte(finetuned, unlabelled, tmp_path):
    import anndata as ad
    import h5py

    base = ["--model", str(finetuned), "--data", str(unlabelled)]
    predict(*base, "--out", str(tmp_path / "mem.h5ad"))  # today's in-memory output, CSV beside it
    predict(*base, "--out", str(tmp_path / "big.h5ad"), "--output", "stream", "--block-size", "50")
    assert (tmp_path / "mem.csv").is_file() and (tmp_path / "big.parquet").is_file()
    mem, big = ad.read_h5ad(tmp_path / "mem.h5ad"), ad.read_h5ad(tmp_path / "big.h5ad")
    for col in ("sclabel_label", "sclabel_top_label"):
        assert list(mem.obs[col].astype(str)) == list(big.obs[col].astype(str))
    np.testing.assert_allclose(mem.obs["sclabel_confidence"], big.obs["sclabel_confidence"], atol=1e-5)
    np.testing.assert_allclose(mem.obsm["X_sclabel"], big.obsm["X_sclabel"], atol=1e-5)
    assert list(big.obs["donor"]) == list(mem.obs["donor"]) and len(big.uns["sclabel"]["classes"]) == 4
    with h5py.File(unlabelled) as src, h5py.File(tmp_path / "big.h5ad") as dst:
        for group in ("X", "layers/counts"):
            for name in ("data", "indices", "indptr"):
                a, b = src[f"{group}/{name}"], dst[f"{group}/{name}"]
                assert a.dtype == b.dtype and a.compression == b.compression == "gzip"
                assert a.chunks == b.chunks
                for i in range(a.id.get_num_chunks()):  # the stored (compressed) bytes, not just the values
                    offset = a.id.get_chunk_info(i).chunk_offset
                    assert a.id.read_direct_chunk(offset) == b.id.read_direct_chunk(offset)
            a, b = src[group].attrs, dst[group].attrs
            assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_embed_pretrained_and_finetuned_bundles(tiny_bundle, finetuned, unlabelled, tmp_path):
    import anndata as ad

    assert (
        main(
            [
                "embed",
                "--model",
                str(tiny_bundle),
                "--data",
                str(unlabelled),
                "--out",
                str(tmp_path / "e.h5ad"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "embed",
                "--model",
                str(tiny_bundle),
                "--data",
                str(unlabelled),
                "--out",
                str(tmp_path / "e.parquet"),
                "--block-size",
                "9",
            ]
        )
        == 0
    )
    emb = ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_sclabel"]
    t = table(tmp_path / "e.parquet")
    assert emb.shape == (320, 32) and list(t.columns) == ["cell", "embedding"]
    np.testing.assert_allclose(np.stack(t["embedding"]), emb, atol=1e-5)
    # a fine-tuned bundle's embedding is the one predict writes
    assert (
        main(
            [
                "embed",
                "--model",
                str(finetuned),
                "--data",
                str(unlabelled),
                "--out",
                str(tmp_path / "f.parquet"),
            ]
        )
        == 0
    )
    predict("--model", str(finetuned), "--data", str(unlabelled), "--out", str(tmp_path / "p.parquet"))
    same_results(table(tmp_path / "f.parquet"), table(tmp_path / "p.parquet"), labels=False)


def test_cell_store_and_soma_inputs_give_the_h5ad_results(finetuned, unlabelled, tmp_path):
    data_cli = [sys.executable, "-m", "data_tools.cli"]
    store, soma = tmp_path / "store", tmp_path / "soma"
    vocab = str(Path(finetuned) / "model" / "vocab.json")
    for cmd in (
        [*data_cli, "ingest", str(unlabelled), "-o", str(store), "--vocab", vocab, "--no-progress"],
        [*data_cli, "to-soma", str(unlabelled), "--out", str(soma), "--quiet"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    predict("--model", str(finetuned), "--data", str(unlabelled), "--out", str(tmp_path / "h.parquet"))
    ref = table(tmp_path / "h.parquet")
    for src in (store, soma):
        predict(
            "--model",
            str(finetuned),
            "--data",
            str(src),
            "--out",
            str(tmp_path / f"{src.name}.parquet"),
            "--block-size",
            "64",
        )
        got = table(tmp_path / f"{src.name}.parquet")
        ref_named = ref.assign(cell=list(got["cell"]))  # a store names cells dataset:row
        same_results(got, ref_named)
    assert table(tmp_path / "store.parquet")["cell"][3] == "cells:3"


@pytest.mark.parametrize(("gene_bag", "encoding"), [(True, "binned"), (False, "continuous")])
def test_the_inference_path_gives_the_full_forwards_outputs(gene_bag, encoding):
    """cell_outputs (CLS only, last block's CLS row alone, no MLM head) = forward's cell embedding and logits,
    on a padded batch (cells of 3 to 40 tokens)."""
    import torch

    from sclabel_dist.model.args import ModelArgs
    from sclabel_dist.model.net import ScLabelNet

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=60, dim=32, depth=3, heads=4, num_classes=5, gene_bag=gene_bag,
                     value_encoding=encoding, mvc=True, contrastive=0.5)  # fmt: skip
    model = ScLabelNet(args).eval()
    b, length = 6, 40
    lengths = torch.tensor([40, 3, 17, 40, 25, 8])
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(2, 60, (b, length)) * mask
    values = (torch.randint(1, 52, (b, length)) if encoding == "binned" else torch.rand(b, length)) * mask
    bag = None
    if gene_bag:
        offsets = torch.tensor([0, 10, 12, 30, 31, 50])
        bag = (torch.randint(2, 60, (60,)), offsets, torch.rand(60))
    with torch.inference_mode():
        full = model(ids, values, mask, bag=bag)
        cell, logits = model.cell_outputs(ids, values, mask, bag=bag)
    assert cell.shape == full.cell_embedding.shape and logits.shape == full.logits.shape
    torch.testing.assert_close(cell, full.cell_embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, full.logits, atol=1e-5, rtol=0)
    assert not torch.equal(cell[0], cell[3])  # not a degenerate model


def torchrun(nproc: int, module: str, *argv: str, port: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={port}", "-m", module, *argv,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_and_two_processes_give_the_same_results(finetuned, unlabelled, tmp_path):
    import anndata as ad

    outs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}.h5ad"
        proc = torchrun(
            n, "sclabel_dist.predict", "--model", str(finetuned), "--data", str(unlabelled), "--out", str(out),
            "--output", "stream", "--block-size", "60", port=free_port(),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[n] = out
    same_results(table(tmp_path / "p1.parquet"), table(tmp_path / "p2.parquet"))
    a, b = ad.read_h5ad(outs[1]), ad.read_h5ad(outs[2])
    assert list(a.obs["sclabel_label"].astype(str)) == list(b.obs["sclabel_label"].astype(str))
    np.testing.assert_allclose(a.obsm["X_sclabel"], b.obsm["X_sclabel"], atol=1e-5)
    proc = torchrun(
        2,
        "sclabel_dist.embed",
        "--model",
        str(finetuned),
        "--data",
        str(unlabelled),
        "--out",
        str(tmp_path / "e2.parquet"),
        port=free_port(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(
        np.stack(table(tmp_path / "e2.parquet")["embedding"]), a.obsm["X_sclabel"], atol=1e-5
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "e2.parquet",
        "p1.h5ad",
        "p1.parquet",
        "p2.h5ad",
        "p2.parquet",
    ]


def test_a_killed_run_leaves_nothing_complete_and_a_rerun_finishes(finetuned, unlabelled, tmp_path):
    import anndata as ad

    big = tmp_path / "in" / "big.h5ad"
    big.parent.mkdir()
    small = ad.read_h5ad(unlabelled)
    ad.AnnData(X=sp.vstack([small.X] * 40).tocsr(), var=small.var).write_h5ad(big)  # 12,800 cells
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "a.h5ad"
    cmd = [sys.executable, "-m", "sclabel_dist.cli", "predict", "--model", str(finetuned), "--data", str(big)]
    cmd += ["--out", str(out), "--output", "stream", "--block-size", "200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    work = out_dir / ".a.h5ad.sclabel-parts"
    deadline = time.time() + 300
    while len(list(work.glob("part_*.npz"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(work.glob("part_*.npz")))
    assert 3 <= done_before < 64, "the run was not killed mid-way"
    assert [p.name for p in out_dir.iterdir()] == [work.name]  # no output under a final name
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming: {done_before} block(s)" in rerun.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.h5ad", "a.parquet"]
    fresh = tmp_path / "fresh.parquet"
    predict("--model", str(finetuned), "--data", str(big), "--out", str(fresh), "--block-size", "4096")
    same_results(table(out_dir / "a.parquet"), table(fresh))
    assert len(ad.read_h5ad(out).obs) == 12800


def refused(capsys, argv: list[str], out_dir: Path, *expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if "error:" in ln]
    assert len(lines) == 1 and all(e in lines[0] for e in expected), err
    assert list(out_dir.iterdir()) == []


def test_bad_inputs_give_one_line_exit_2_and_write_nothing(
    capsys, finetuned, tiny_bundle, unlabelled, tmp_path
):
    X, _ = make_counts(num_genes=NUM_GENES)
    other = write_h5ad(tmp_path / "other.h5ad", X, {}, [f"Other{i}" for i in range(NUM_GENES)])
    scaled = write_h5ad(
        tmp_path / "scaled.h5ad", (X.astype(np.float32) * -0.5).tocsr(), {}, gene_names(NUM_GENES)
    )
    log2 = X.astype(np.float32).multiply(1e6 / X.sum(axis=1)).tocsr()
    log2.data = np.log2(1 + log2.data)
    log2cpm = write_h5ad(tmp_path / "log2cpm.h5ad", log2, {}, gene_names(NUM_GENES))
    csc = tmp_path / "csc.h5ad"
    write_h5ad(csc, X.tocsc(), {}, gene_names(NUM_GENES))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    continuous = make_bundle(tmp_path / "cont", gene_names(NUM_GENES), value_encoding="continuous")
    model = ["--model", str(finetuned)]
    for command, bundle in (("predict", finetuned), ("embed", tiny_bundle)):
        for out in ("a.h5ad", "a.parquet"):
            args = [command, "--model", str(bundle), "--out", str(out_dir / out)]
            refused(capsys, [*args, "--data", str(other)], out_dir, "only 0 of 200 genes match")
            refused(capsys, [*args, "--data", str(scaled)], out_dir, "negative expression values")
            refused(
                capsys,
                [*args, "--data", str(unlabelled), "--layer", "spliced"],
                out_dir,
                "no layer 'spliced'",
                "counts",
            )
            refused(capsys, [*args, "--data", str(csc)], out_dir, "csc_matrix", "--in-memory")
    embed = ["embed", "--model", str(continuous), "--data", str(log2cpm), "--out", str(out_dir / "c.parquet")]
    refused(capsys, embed, out_dir, "not log1p(counts per 10k)")
    refused(
        capsys,
        ["predict", *model, "--data", str(tmp_path / "store_missing"), "--out", str(out_dir / "x.parquet")],
        out_dir,
        "no such",
    )
    # A CSC file is read whole when asked to.
    predict(*model, "--data", str(csc), "--out", str(out_dir / "csc.parquet"), "--in-memory")
