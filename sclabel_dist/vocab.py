"""GeneVocab: gene <-> token id, special tokens, JSON, content hash, and matching of input genes (pure).

Token ids: PAD_ID = 0, CLS_ID = 1, then gene index i has token id i + NUM_SPECIAL. A cell store's `indices`
are gene indices (0..num_genes-1) in vocabulary order.

Matching an input's genes (`GeneVocab.match`), per input column, first hit wins:
  1. its Ensembl ID from the `ensembl` argument (e.g. var["ensembl"]), version suffix ignored (ENSG1.5 = ENSG1);
  2. the var name itself when it looks like an Ensembl ID (ENS...G digits), version ignored;
  3. the var name as a gene symbol, case-insensitively (mouse Xkr4 = upper-case XKR4).
Duplicates: when several input columns map to the same vocabulary gene, the FIRST column is kept and the
later ones are dropped (not summed: summing log-normalised values is meaningless); they are reported.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sclabel_dist.errors import SclabelError

PAD_ID = 0
CLS_ID = 1
NUM_SPECIAL = 2
SPECIAL_TOKENS = {"<pad>": PAD_ID, "<cls>": CLS_ID}
VOCAB_FORMAT = "sclabel-vocab"
VOCAB_VERSION = 1

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)
_EXAMPLES = 10


def is_ensembl(name: str) -> bool:
    """True for an Ensembl gene ID such as ENSG00000141510 or ENSMUSG00000051951.3."""
    return bool(_ENSEMBL.match(name))


def ensembl_key(name: str | None) -> str | None:
    """Matching key of an Ensembl ID: upper-case, version suffix dropped; None when it is not one."""
    if not name or not isinstance(name, str) or not is_ensembl(name.strip()):
        return None
    return name.strip().split(".")[0].upper()


def symbol_key(name: str) -> str:
    """Matching key of a gene symbol: stripped, upper-case."""
    return str(name).strip().upper()


@dataclass
class GeneMatch:
    """How an input's columns map onto a vocabulary (column_to_gene: vocab gene index or -1 per column)."""

    column_to_gene: np.ndarray
    num_genes: int
    input_names: list[str]
    matched_by_ensembl: int = 0
    matched_by_symbol: int = 0
    duplicate_columns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_total(self) -> int:
        return len(self.column_to_gene)

    @property
    def num_matched(self) -> int:
        return int((self.column_to_gene >= 0).sum())

    @property
    def num_duplicates(self) -> int:
        return len(self.duplicate_columns)

    def report(self, counts_per_column: np.ndarray | None = None) -> dict[str, Any]:
        """JSON-able summary: genes matched / total, fraction of counts carried, duplicates, examples."""
        matched = self.column_to_gene >= 0
        dup = np.zeros(self.num_total, bool)
        dup[self.duplicate_columns] = True
        unmatched = np.flatnonzero(~matched & ~dup)
        out: dict[str, Any] = {
            "genes_total": self.num_total,
            "genes_matched": self.num_matched,
            "fraction_genes": round(self.num_matched / max(self.num_total, 1), 6),
            "matched_by_ensembl": self.matched_by_ensembl,
            "matched_by_symbol": self.matched_by_symbol,
            "duplicates_dropped": self.num_duplicates,
            "duplicate_examples": [self.input_names[i] for i in self.duplicate_columns[:_EXAMPLES]],
            "unmatched_examples": [self.input_names[i] for i in unmatched[:_EXAMPLES]],
            "vocab_genes": self.num_genes,
        }
        if counts_per_column is not None:
            counts = np.asarray(counts_per_column, dtype=np.float64)
            if counts.shape != (self.num_total,):
                raise ValueError(f"counts_per_column has shape {counts.shape}, expected ({self.num_total},)")
            total = float(counts.sum())
            carried = float(counts[matched].sum())
            out["counts_total"] = total
            out["counts_matched"] = carried
            out["fraction_counts"] = round(carried / total, 6) if total > 0 else 0.0
            # The biggest losses say best what is wrong (species, naming), so list them.
            lost = np.flatnonzero(~matched)
            top = lost[np.argsort(-counts[lost], kind="stable")[:_EXAMPLES]]
            out["top_unmatched_by_counts"] = [[self.input_names[i], float(counts[i])] for i in top]
        return out


class GeneVocab:
    """An ordered list of genes (symbol or ID, optional Ensembl ID) with token ids and a content hash."""

    def __init__(self, genes: Sequence[str], ensembl: Sequence[str | None] | None = None):
        self.genes: list[str] = [str(g) for g in genes]
        if ensembl is None:
            ensembl = [None] * len(self.genes)
        if len(ensembl) != len(self.genes):
            raise SclabelError(f"vocabulary: {len(self.genes)} genes but {len(ensembl)} Ensembl IDs")
        self.ensembl: list[str | None] = [str(e) if e else None for e in ensembl]
        self._symbol_index: dict[str, int] = {}
        self._ensembl_index: dict[str, int] = {}
        for i, (g, e) in enumerate(zip(self.genes, self.ensembl, strict=True)):
            self._symbol_index.setdefault(symbol_key(g), i)
            for key in (ensembl_key(e), ensembl_key(g)):
                if key:
                    self._ensembl_index.setdefault(key, i)
        self.hash = hashlib.sha256(
            json.dumps([NUM_SPECIAL, self.genes, self.ensembl], separators=(",", ":")).encode()
        ).hexdigest()

    @classmethod
    def from_genes(cls, genes: Sequence[str], ensembl: Sequence[str | None] | None = None) -> GeneVocab:
        return cls(genes, ensembl)

    def __len__(self) -> int:
        return len(self.genes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and other.hash == self.hash

    def __repr__(self) -> str:
        return f"GeneVocab({len(self)} genes, hash={self.hash[:12]})"

    @property
    def num_genes(self) -> int:
        return len(self.genes)

    @property
    def num_tokens(self) -> int:
        """Embedding table size: genes plus special tokens."""
        return len(self.genes) + NUM_SPECIAL

    def token_id(self, gene: str) -> int:
        """Token id of a gene symbol or Ensembl ID; SclabelError when unknown."""
        i = self.gene_index(gene)
        if i < 0:
            raise SclabelError(f"gene {gene!r} not in vocabulary ({len(self)} genes)")
        return i + NUM_SPECIAL

    def gene_index(self, name: str, ensembl: str | None = None) -> int:
        """Vocabulary index of one gene by the matching rules, or -1."""
        for key in (ensembl_key(ensembl), ensembl_key(name)):
            if key and key in self._ensembl_index:
                return self._ensembl_index[key]
        return self._symbol_index.get(symbol_key(name), -1)

    def match(self, var_names: Sequence[str], ensembl: Sequence[str | None] | None = None) -> GeneMatch:
        """Map input columns to vocabulary genes (rules in the module docstring)."""
        names = [str(v) for v in var_names]
        if ensembl is not None and len(ensembl) != len(names):
            raise SclabelError(f"{len(names)} var names but {len(ensembl)} Ensembl IDs")
        col = np.full(len(names), -1, dtype=np.int64)
        taken = np.zeros(len(self), dtype=bool)
        by_ens = by_sym = 0
        dups: list[int] = []
        for j, name in enumerate(names):
            i, how = -1, ""
            for key in (ensembl_key(ensembl[j]) if ensembl is not None else None, ensembl_key(name)):
                if key and key in self._ensembl_index:
                    i, how = self._ensembl_index[key], "ens"
                    break
            if i < 0:
                i = self._symbol_index.get(symbol_key(name), -1)
                how = "sym"
            if i < 0:
                continue
            if taken[i]:
                dups.append(j)
                continue
            taken[i] = True
            col[j] = i
            by_ens += how == "ens"
            by_sym += how == "sym"
        return GeneMatch(col, len(self), names, by_ens, by_sym, np.array(dups, dtype=np.int64))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": VOCAB_FORMAT,
            "version": VOCAB_VERSION,
            "special_tokens": SPECIAL_TOKENS,
            "num_genes": len(self),
            "hash": self.hash,
            "genes": self.genes,
            "ensembl": self.ensembl,
        }

    def to_json(self, path: str | Path) -> None:
        from sclabel_dist.atomic import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())

    def checked(self, expected_hash: str | None, where: object, recorded_in: object = "") -> GeneVocab:
        """self, when its hash is `expected_hash` (or none is expected): the one vocabulary-hash check."""
        if expected_hash and expected_hash != self.hash:
            raise SclabelError(
                f"{where}: vocabulary hash {self.hash[:12]} differs from {recorded_in or 'the expected'} "
                f"({expected_hash[:12]})"
            )
        return self

    @classmethod
    def from_json(
        cls, path: str | Path, expected_hash: str | None = None, recorded_in: object = ""
    ) -> GeneVocab:
        """Read a vocab.json (or a plain JSON list of gene names). expected_hash: the hash another file
        (`recorded_in`: a store's index.json, a bundle's config.json) holds for it; a difference is an error."""
        from sclabel_dist.data.stores.location import as_path  # a store's vocab.json may be at s3://

        path = as_path(path)
        if not path.is_file():
            raise SclabelError(f"vocabulary file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SclabelError(f"{path}: unreadable vocabulary JSON ({exc})") from None
        if isinstance(raw, list):  # a plain list of gene names is accepted as a vocabulary file
            return cls(raw)
        if raw.get("format") != VOCAB_FORMAT or "genes" not in raw:
            raise SclabelError(f"{path}: not a sclabel vocabulary (expected format {VOCAB_FORMAT!r})")
        vocab = cls(raw["genes"], raw.get("ensembl"))
        if raw.get("hash") and raw["hash"] != vocab.hash:
            raise SclabelError(f"{path}: vocabulary hash mismatch (file edited or corrupted)")
        return vocab.checked(expected_hash, path, recorded_in)


def remap_csr(csr: Any, match: GeneMatch) -> Any:
    """A CSR matrix in input column space -> CSR in vocabulary space (num_genes columns, sorted indices).

    Unmatched and duplicate columns are dropped, explicit zeros removed. O(nnz), no Python loop per row.
    """
    import scipy.sparse as sp

    csr = sp.csr_matrix(csr)
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    if csr.shape[1] != match.num_total:
        raise SclabelError(f"matrix has {csr.shape[1]} columns but the gene match has {match.num_total}")
    new_idx = match.column_to_gene[csr.indices]
    keep = (new_idx >= 0) & (csr.data != 0)
    kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    indptr = kept_before[csr.indptr]
    out = sp.csr_matrix(
        (csr.data[keep], new_idx[keep], indptr), shape=(csr.shape[0], match.num_genes), copy=False
    )
    out.has_sorted_indices = False
    out.sort_indices()
    return out
