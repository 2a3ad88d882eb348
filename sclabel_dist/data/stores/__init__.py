"""CellStore implementations: our sharded Zarr store and TileDB-SOMA experiments."""

from __future__ import annotations

from typing import Any

from sclabel_dist.data.stores.base import CellStore
from sclabel_dist.vocab import GeneVocab


def open_store(uri: str, *, vocab: GeneVocab | None = None, **kwargs: Any) -> CellStore:
    """A Zarr cell store directory (has index.json) or a TileDB-SOMA experiment, by what is at `uri`."""
    from sclabel_dist.data import format as fmt
    from sclabel_dist.data.stores.location import as_path
    from sclabel_dist.errors import SclabelError

    # The store modules are imported here, never by base.py: base is what they import.
    if (as_path(uri) / fmt.INDEX_FILE).is_file():
        from sclabel_dist.data.stores.zarr_store import ZarrCellStore

        return ZarrCellStore(uri, vocab=vocab, **kwargs)
    if is_soma_uri(uri):
        from sclabel_dist.data.stores.soma_store import SomaCellStore

        if vocab is None:
            raise SclabelError(f"{uri}: a SOMA experiment needs the run's vocabulary to map its genes")
        return SomaCellStore(uri, vocab=vocab, **kwargs)
    raise SclabelError(f"{uri}: neither a cell store (no {fmt.INDEX_FILE}) nor a SOMA experiment")


def is_soma_uri(uri: str) -> bool:
    """Whether `uri` names a TileDB-SOMA experiment rather than a cell store (what open_store decides by)."""
    from pathlib import Path

    from sclabel_dist.data import format as fmt
    from sclabel_dist.data.stores.location import as_path

    if (as_path(uri) / fmt.INDEX_FILE).is_file():
        return False
    return (Path(uri) / "__tiledb_group.tdb").exists() or (Path(uri) / "ms").exists() or "://" in uri


def import_soma_in_background(uris: list[str]) -> None:
    """Start importing tiledbsoma in a thread when a store is a SOMA experiment: the import (it pulls in
    anndata and pandas: ~0.6 s of a core) then overlaps the process group and engine set-up instead of
    delaying the first batch (benchmarks/RESULTS.md, issue 20). The store's own import waits for it."""
    import importlib
    import threading

    if any(is_soma_uri(u) for u in uris):
        threading.Thread(target=importlib.import_module, args=("tiledbsoma",), daemon=True).start()
