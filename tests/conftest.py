"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests using it skip on a user's machine where it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data sets not present at {SHARED_DATA} (only in the project's CI)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _verified_shards_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the record of verified old-format shards (stores/verify.py) out of the user's ~/.cache."""
    import os

    os.environ["SCLABEL_CACHE_DIR"] = str(tmp_path_factory.mktemp("sclabel-cache"))


@pytest.fixture(autouse=True)
def _run_outside_the_checkout(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test runs in an empty directory of its own: none may read or write the working directory.

    A user runs `pytest` where `sclabel quickstart` has just written runs/; a test that wrote defaults into
    the working directory, or tripped over what was there, would fail there (issue 18).
    """
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
