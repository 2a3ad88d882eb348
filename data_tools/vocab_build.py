"""Build a GeneVocab from the union of several inputs' genes, keeping genes seen in at least min_cells cells."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sclabel_dist.vocab import GeneVocab, ensembl_key, is_ensembl, symbol_key


def build_vocab_from_union(
    inputs: Sequence[tuple[Sequence[str], Sequence[str | None] | None, np.ndarray]], min_cells: int = 1
) -> GeneVocab:
    """inputs: (var_names, ensembl or None, cells_per_column) per dataset, in order.

    Genes are merged across inputs with the same rules GeneVocab.match uses (Ensembl ID without version
    first, then case-insensitive symbol), so every input matches the result fully. Order: first appearance.
    An entry named by an Ensembl ID takes the symbol of a later input that gives one.
    """
    names: list[str] = []
    ens: list[str | None] = []
    cells: list[int] = []
    by_ens: dict[str, int] = {}
    by_sym: dict[str, int] = {}
    for var_names, ensembl, per_col in inputs:
        for j, name in enumerate(var_names):
            e = ensembl[j] if ensembl is not None else None
            keys = [k for k in (ensembl_key(e), ensembl_key(name)) if k]
            i = next((by_ens[k] for k in keys if k in by_ens), by_sym.get(symbol_key(name), -1))
            if i < 0:
                i = len(names)
                names.append(str(name))
                ens.append(None)
                cells.append(0)
                by_sym.setdefault(symbol_key(name), i)
            elif is_ensembl(names[i]) and not is_ensembl(str(name)):
                names[i] = str(name)
                by_sym.setdefault(symbol_key(name), i)
            if ens[i] is None and keys:
                ens[i] = e if ensembl_key(e) else str(name)
            for k in keys:
                by_ens.setdefault(k, i)
            cells[i] += int(per_col[j])
    keep = [i for i in range(len(names)) if cells[i] >= min_cells]
    return GeneVocab.from_genes([names[i] for i in keep], [ens[i] for i in keep])
