"""Write predictions into a copy of the user's `.h5ad` (and a CSV beside it), atomically, never over the input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sclabel_dist.atomic import replaced_on_success
from sclabel_dist.errors import SclabelError

UNASSIGNED = "Unassigned"


def csv_path_for(out: Path) -> Path:
    """The CSV written beside an annotated `.h5ad`: same name, `.csv` suffix."""
    return out.with_suffix(".csv")


def check_output(out: Path, data: Path, overwrite: bool) -> None:
    """Refuse writing over the input, or over an existing output unless `overwrite`."""
    if out.resolve() == data.resolve():
        raise SclabelError(f"{out}: the output would replace the input file; choose another --out")
    if csv_path_for(out) == out:
        raise SclabelError(
            f"{out}: the annotated .h5ad and its CSV would get the same name; give the .h5ad path as --out "
            f"(the CSV is written beside it as {out.with_suffix('.csv').name})"
        )
    for path in (out, csv_path_for(out)):
        if path.exists() and not overwrite:
            raise SclabelError(f"{path}: output exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise SclabelError(f"{out.parent}: output directory does not exist")


def label_codes(
    probs: np.ndarray, num_classes: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label code, num_classes = Unassigned; confidence = max probability; top class) per cell: the one rule."""
    top = probs.argmax(axis=1)
    confidence = probs[np.arange(len(probs)), top].astype(np.float32)
    label = np.where(confidence >= threshold, top, num_classes)
    return label.astype(np.int32), confidence, top.astype(np.int32)


def assign_labels(
    probs: np.ndarray, classes: list[str], threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label under threshold -> Unassigned, confidence = max probability, top label regardless of threshold)."""
    code, confidence, top = label_codes(probs, len(classes), threshold)
    names = np.asarray([*classes, UNASSIGNED], dtype=object)
    return names[code], confidence, names[top]


def write_annotated(
    adata: Any,
    out: Path,
    *,
    label: np.ndarray,
    confidence: np.ndarray,
    top_label: np.ndarray,
    embedding: np.ndarray,
    uns: dict[str, Any],
) -> Path:
    """Add obs["sclabel_label"], obs["sclabel_confidence"], obsm["X_sclabel"] to a copy and write it + the CSV.

    Both files go to a temporary name first and are renamed at the end, so an interrupted run never leaves
    a half-written file under the requested name. Returns the CSV path.
    """
    import pandas as pd

    result = adata.copy()  # the caller's AnnData (and the input file) stay untouched
    result.obs["sclabel_label"] = pd.Categorical(label)
    result.obs["sclabel_confidence"] = confidence.astype(np.float32)
    result.obs["sclabel_top_label"] = pd.Categorical(top_label)
    result.obsm["X_sclabel"] = embedding.astype(np.float32)
    result.uns["sclabel"] = uns
    csv = csv_path_for(out)
    frame = pd.DataFrame(
        {
            "cell": result.obs_names,
            "sclabel_label": label,
            "sclabel_confidence": confidence,
            "sclabel_top_label": top_label,
        }
    )
    # Temp names differ by kind, not only by final name: two outputs must never share one temp file.
    with replaced_on_success(out, "h5ad-tmp") as tmp_h5, replaced_on_success(csv, "csv-tmp") as tmp_csv:
        result.write_h5ad(tmp_h5)
        frame.to_csv(tmp_csv, index=False)
    return csv
