"""The one atomic-write rule (sclabel_dist/atomic.py) and the one checksum rule (sclabel_dist/checksums.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sclabel_dist.atomic import replaced_on_success, write_json_atomic, write_text_atomic
from sclabel_dist.checksums import format_sums, mismatched, read_sums, sha256_file, sha256_tree


def test_text_and_json_replace_whole_files_and_leave_no_temp(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "a.txt", "old")
    write_text_atomic(tmp_path / "a.txt", "new")
    write_json_atomic(tmp_path / "b.json", {"k": [1, 2]})
    assert (tmp_path / "a.txt").read_text() == "new"
    assert (tmp_path / "b.json").read_text() == json.dumps({"k": [1, 2]}, indent=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


def test_a_failed_directory_build_keeps_the_old_one_and_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with replaced_on_success(out) as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError), replaced_on_success(out) as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("2")
        raise RuntimeError("killed half way")
    assert (out / "f").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with replaced_on_success(out) as tmp:  # a finished one replaces the old directory
        tmp.mkdir()
        (tmp / "g").write_text("3")
    assert [p.name for p in out.iterdir()] == ["g"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_checksums_round_trip_and_name_the_changed_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x").write_bytes(b"abc")
    (tmp_path / "y").write_bytes(b"de")
    assert sha256_file(tmp_path / "y") == hashlib.sha256(b"de").hexdigest()
    tree = sha256_tree(tmp_path)
    sums = {"y": sha256_file(tmp_path / "y"), "sub/x": sha256_file(tmp_path / "sub" / "x")}
    (tmp_path / "SHA256SUMS").write_text(format_sums(sums))
    assert read_sums(tmp_path) == sums and mismatched(tmp_path, sums, list(sums), why="w") == []
    (tmp_path / "y").write_bytes(b"dX")
    assert mismatched(tmp_path, sums, list(sums), why="w") == [f"{tmp_path / 'y'}: checksum mismatch (w)"]
    assert sha256_tree(tmp_path) != tree
