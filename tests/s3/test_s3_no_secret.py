"""No credential is ever written: a whole run from an s3:// store (ingest, validate, inspect, pretraining under
torchrun with checkpoints, TensorBoard and logs, export to a bundle) is grepped for the AWS secrets it ran with.

The usual leak is a saved configuration (the run config in sclabel_state.json and in the bundle's config.json,
the TensorBoard text) or an environment dumped into a log; the test would catch either (see
`test_the_scan_finds_a_planted_secret`, which plants one and checks the scan names the file)."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from train._helpers import base_env, torchrun
from train.test_pretrain_dist import TINY

from sclabel_dist.data.stores.location import as_path

# Distinctive values for this test only: a leak anywhere shows up as one of these byte strings.
LEAK_KEY_ID = "AKIASCLABELLEAKTEST7Q"
LEAK_SECRET = "sclabel/LeakTest+Secret/9f3c7a1e5b2d4c6e8a0b"
LEAK_TOKEN = "IQoJb3JpZ2luX2VjEsclabelLeakTestSessionToken0123456789"
LEAKS = (LEAK_KEY_ID, LEAK_SECRET, LEAK_TOKEN)


def _members(name: str, raw: bytes) -> list[tuple[str, bytes]]:
    """The file's bytes, plus the decompressed members of a zip (torch .pt files) or a gzip stream."""
    out = [(name, raw)]
    if raw[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            out += [(f"{name}!{m}", z.read(m)) for m in z.namelist()]
    elif raw[:2] == b"\x1f\x8b":
        out.append((f"{name}!gunzip", gzip.decompress(raw)))
    return out


def find_leaks(blobs: list[tuple[str, bytes]]) -> list[str]:
    """'name: secret' for every blob (or member of one) that contains one of LEAKS."""
    found = []
    for name, raw in blobs:
        for where, data in _members(name, raw):
            found += [f"{where}: {s}" for s in LEAKS if s.encode() in data]
    return found


def files_under(*roots: Path) -> list[tuple[str, bytes]]:
    return [(str(f), f.read_bytes()) for r in roots for f in sorted(r.rglob("*")) if f.is_file()]


@pytest.fixture
def leaky_env(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test bucket reached with the distinctive key, secret and session token (moto accepts any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LEAK_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LEAK_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", LEAK_TOKEN)
    return s3_bucket


def _cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", *args],
        env=base_env(TMPDIR=str(tmp)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode in (0, 1), r.stderr[-3000:]
    return r


def test_no_secret_in_index_checkpoint_logs_or_bundle(
    store_h5ad: list[Path], leaky_env: str, tmp_path: Path
) -> None:
    url = f"s3://{leaky_env}/leak"
    root, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    outputs = []
    ingest = ("data_tools", "ingest", str(store_h5ad[0]), "-o", url, "--no-progress", "--tmp-dir", str(tmp))
    outputs.append(_cli(*ingest, "--rows-per-shard", "200", tmp=tmp))
    outputs += [_cli("data_tools", "validate", url, tmp=tmp), _cli("data_tools", "inspect", url, tmp=tmp)]
    assert outputs[1].returncode == 0, outputs[1].stdout
    # A few steps from the s3:// store on 2 ranks, with a validation pass, TensorBoard, and two checkpoints.
    run = torchrun(
        [
            *TINY,
            f"--data.stores=[{url}]",
            "--data.chunk_size=16",
            "--data.shuffle_chunks=4",
            "--data.val_fraction=0.1",
            "--data.read_threads=1",
            "--train.max_steps=4",
            "--train.val_every=2",
            "--checkpoint.every=2",
            f"--checkpoint.dir={root / 'ckpt'}",
            f"--log.dir={root / 'logs'}",
            "--log.tensorboard=true",
        ],
        env=base_env(TMPDIR=str(tmp)),
    )
    outputs += [run, _cli("sclabel_dist.cli", "export", str(root / "ckpt"), str(root / "bundle"), tmp=tmp)]
    assert outputs[-1].returncode == 0, outputs[-1].stderr[-3000:]

    written = files_under(root, tmp)
    names = {Path(n).name for n, _ in written}
    # what the scan must cover: the run state (config, loader, vocabulary hash), DeepSpeed's shards,
    # the JSONL log, TensorBoard's events, the bundle
    assert {"sclabel_state.json", "metrics.jsonl", "config.json", "model.safetensors"} <= names, names
    assert any(n.startswith("events.out.tfevents") for n in names), names
    assert any(n.endswith(".pt") for n in names), names
    objects = [(str(o), o.read_bytes()) for o in as_path(url).rglob("*")]
    assert any(n.endswith("/index.json") for n, _ in objects)
    texts = [(f"output of {' '.join(r.args[:4])}", (r.stdout + r.stderr).encode()) for r in outputs]
    assert find_leaks([*written, *objects, *texts]) == []


def test_the_scan_finds_a_planted_secret(tmp_path: Path) -> None:
    """The scan above can fail: a secret in a saved config (plain JSON, or pickled inside a torch zip) is found."""
    import json

    import torch

    (tmp_path / "ckpt").mkdir()
    state = {"config": {"data": {"stores": ["s3://b/x"]}, "env": {"AWS_SECRET_ACCESS_KEY": LEAK_SECRET}}}
    (tmp_path / "ckpt" / "sclabel_state.json").write_text(json.dumps(state))
    torch.save({"client_state": {"token": LEAK_TOKEN}}, tmp_path / "ckpt" / "mp_rank_00_model_states.pt")
    found = find_leaks(files_under(tmp_path))
    assert any("sclabel_state.json: " + LEAK_SECRET in f for f in found), found
    assert any("mp_rank_00_model_states.pt" in f and LEAK_TOKEN in f for f in found), found
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != LEAK_SECRET  # the planted value, not a live one
