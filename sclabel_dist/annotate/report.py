"""Classification metrics (accuracy, macro-F1, per-class P/R/F1/support, confusion matrix) and their plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """JSON-able metrics over the given class ids (macro-F1 averages over classes present in truth or prediction)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    ids = list(range(len(classes)))
    if len(y_true) == 0:
        return {"num_cells": 0, "accuracy": None, "macro_f1": None, "per_class": {}, "classes": classes}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    # Same averaging as the README baseline (sklearn's default: the union of labels seen in truth and
    # prediction), so a class absent from this test split does not count as F1 = 0.
    macro = f1_score(y_true, y_pred, average="macro", zero_division=0)
    return {
        "num_cells": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(macro),
        "per_class": {
            name: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]), "support": int(s[k])}
            for k, name in enumerate(classes)
        },
        "classes": classes,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def plot_confusion(metrics: dict[str, Any], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (true rows, predicted columns) with raw counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = metrics["classes"]
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_title(title or f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_f1_bars(metrics: dict[str, Any], path: Path, title: str = "") -> None:
    """Per-class F1 as horizontal bars, labelled with each class's test support."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = metrics["classes"]
    f1 = [metrics["per_class"][c]["f1"] for c in classes]
    support = [metrics["per_class"][c]["support"] for c in classes]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(classes) + 1)))
    ax.barh(range(len(classes)), f1, color="tab:blue")
    ax.set_yticks(
        range(len(classes)), [f"{c} (n={n})" for c, n in zip(classes, support, strict=True)], fontsize=8
    )
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.set_title(title or f"per-class F1 (macro {metrics['macro_f1']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of `rows` (dicts) over `columns`; floats to 3 decimals."""

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
