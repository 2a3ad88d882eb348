"""Outputs for inputs of any size, joined from the parts in input order without holding them all in memory.

- a Parquet table: cell, label, confidence, top_label, top-k labels and probabilities, embedding (a
  fixed-size list of float32), one row group per part;
- an annotated `.h5ad`: the input file copied as it is (X and layers byte for byte, never decoded), then
  obs columns, obsm["X_sclabel"] (filled part by part) and uns["sclabel"] written into the copy with h5py.
Each is written under a temp name in the work directory and renamed into place only once complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sclabel_dist.annotate.output import UNASSIGNED, assign_labels, label_codes
from sclabel_dist.annotate.stream import iter_parts

TABLE_SUFFIXES = (".parquet",)
OBS_COLUMNS = ("sclabel_label", "sclabel_confidence", "sclabel_top_label")
OBSM_KEY = "X_sclabel"


def write_table(
    work: Path, tmp: Path, num_cells: int, *, classes: list[str] | None, threshold: float, top_k: int
) -> None:
    """The Parquet table at `tmp`, one row group per part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for part in iter_parts(work, num_cells):
            emb = part["embedding"]
            cols: dict[str, Any] = {"cell": pa.array(part["names"].tolist(), pa.string())}
            if classes is not None:
                label, confidence, top_label = assign_labels(part["prob"], classes, threshold)
                cols["label"] = pa.array(label.tolist(), pa.string()).dictionary_encode()
                cols["confidence"] = pa.array(confidence, pa.float32())
                cols["top_label"] = pa.array(top_label.tolist(), pa.string()).dictionary_encode()
                order = np.argsort(-part["prob"], axis=1, kind="stable")[:, :top_k]
                for j in range(order.shape[1]):
                    cols[f"top{j + 1}_label"] = pa.array(
                        np.asarray(classes, dtype=object)[order[:, j]].tolist(), pa.string()
                    ).dictionary_encode()
                    cols[f"top{j + 1}_prob"] = pa.array(
                        part["prob"][np.arange(len(order)), order[:, j]], pa.float32()
                    )
            flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).ravel(), pa.float32())
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()


def write_h5ad_copy(
    src: Path,
    work: Path,
    tmp: Path,
    num_cells: int,
    *,
    classes: list[str] | None,
    threshold: float,
    uns: dict[str, Any],
) -> np.ndarray | None:
    """A copy of `src` at `tmp` with the results added; returns the label codes (None without classes)."""
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    # A plain file copy (copy_file_range where the OS has it): X is never decoded, and stays byte for byte.
    shutil.copyfile(src, tmp)
    codes = confidence = top = None
    with h5py.File(tmp, "r+") as f:
        obsm = f.require_group("obsm")
        if not obsm.attrs.get("encoding-type"):
            obsm.attrs["encoding-type"], obsm.attrs["encoding-version"] = "dict", "0.1.0"
        if OBSM_KEY in obsm:
            del obsm[OBSM_KEY]
        ds = None
        if classes is not None:
            codes = np.empty(num_cells, np.int32)
            top = np.empty(num_cells, np.int32)
            confidence = np.empty(num_cells, np.float32)
        at = 0
        for part in iter_parts(work, num_cells):
            emb = part["embedding"]
            if ds is None:
                ds = obsm.create_dataset(
                    OBSM_KEY,
                    shape=(num_cells, emb.shape[1]),
                    dtype=np.float32,
                    chunks=(min(num_cells, 4096), emb.shape[1]),
                )
                ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"
            ds[at : at + len(emb)] = emb
            if classes is not None:
                sl = slice(at, at + len(emb))
                codes[sl], confidence[sl], top[sl] = label_codes(part["prob"], len(classes), threshold)
            at += len(emb)
        if classes is not None:
            obs = f["obs"]
            categories = [*classes, UNASSIGNED]
            columns = {
                "sclabel_label": _categorical(codes, categories),
                "sclabel_confidence": confidence,
                "sclabel_top_label": _categorical(top, list(classes)),
            }
            order = [str(c) for c in obs.attrs.get("column-order", []) if str(c) not in columns]
            for name, values in columns.items():
                if name in obs:
                    del obs[name]
                write_elem(obs, name, values if isinstance(values, np.ndarray) else pd.Categorical(values))
            obs.attrs["column-order"] = np.array([*order, *columns], dtype=object)
        u = f.require_group("uns")
        if "sclabel" in u:
            del u["sclabel"]
        write_elem(u, "sclabel", uns)
    return codes


def _categorical(codes: np.ndarray, categories: list[str]) -> Any:
    """A pandas Categorical of `codes`, unused categories dropped (as pd.Categorical(labels) would)."""
    import pandas as pd

    cat = pd.Categorical.from_codes(codes, categories=categories)
    return cat.remove_unused_categories()


def collect(work: Path, num_cells: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings, probabilities or None) of every cell, in memory: the small-input outputs need them whole."""
    embs, probs = [], []
    for part in iter_parts(work, num_cells):
        embs.append(part["embedding"])
        if "prob" in part:
            probs.append(part["prob"])
    return np.concatenate(embs), (np.concatenate(probs) if probs else None)
