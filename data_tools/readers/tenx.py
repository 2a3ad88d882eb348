"""Read a 10x directory (matrix.mtx[.gz] genes x cells, features.tsv[.gz] / genes.tsv, barcodes) by cell blocks.

The MatrixMarket file is not ordered by cell in general, so it is streamed once and its entries are spilled
into temporary per-cell-block files; each block is then read back alone. Peak memory is one parse chunk plus
one block, whatever the file size.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

from data_tools.tempfiles import spill_dir
from sclabel_dist.errors import SclabelError

_PARSE_ENTRIES = 1 << 20  # entries parsed per chunk of the .mtx text
_BLOCK_ENTRIES = 1 << 22  # entries per spilled cell block


def _open_text(path: Path) -> IO[str]:
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _find(directory: Path, names: Sequence[str]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def _read_tsv(path: Path) -> list[list[str]]:
    try:
        with _open_text(path) as fh:
            return [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SclabelError(f"{path}: unreadable ({exc})") from None


def _count_lines(path: Path) -> int:
    """Non-empty lines of a (gzipped) text file, streamed."""
    try:
        with _open_text(path) as fh:
            return sum(1 for line in fh if line.strip())
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SclabelError(f"{path}: unreadable ({exc})") from None


class TenXReader:
    """Cell-block reader of a 10x matrix directory; call close() to remove its temporary files."""

    def __init__(self, path: str | Path, *, workdir: str | Path | None = None):
        self.path = str(path)
        d = Path(path)
        self._mtx = _find(d, ["matrix.mtx.gz", "matrix.mtx"])
        features = _find(d, ["features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"])
        self._barcodes = _find(d, ["barcodes.tsv.gz", "barcodes.tsv"])
        if self._mtx is None or features is None:
            raise SclabelError(
                f"{d}: a 10x directory needs matrix.mtx[.gz] and features.tsv[.gz] or genes.tsv"
            )
        rows = _read_tsv(features)
        self.ensembl = [r[0] for r in rows]
        self.var_names = [r[1] if len(r) > 1 else r[0] for r in rows]
        self.counts_hint: bool | None = None
        self._spilled = False
        self._barcode_list: np.ndarray | None = None
        self._read_header()
        if self.num_genes != len(self.var_names):
            raise SclabelError(
                f"{self._mtx}: {self.num_genes} genes in the header but {len(self.var_names)} in {features.name}"
            )
        if self._barcodes is not None:
            # Checked at open: a barcode list of another length means the files are of different runs.
            num_barcodes = _count_lines(self._barcodes)
            if num_barcodes != self.num_rows:
                raise SclabelError(
                    f"{self._barcodes}: {num_barcodes} barcodes but {self._mtx.name} has {self.num_rows} cells"
                )
        self._tmp = spill_dir("10x", workdir)  # last: a refused input leaves no temp dir

    def _read_header(self) -> None:
        try:
            with _open_text(self._mtx) as fh:
                first = fh.readline()
                if not first.startswith("%%MatrixMarket matrix coordinate"):
                    raise SclabelError(
                        f"{self._mtx}: not a MatrixMarket coordinate file (empty or wrong header)"
                    )
                field = first.split()[3].lower()
                if field not in ("integer", "real"):
                    raise SclabelError(f"{self._mtx}: unsupported MatrixMarket field {field!r}")
                self.counts_hint = field == "integer"
                self._header_lines = 1
                line = fh.readline()
                while line.startswith("%"):
                    self._header_lines += 1
                    line = fh.readline()
                self._header_lines += 1
                parts = line.split()
                if len(parts) != 3:
                    raise SclabelError(f"{self._mtx}: missing size line (truncated file?)")
                self.num_genes, self.num_rows, self.num_entries = (int(x) for x in parts)
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise SclabelError(f"{self._mtx}: unreadable ({exc})") from None
        mean = self.num_entries / max(self.num_rows, 1)
        self.block_rows = int(max(1, min(self.num_rows, _BLOCK_ENTRIES / max(mean, 1.0))))
        self.num_cols = self.num_genes

    def _spill(self) -> None:
        """One streaming pass over the .mtx: entries appended to per-cell-block binary files."""
        import pandas as pd

        seen = 0
        try:
            with _open_text(self._mtx) as fh:
                for _ in range(self._header_lines):
                    fh.readline()
                reader = pd.read_csv(fh, sep=r"\s+", header=None, chunksize=_PARSE_ENTRIES, dtype=np.float64)
                for chunk in reader:
                    arr = chunk.to_numpy()
                    if arr.shape[1] != 3 or np.isnan(arr[:, :2]).any():
                        raise SclabelError(f"{self._mtx}: malformed entry near entry {seen + 1}")
                    genes = arr[:, 0].astype(np.int64) - 1
                    cells = arr[:, 1].astype(np.int64) - 1
                    bad = (genes < 0) | (genes >= self.num_genes) | (cells < 0) | (cells >= self.num_rows)
                    if bad.any():
                        k = int(np.argmax(bad))
                        raise SclabelError(
                            f"{self._mtx}: entry {seen + k + 1} (gene {genes[k] + 1}, cell {cells[k] + 1}) out of the header's range"
                        )
                    blocks = cells // self.block_rows
                    order = np.argsort(blocks, kind="stable")
                    bounds = np.flatnonzero(np.diff(blocks[order])) + 1
                    for sel in np.split(order, bounds):
                        b = int(blocks[sel[0]])
                        with open(self._tmp / f"{b}.cells", "ab") as fc:
                            fc.write(cells[sel].astype(np.int32).tobytes())
                        with open(self._tmp / f"{b}.genes", "ab") as fg:
                            fg.write(genes[sel].astype(np.int32).tobytes())
                        with open(self._tmp / f"{b}.vals", "ab") as fv:
                            fv.write(arr[sel, 2].tobytes())
                    seen += len(arr)
        except (OSError, EOFError, ValueError, pd.errors.ParserError) as exc:
            raise SclabelError(
                f"{self._mtx}: unreadable after entry {seen} (truncated file?): {exc}"
            ) from None
        if seen != self.num_entries:
            raise SclabelError(
                f"{self._mtx}: header says {self.num_entries} entries, file has {seen} (truncated file?)"
            )
        self._spilled = True

    def _block(self, b: int) -> sp.csr_matrix:
        if not self._spilled:
            self._spill()
        start = b * self.block_rows
        n = min(self.block_rows, self.num_rows - start)
        f = self._tmp / f"{b}.cells"
        if not f.exists():
            return sp.csr_matrix((n, self.num_genes), dtype=np.int64 if self.counts_hint else np.float64)
        cells = np.fromfile(f, dtype=np.int32) - start
        genes = np.fromfile(self._tmp / f"{b}.genes", dtype=np.int32)
        vals = np.fromfile(self._tmp / f"{b}.vals", dtype=np.float64)
        if self.counts_hint:
            vals = vals.astype(np.int64)
        return sp.coo_matrix((vals, (cells, genes)), shape=(n, self.num_genes)).tocsr()

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        first, last = start // self.block_rows, (max(stop, start + 1) - 1) // self.block_rows
        mat = sp.vstack([self._block(b) for b in range(first, last + 1)], format="csr")
        offset = first * self.block_rows
        return mat[start - offset : stop - offset]

    def blocks(self, block_rows: int, start: int = 0) -> Iterator[tuple[int, sp.csr_matrix]]:
        for b in range(start // self.block_rows, -(-self.num_rows // self.block_rows)):
            mat = self._block(b)
            base = b * self.block_rows
            for a in range(max(start - base, 0), mat.shape[0], block_rows):
                yield base + a, mat[a : a + block_rows]

    def obs(self, columns: Sequence[str], start: int, stop: int) -> dict[str, np.ndarray]:
        out: dict[str, Any] = {}
        for col in columns:
            if col != "barcode" or self._barcodes is None:
                raise SclabelError(
                    f"{self.path}: obs column {col!r} not available (a 10x directory has only 'barcode')"
                )
            if self._barcode_list is None:  # read once: only when the barcode column is asked for
                self._barcode_list = np.array([r[0] for r in _read_tsv(self._barcodes)], dtype=object)
            out[col] = self._barcode_list[start:stop]
        return out

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
