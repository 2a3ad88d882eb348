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
