"""Corpus: the opened stores of a run, the rows each split selects (obs filter, held-out datasets or chunks),
their chunk table, and reading a window of (store, position) rows as one CSRBlock.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sclabel_dist.config import DataConfig
from sclabel_dist.data import shuffle
from sclabel_dist.data.partition import Units, make_chunks
from sclabel_dist.data.stores import open_store
from sclabel_dist.data.stores.base import CellStore, CSRBlock
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab

SPLITS = ("train", "val")


def run_vocab(data: DataConfig) -> GeneVocab:
    """The run's vocabulary: data.vocab if set, else the first Zarr store's vocab.json."""
    from sclabel_dist.data import format as fmt
    from sclabel_dist.data.stores.location import as_path

    if data.vocab:
        return GeneVocab.from_json(data.vocab)
    for uri in data.stores:
        if (as_path(uri) / fmt.VOCAB_FILE).is_file():
            return GeneVocab.from_json(as_path(uri) / fmt.VOCAB_FILE)
    raise SclabelError("data.vocab is empty and no Zarr cell store in data.stores has a vocab.json")


class Corpus:
    """The stores of one split: store s contributes its selected rows (sorted) in chunks of chunk_size."""

    def __init__(self, stores: Sequence[CellStore], selections: Sequence[np.ndarray | None], chunk_size: int):
        self.stores = list(stores)
        # None = every row of the store (no index array held: memory stays O(chunks), not O(cells)).
        self.selections = list(selections)
        self.num_rows = [
            s.num_rows if sel is None else len(sel)
            for s, sel in zip(self.stores, self.selections, strict=True)
        ]
        self.chunks: Units = make_chunks(self.num_rows, chunk_size)
        self.num_genes = self.stores[0].num_genes if self.stores else 0

    @property
    def total_rows(self) -> int:
        return int(sum(self.num_rows))

    def store_rows(self, store: int, positions: np.ndarray) -> np.ndarray:
        sel = self.selections[store]
        return positions if sel is None else sel[positions]

    def read(self, store: np.ndarray, pos: np.ndarray) -> tuple[CSRBlock, np.ndarray]:
        """(block, order): the distinct rows read store by store in sorted order; row i is block row order[i]."""
        blocks, order = [], np.empty(len(pos), dtype=np.int64)
        offset = 0
        for s in np.unique(store).tolist():
            mine = np.flatnonzero(store == s)
            rows, inverse = np.unique(self.store_rows(s, pos[mine]), return_inverse=True)
            block = self.stores[s].read_rows(rows)
            block.ids = (np.int64(s) << np.int64(40)) | rows
            blocks.append(block)
            order[mine] = offset + inverse
            offset += len(rows)
        return CSRBlock.concat(blocks, self.num_genes), order

    def close(self) -> None:
        for s in self.stores:
            s.close()


def _selection(
    store: CellStore, data: DataConfig, split: str, seed: int, index: int, chunk: int
) -> np.ndarray:
    """Sorted row ids of `store` in `split`: obs filter, then held-out datasets or held-out chunks."""
    keep = np.ones(store.num_rows, dtype=bool)
    for column, values in data.obs_filter.items():
        keep &= np.isin(store.obs_values(column), np.array(list(values), dtype=object))
    if data.val_datasets:
        held = np.isin(store.datasets(), np.array(list(data.val_datasets), dtype=object))
        return np.flatnonzero(keep & (held if split == "val" else ~held))
    rows = np.flatnonzero(keep)
    if data.val_fraction <= 0:
        return rows if split == "train" else rows[:0]
    # Held out by chunk of the filtered rows, fixed by the seed: the same cells every epoch and resume.
    starts = np.arange(0, len(rows), chunk)
    held_chunks = shuffle.val_chunks(len(starts), data.val_fraction, seed=seed, store=index)
    held_rows = np.repeat(held_chunks, np.diff(np.append(starts, len(rows))))
    return rows[held_rows if split == "val" else ~held_rows]


def build_corpus(data: DataConfig, *, split: str, seed: int, vocab: GeneVocab | None = None) -> Corpus:
    """Open data.stores (Zarr or SOMA) in the run's vocabulary and select the rows of `split`."""
    if split not in SPLITS:
        raise SclabelError(f"split {split!r}: choose from {SPLITS}")
    if not data.stores:
        raise SclabelError("data.stores is empty: give at least one cell store or SOMA experiment")
    data.validate()
    vocab = vocab or run_vocab(data)
    stores, selections = [], []
    for i, uri in enumerate(data.stores):
        store = open_store(uri, vocab=vocab)
        if store.vocab.hash != vocab.hash:
            raise SclabelError(
                f"{uri}: its vocabulary ({store.vocab.hash[:12]}) differs from the run's ({vocab.hash[:12]}); "
                "re-ingest it with the run's vocab.json"
            )
        sel = _selection(store, data, split, seed, i, data.chunk_size)
        trivial = split == "train" and len(sel) == store.num_rows
        stores.append(store)
        selections.append(None if trivial else sel)
    corpus = Corpus(stores, selections, data.chunk_size)
    if corpus.total_rows == 0 and split == "train":
        raise SclabelError(f"no cells selected from {data.stores} (obs_filter {data.obs_filter}?)")
    return corpus
