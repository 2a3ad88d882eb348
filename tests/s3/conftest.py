"""An S3-compatible server on loopback for the object-storage tests: moto's ThreadedMotoServer on 127.0.0.1.

The server runs once per session on a free port; each test gets its own bucket and the AWS_* variables
pointing at it (monkeypatched: set for that test only, and never to a non-loopback address).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator

import pytest

pytest.importorskip("moto", reason="moto[server] (the dev extra) runs the S3 tests")

_bucket_ids = itertools.count()
SECRET = "sclabel-test-secret-0123456789abcdef"  # grepped for in everything the tests write


def raise_accept_queue(size: int = 4096) -> None:
    """werkzeug listens with a queue of 128; the loader opens ~200 connections at once, and a connection
    the kernel drops waits 1-31 s for its SYN to be retried (see proxy.py)."""
    from werkzeug.serving import BaseWSGIServer

    BaseWSGIServer.request_queue_size = size


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    raise_accept_queue()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    yield f"http://{host}:{port}"
    server.stop()


def aws_env(endpoint: str) -> dict[str, str]:
    """The environment a user would set for an S3-compatible endpoint (here: the loopback test server)."""
    assert endpoint.startswith("http://127.0.0.1:"), endpoint
    return {
        "AWS_ACCESS_KEY_ID": "sclabel-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"sclabel-{os.getpid()}-{next(_bucket_ids)}"
    env = aws_env(endpoint)
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, with AWS_* set for this test to reach it directly. Returns the bucket name."""
    for k, v in aws_env(moto_endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return make_bucket(moto_endpoint)


def write_h5ad(path, n: int, seed: int):
    """A small counts .h5ad (300 genes) with a cell_type column."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    X = sp.random(n, 300, density=0.05, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 20)
    obs = pd.DataFrame({"cell_type": np.where(np.arange(n) % 3, "T", "B")}, index=[f"c{i}" for i in range(n)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(300)])).write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def store_h5ad(tmp_path_factory: pytest.TempPathFactory) -> list:
    d = tmp_path_factory.mktemp("s3-inputs")
    return [write_h5ad(d / f"in{i}.h5ad", 600, i) for i in range(2)]
