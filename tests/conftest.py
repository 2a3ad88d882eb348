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
