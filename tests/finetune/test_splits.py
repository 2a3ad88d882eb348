"""Splits, up-sampling and label reading: pure functions on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from sclabel_dist.annotate.splits import column_split, stratified_split
from sclabel_dist.annotate.upsample import upsample_indices
from sclabel_dist.errors import SclabelError


def labels_of(sizes: dict[str, int]) -> np.ndarray:
    return np.array([k for k, n in sizes.items() for _ in range(n)], dtype=object)


def test_stratified_split_is_seeded_disjoint_and_stratified():
    labels = labels_of({"a": 100, "b": 50, "c": 20})
    s = stratified_split(labels, seed=3, test_fraction=0.3, val_fraction=0.2)
    again = stratified_split(labels, seed=3, test_fraction=0.3, val_fraction=0.2)
    assert all(
        np.array_equal(x, y) for x, y in [(s.train, again.train), (s.val, again.val), (s.test, again.test)]
    )
    parts = [set(s.train), set(s.val), set(s.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(s.train) + len(s.val) + len(s.test) == 170
    assert s.summary()["test_counts"] == {"a": 30, "b": 15, "c": 6}
    other = stratified_split(labels, seed=4, test_fraction=0.3, val_fraction=0.2)
    assert not np.array_equal(s.test, other.test)


def test_small_classes_and_missing_labels_are_reported_not_silently_dropped():
    labels = labels_of({"a": 30, "b": 20, "tiny": 1, "two": 2})
    labels[:3] = None
    s = stratified_split(labels, seed=0, test_fraction=0.3, val_fraction=0.2)
    assert s.classes == ["a", "b", "two"]
    text = " ".join(s.notes)
    assert "3 cells without a label" in text and "'tiny': 1" in text
    assert "too small for a validation cell: ['two']" in text


def test_split_errors():
    with pytest.raises(SclabelError, match="every label is missing"):
        stratified_split(np.array([None] * 5, dtype=object), seed=0, test_fraction=0.3, val_fraction=0.1)
    with pytest.raises(SclabelError, match="single class"):
        stratified_split(labels_of({"a": 20, "b": 1}), seed=0, test_fraction=0.3, val_fraction=0.1)


def test_column_split_uses_user_parts_and_carves_validation():
    labels = labels_of({"a": 20, "b": 20})
    column = np.array(["train"] * 15 + ["test"] * 5 + ["train"] * 15 + ["test"] * 5, dtype=object)
    s = column_split(labels, column, seed=0, val_fraction=0.2)
    assert set(s.test) == set(range(15, 20)) | set(range(35, 40))
    assert len(s.val) == 6 and not set(s.val) & set(s.test)
    with pytest.raises(SclabelError, match="not understood"):
        column_split(labels, np.array(["train", "holdout"] * 20, dtype=object), seed=0, val_fraction=0.2)


def test_upsampling_touches_only_the_training_split():
    labels = labels_of({"big": 200, "mid": 40, "rare": 6})
    s = stratified_split(labels, seed=0, test_fraction=0.3, val_fraction=0.2)
    up = upsample_indices(s.train, s.y, seed=0, target="max", cap=1000)
    assert set(up) == set(s.train)  # only training cells, each original kept
    assert not set(up) & (set(s.val) | set(s.test))
    counts = np.bincount(s.y[up])
    assert (counts == counts.max()).all() and counts.max() == np.bincount(s.y[s.train]).max()
    capped = upsample_indices(s.train, s.y, seed=0, target="max", cap=50)
    assert np.bincount(s.y[capped]).tolist()[1:] == [50, 50]  # 'big' is over the cap and keeps its cells
    assert np.array_equal(up, upsample_indices(s.train, s.y, seed=0, target="max", cap=1000))


def test_every_rank_gets_the_same_number_of_full_batches():
    from sclabel_dist.annotate.trainer import epoch_batches

    for n in (5, 64, 100, 1000):
        train = np.arange(n) * 3
        per_rank = [
            epoch_batches(train, seed=0, epoch=1, batch_size=16, world=3, rank=r, max_steps=0)
            for r in range(3)
        ]
        assert len({len(b) for b in per_rank}) == 1 and all(len(x) == 16 for b in per_rank for x in b)
        seen = np.concatenate([x for b in per_rank for x in b])
        assert set(seen) <= set(train)
        if n >= 48:
            assert len(np.unique(seen)) == len(seen)  # no cell twice within an epoch


def test_a_small_split_is_repeated_to_the_minimum_steps_per_epoch():
    from sclabel_dist.annotate.trainer import epoch_batches

    train = np.arange(40) * 2  # 40 cells: one step of 32 without the minimum
    for world in (1, 2):
        per_rank = [
            epoch_batches(
                train, seed=0, epoch=0, batch_size=8, world=world, rank=r, max_steps=0, min_steps=25
            )
            for r in range(world)
        ]
        assert all(len(b) == 25 for b in per_rank)
        seen = np.concatenate([np.concatenate(b) for b in per_rank])
        # every cell is used about equally often: whole passes, each a new permutation
        counts = np.bincount(seen // 2, minlength=40)
        assert counts.min() >= counts.max() - 1 and set(seen) == set(train)
    # a large split is unchanged by the minimum
    big = np.arange(1000)
    assert (
        len(epoch_batches(big, seed=0, epoch=0, batch_size=8, world=1, rank=0, max_steps=0, min_steps=25))
        == 125
    )


def test_few_shot_split_keeps_the_test_part_and_k_cells_per_class():
    from sclabel_dist.annotate.splits import few_shot_split, stratified_split

    labels = labels_of({"big": 200, "mid": 40, "rare": 6})
    full = stratified_split(labels, seed=0, test_fraction=0.3, val_fraction=0.15)
    few = few_shot_split(full, 10, seed=0, val_fraction=0.15)
    assert np.array_equal(few.test, full.test)
    chosen = np.concatenate([few.train, few.val])
    assert not set(chosen) & set(full.test)
    assert np.bincount(few.y[chosen]).tolist() == [10, 10, 4]  # 'rare' has only 4 non-test cells
    again = few_shot_split(full, 10, seed=0, val_fraction=0.15)
    assert np.array_equal(again.train, few.train) and np.array_equal(again.val, few.val)
    assert not np.array_equal(few_shot_split(full, 10, seed=1, val_fraction=0.15).train, few.train)
