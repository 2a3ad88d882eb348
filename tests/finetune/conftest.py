"""Fixtures for the annotation tests: a tiny labelled .h5ad, a tiny random bundle, one fine-tuned run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import finetune_args, gene_names, make_bundle, make_counts, write_h5ad  # noqa: E402

NUM_GENES = 200
# Few, short epochs: the end-to-end tests check plumbing and determinism, not accuracy.
FAST = ["--train.epochs=3", "--train.patience=2", "--train.min_epochs=0"]
# `sclabel finetune` trains on every labelled cell by default; the tests that check test metrics ask for a
# held-out part explicitly, as a user would.
HELD_OUT = ["--data.test_fraction=0.3"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("annotate")


@pytest.fixture(scope="session")
def tiny_h5ad(tiny_dir: Path) -> Path:
    X, labels = make_counts(num_genes=NUM_GENES)
    return write_h5ad(
        tiny_dir / "train.h5ad",
        X,
        {"cell_type": labels},
        gene_names(NUM_GENES),
        uns={"X_is_integer_counts": True},
    )


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dir: Path) -> Path:
    return make_bundle(tiny_dir / "bundle", gene_names(NUM_GENES))


@pytest.fixture(scope="session")
def finetuned(tiny_dir: Path, tiny_h5ad: Path, tiny_bundle: Path) -> Path:
    from sclabel_dist.cli import main

    out = tiny_dir / "run"
    rc = main(finetune_args(str(tiny_bundle), str(tiny_h5ad), str(out), *FAST, *HELD_OUT))
    assert rc == 0
    return out
