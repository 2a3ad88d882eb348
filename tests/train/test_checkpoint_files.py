"""Checkpoint bookkeeping on disk: only complete checkpoints are resumed from; rotation; atomic `latest`."""

from __future__ import annotations

from pathlib import Path

import pytest

from sclabel_dist.atomic import write_text_atomic
from sclabel_dist.checkpoint import (
    COMPLETE,
    UNIVERSAL,
    checkpoint_tag,
    find_resume,
    find_verified_resume,
    list_complete,
    rotate,
    verify_checkpoint,
    write_checksums,
)
from sclabel_dist.errors import SclabelError


def fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    path = root / checkpoint_tag(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / COMPLETE).write_text(f"{step}\n")
    return path


def test_half_written_checkpoint_is_never_picked(tmp_path):
    assert find_resume(tmp_path / "none", "auto") is None
    fake_ckpt(tmp_path, 10)
    fake_ckpt(tmp_path, 20)
    fake_ckpt(tmp_path, 30, complete=False)  # crashed mid-save
    write_text_atomic(tmp_path / "latest", checkpoint_tag(30))  # even a stale pointer does not fool it
    assert find_resume(tmp_path, "auto") == tmp_path / checkpoint_tag(20)
    write_text_atomic(tmp_path / "latest", checkpoint_tag(10))
    assert find_resume(tmp_path, "auto") == tmp_path / checkpoint_tag(10)  # `latest` wins when complete
    assert find_resume(tmp_path, "never") is None
    with pytest.raises(SclabelError, match="not a complete checkpoint"):
        find_resume(tmp_path, str(tmp_path / checkpoint_tag(30)))


def test_rotate_keeps_last_k_and_drops_stale_partials(tmp_path):
    for step in (10, 20, 30, 40):
        fake_ckpt(tmp_path, step)
    fake_ckpt(tmp_path, 25, complete=False)
    fake_ckpt(tmp_path, 50, complete=False)  # newer than the newest complete: may be in progress, kept
    rotate(tmp_path, keep=2)
    assert [p.name for p in list_complete(tmp_path)] == [checkpoint_tag(30), checkpoint_tag(40)]
    assert not (tmp_path / checkpoint_tag(25)).exists() and (tmp_path / checkpoint_tag(50)).exists()
    assert list(tmp_path.glob(".*tmp*")) == []


def test_verify_names_corrupt_missing_and_unlisted_files(tmp_path):
    path = fake_ckpt(tmp_path, 10)
    (path / "rng").mkdir()
    (path / "rng" / "rank_00000.safetensors").write_bytes(b"rng")
    write_checksums(path, rank=0, world=1)
    assert verify_checkpoint(path) == []
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"y")
    (path / "rng" / "rank_00000.safetensors").unlink()
    (path / "extra.pt").write_bytes(b"z")
    problems = verify_checkpoint(path)
    assert len(problems) == 3, problems
    assert "model_states.pt: checksum mismatch" in problems[1]
    assert "rank_00000.safetensors: missing" in problems[0]
    assert "extra.pt: not listed in SHA256SUMS" in problems[2]
    # ranks split the reads: together they find what one process finds
    split = verify_checkpoint(path, rank=0, world=2) + verify_checkpoint(path, rank=1, world=2)
    assert sorted(split) == sorted(problems)


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, capsys):
    for step in (10, 20, 30):
        write_checksums(fake_ckpt(tmp_path, step), rank=0, world=1)
    write_text_atomic(tmp_path / "latest", checkpoint_tag(30))
    (tmp_path / checkpoint_tag(30) / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"flip")
    assert find_verified_resume(tmp_path, "auto") == tmp_path / checkpoint_tag(20)
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / checkpoint_tag(30)}" in err and "checksum mismatch" in err
    assert f"resuming from {tmp_path / checkpoint_tag(20)} instead" in err
    # a checkpoint named explicitly is never swapped for another
    with pytest.raises(SclabelError, match="fails verification"):
        find_verified_resume(tmp_path, str(tmp_path / checkpoint_tag(30)))
    # nothing verifies: an error, not a silent fresh start
    for step in (10, 20):
        (tmp_path / checkpoint_tag(step) / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"f")
    with pytest.raises(SclabelError, match="no complete checkpoint verifies"):
        find_verified_resume(tmp_path, "auto")


def test_a_universal_copy_is_part_of_its_step(tmp_path):
    """Checksums of a step leave its universal copy (own SHA256SUMS) and killed conversions aside; rotation
    removes the copy with its step."""
    for step in (10, 20):
        write_checksums(fake_ckpt(tmp_path, step), rank=0, world=1)
    old = tmp_path / checkpoint_tag(10)
    (old / UNIVERSAL / "zero").mkdir(parents=True)
    (old / UNIVERSAL / "zero" / "fp32.pt").write_bytes(b"u")
    (old / f".{UNIVERSAL}.tmp123").mkdir()
    (old / f".{UNIVERSAL}.tmp123" / "half.pt").write_bytes(b"h")
    assert verify_checkpoint(old) == []
    rotate(tmp_path, keep=1)
    assert not old.exists() and [p.name for p in list_complete(tmp_path)] == [checkpoint_tag(20)]
