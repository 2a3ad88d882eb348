"""Seeded stratified train / validation / test splits (or a user's split column), with a report of what was left out."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sclabel_dist.errors import SclabelError

# `sclabel evaluate`'s default held-out test part: the README baseline's stratified 70/30 split. Only evaluation
# holds cells out by default; `sclabel finetune` trains on every labelled cell unless told otherwise.
EVALUATE_TEST_FRACTION = 0.3

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class Split:
    """Cell indices per part, the class names (index = class id) and every cell's class id (-1 = left out)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    classes: list[str]
    y: np.ndarray
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        def counts(idx: np.ndarray) -> dict[str, int]:
            c = Counter(self.y[idx].tolist())
            return {name: int(c.get(k, 0)) for k, name in enumerate(self.classes)}

        return {
            "classes": self.classes,
            "num_train": len(self.train),
            "num_val": len(self.val),
            "num_test": len(self.test),
            "train_counts": counts(self.train),
            "val_counts": counts(self.val),
            "test_counts": counts(self.test),
            "notes": self.notes,
        }


def encode_labels(labels: np.ndarray, min_cells: int, where: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Class ids for labelled cells of classes with >= min_cells cells (-1 otherwise), sorted class names, notes."""
    present = np.array([v is not None for v in labels], dtype=bool)
    notes = []
    if not present.any():
        raise SclabelError(
            f"{where}: every label is missing (NaN, empty or 'unknown'): nothing to learn from"
        )
    if (~present).any():
        notes.append(f"{int((~present).sum())} cells without a label left out")
    counts = Counter(labels[present].tolist())
    small = {k: v for k, v in counts.items() if v < min_cells}
    if small:
        notes.append(f"classes with fewer than {min_cells} cells left out: {dict(sorted(small.items()))}")
    classes = sorted(k for k, v in counts.items() if v >= min_cells)
    if len(classes) < 2:
        only = classes[0] if classes else next(iter(counts))
        raise SclabelError(
            f"{where}: a single class ({only!r}) with >= {min_cells} cells: a classifier needs at least two"
        )
    index = {name: k for k, name in enumerate(classes)}
    y = np.array([index.get(v, -1) if v is not None else -1 for v in labels], dtype=np.int64)
    return y, classes, notes


def stratified_split(
    labels: np.ndarray,
    *,
    seed: int,
    test_fraction: float,
    val_fraction: float,
    min_cells: int = 2,
    where: str = "data",
) -> Split:
    """Test part as sklearn's stratified `train_test_split(random_state=seed)`, then validation from the rest.

    The test part is exactly the baseline recipe's split, so evaluation numbers compare with the README's.
    """
    from sklearn.model_selection import train_test_split

    y, classes, notes = encode_labels(labels, min_cells, where)
    kept = np.flatnonzero(y >= 0)
    if test_fraction > 0:
        rest, test = train_test_split(kept, test_size=test_fraction, stratify=y[kept], random_state=seed)
    else:
        rest, test = kept, kept[:0]
    train, val, val_notes = _carve_validation(np.sort(rest), y, classes, val_fraction, seed)
    return Split(train, val, np.sort(test), classes, y, notes + val_notes)


def column_split(
    labels: np.ndarray,
    column: np.ndarray,
    *,
    seed: int,
    val_fraction: float,
    min_cells: int = 2,
    where: str = "data",
) -> Split:
    """Parts from a user's split column (train / val / test); validation is carved from train when absent."""
    parts = np.array([SPLIT_NAMES.get(str(v).strip().lower(), "?") for v in column], dtype=object)
    unknown = sorted({str(v) for v, p in zip(column, parts, strict=True) if p == "?"})
    if unknown:
        raise SclabelError(
            f"{where}: split column values {unknown[:5]} not understood; use train / val / test"
        )
    is_train = parts == "train"
    if not is_train.any():
        raise SclabelError(f"{where}: the split column names no training cell ('train')")
    # Classes are what the training part can teach: a class seen only in val / test cannot be predicted.
    train_labels = np.where(is_train, labels, None)
    y, classes, notes = encode_labels(train_labels, min_cells, where)
    # encode_labels counted the hidden val / test labels as missing: report only unlabelled training cells.
    notes = [n for n in notes if "without a label" not in n]
    unlabelled_train = int((is_train & np.array([v is None for v in labels])).sum())
    if unlabelled_train:
        notes.insert(0, f"{unlabelled_train} training cells without a label left out")
    index = {name: k for k, name in enumerate(classes)}
    y = np.array([index.get(v, -1) if v is not None else -1 for v in labels], dtype=np.int64)
    unseen = Counter(
        v for v, p in zip(labels, parts, strict=True) if p != "train" and v is not None and v not in index
    )
    if unseen:
        notes.append(
            f"val/test cells of classes absent from training left out: {dict(sorted(unseen.items()))}"
        )
    train = np.flatnonzero(is_train & (y >= 0))
    val = np.flatnonzero((parts == "val") & (y >= 0))
    test = np.flatnonzero((parts == "test") & (y >= 0))
    if len(val) == 0:
        train, val, val_notes = _carve_validation(train, y, classes, val_fraction, seed)
        notes += val_notes
    return Split(train, val, test, classes, y, notes)


def _carve_validation(
    rest: np.ndarray, y: np.ndarray, classes: list[str], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per class, a seeded `round(val_fraction * n)` cells to validation, always leaving one for training."""
    rng = np.random.default_rng([seed, 1])
    train_parts, val_parts, no_val = [], [], []
    for k in range(len(classes)):
        members = rest[y[rest] == k]
        members = members[rng.permutation(len(members))]
        n_val = min(int(round(val_fraction * len(members))), len(members) - 1)
        if val_fraction > 0 and n_val <= 0:
            no_val.append(classes[k])
        val_parts.append(members[: max(n_val, 0)])
        train_parts.append(members[max(n_val, 0) :])
    notes = [f"classes too small for a validation cell: {no_val}"] if no_val else []
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts)), notes


def few_shot_split(split: Split, k: int, *, seed: int, val_fraction: float) -> Split:
    """`split` with its training cells cut to `k` per class (all cells of smaller classes), drawn seeded from
    train + validation, then validation carved again from those; the test part is unchanged.

    The label-efficiency protocol: every method sees the same k labelled cells per class and is scored on the
    same test cells as with the whole training split.
    """
    if k < 1:
        raise SclabelError(f"k={k}: need at least one labelled cell per class")
    rng = np.random.default_rng([seed, 5, k])
    pool = np.sort(np.concatenate([split.train, split.val]))
    parts = []
    for c in range(len(split.classes)):
        members = pool[split.y[pool] == c]
        parts.append(rng.choice(members, size=min(k, len(members)), replace=False))
    chosen = np.sort(np.concatenate(parts))
    train, val, notes = _carve_validation(chosen, split.y, split.classes, val_fraction, seed)
    return Split(train, val, split.test, split.classes, split.y, [*split.notes, *notes])
