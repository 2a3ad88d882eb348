"""`sclabel-data to-soma`: write a cell store or an .h5ad as a TileDB-SOMA experiment, out-of-core by row blocks.

Layout: obs (soma_joinid = row, obs_id, the kept obs columns), ms/RNA/var (soma_joinid = gene index in the
vocabulary, var_id = gene, ensembl), ms/RNA/X/<layer> (float32; "counts" for integer counts, "data" for
log-normalised values). The genes are the vocabulary's, in its order: the store's own, or for an .h5ad the one
given with --vocab (a vocab.json or a store), else its var names (duplicates dropped).

Tiles suit row access: row-major cells and tiles, a space tile of --row-tile rows by all genes (a run of
consecutive cells is a few tiles), data tiles (capacity) of about that many rows' non-zeros, LZ4 (after a
byte shuffle for genes and values). Each block is written in global order (no sort); the experiment is
built under a temp name and renamed at the end.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from sclabel_dist.atomic import replaced_on_success
from sclabel_dist.data.stores.location import as_path, is_remote
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab

MEASUREMENT = "RNA"
LAYER_OF_KIND = {"counts": "counts", "lognorm": "data"}
MISSING = -1

Block = tuple[int, sp.csr_matrix, dict[str, np.ndarray]]  # (first row, CSR in vocab space, obs codes)


@dataclass
class Source:
    """An input seen as row blocks in vocabulary space, with categorical obs columns."""

    path: str
    num_rows: int
    vocab: GeneVocab
    value_kind: str
    mean_nnz: float
    categories: dict[str, list[str]]  # kept obs column -> categories (codes index into them, -1 = missing)
    obs_ids: Any  # callable (start, stop) -> list of str
    blocks: Any  # callable (block_rows) -> Iterator[Block]
    closers: list[Any] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------
# inputs


def open_store_source(path: Path) -> Source:
    """A cell store: its vocabulary, value kind, obs columns (plus `dataset`), shards read in row blocks.

    Rows are read through ZarrCellStore, the one reader of the store layout (its checks included)."""
    import scipy.sparse as sp

    from sclabel_dist.data import format as fmt
    from sclabel_dist.data.stores.zarr_store import ZarrCellStore

    store = ZarrCellStore(path)
    index, vocab = store.index, store.vocab
    kinds = {s.value_kind for s in index.shards} or {"counts"}
    if len(kinds) > 1:
        raise SclabelError(f"{path}: mixes value kinds {sorted(kinds)}; convert one kind at a time")
    datasets = [d.name for d in index.datasets]
    categories = {"dataset": datasets, **index.obs_columns}

    def blocks(block_rows: int) -> Iterator[Block]:
        for shard in index.shards:
            codes = {c: fmt.read_obs_codes(path, shard, c) for c in index.obs_columns}
            codes["dataset"] = np.full(shard.num_rows, datasets.index(shard.dataset), np.int32)
            for a in range(0, shard.num_rows, block_rows):
                b = min(a + block_rows, shard.num_rows)
                block = store.read_rows(np.arange(shard.row_offset + a, shard.row_offset + b))
                rows = sp.csr_matrix(block.to_scipy())
                yield shard.row_offset + a, rows, {c: v[a:b] for c, v in codes.items()}

    return Source(
        path=str(path),
        num_rows=index.num_rows,
        vocab=vocab,
        value_kind=kinds.pop(),
        mean_nnz=index.nnz / max(index.num_rows, 1),
        categories=categories,
        obs_ids=lambda a, b: [str(i) for i in range(a, b)],
        blocks=blocks,
    )


def load_vocab(spec: Path) -> GeneVocab:
    """--vocab: a vocab.json, or a cell store whose vocab.json is taken."""
    from sclabel_dist.data import format as fmt

    return GeneVocab.from_json(spec / fmt.VOCAB_FILE if spec.is_dir() else spec)


def _h5ad_categorical_columns(path: Path, asked: Sequence[str] | None) -> dict[str, list[str]]:
    """Categories of the obs columns to keep: those asked for (must be categorical), else every categorical."""
    import h5py

    from data_tools.readers.h5ad import read_column

    with h5py.File(path, "r") as f:
        obs = f.get("obs")
        present = [] if obs is None else [k for k in obs if k != obs.attrs.get("_index", "_index")]
        cat = [k for k in present if isinstance(obs[k], h5py.Group)]
        for c in asked or []:
            if c not in present:
                raise SclabelError(f"{path}: obs column {c!r} not found; present: {sorted(present)}")
            if c not in cat:
                raise SclabelError(f"{path}: obs column {c!r} is not categorical (only categorical kept)")
        return {c: [str(v) for v in read_column(obs[c]["categories"])] for c in (asked or cat)}


def open_h5ad_source(
    path: Path,
    vocab_spec: Path | None,
    *,
    layer: str | None,
    use_raw: bool,
    value_kind: str,
    obs_columns: Sequence[str] | None,
) -> Source:
    """An .h5ad read by row blocks (data_tools.readers.h5ad), genes mapped onto the vocabulary."""
    import h5py

    from data_tools.readers.h5ad import H5adReader, read_column
    from sclabel_dist.data.input_rules import check_values
    from sclabel_dist.vocab import remap_csr

    reader = H5adReader(path, layer=layer, use_raw=use_raw)
    try:
        if vocab_spec is not None:
            vocab = load_vocab(vocab_spec)
        else:
            seen: dict[str, int] = {}
            for j, name in enumerate(reader.var_names):
                seen.setdefault(name.strip().upper(), j)
            keep = sorted(seen.values())
            ens = [reader.ensembl[j] for j in keep] if reader.ensembl else None
            vocab = GeneVocab.from_genes([reader.var_names[j] for j in keep], ensembl=ens)
        match = vocab.match(reader.var_names, ensembl=reader.ensembl)
        if match.num_matched == 0:
            raise SclabelError(
                f"{path}: none of its {match.num_total} genes is in the vocabulary {vocab_spec}"
            )
        first = reader.read_rows(0, min(reader.num_rows, 1024))
        if value_kind == "auto":
            integer = first.dtype.kind in "iub" or bool(np.all(first.data == np.round(first.data)))
            value_kind = "counts" if integer else "lognorm"
        categories = _h5ad_categorical_columns(path, obs_columns)
        h5 = h5py.File(path, "r")
    except BaseException:
        reader.close()
        raise
    obs = h5["obs"]
    index_key = obs.attrs.get("_index", "_index")

    def obs_ids(a: int, b: int) -> list[str]:
        return [str(v) for v in read_column(obs[index_key], a, b)]

    def blocks(block_rows: int) -> Iterator[Block]:
        for a, raw in reader.blocks(block_rows):
            check_values(raw, value_kind, str(path), a)  # NaN / inf / negative / fractional "counts"
            b = a + raw.shape[0]
            codes = {c: np.asarray(obs[c]["codes"][a:b], dtype=np.int32) for c in categories}
            yield a, remap_csr(raw, match), codes

    return Source(
        path=str(path),
        num_rows=reader.num_rows,
        vocab=vocab,
        value_kind=value_kind,
        mean_nnz=first.nnz / max(first.shape[0], 1),
        categories=categories,
        obs_ids=obs_ids,
        blocks=blocks,
        closers=[reader.close, h5.close],
    )


# ------------------------------------------------------------------------------------------------------------
# output


def x_platform_config(num_genes: int, mean_nnz: float, row_tile: int) -> dict[str, Any]:
    """TileDB create options for X: row-major, a space tile of `row_tile` rows x all genes, matching capacity.

    A read decodes every coordinate and value of its tiles, and with Zstd (and double delta on the row
    ids) that decoding was most of a read's CPU. LZ4, after a byte shuffle for the genes and values, reads
    ~2x faster for ~1.3x the bytes (200k cells: 703 vs 551 MB). 16-row tiles read a little faster than 64
    and 1.4x faster than 256; consolidating the fragments into one made reads slower, so it is not done.
    """
    capacity = int(np.clip(row_tile * max(mean_nnz, 1.0), 10_000, 1_000_000))
    shuffled_lz4 = ["ByteShuffleFilter", "LZ4Filter"]
    return {
        "tiledb": {
            "create": {
                "capacity": capacity,
                "cell_order": "row-major",
                "tile_order": "row-major",
                "dims": {
                    "soma_dim_0": {"tile": row_tile, "filters": ["LZ4Filter"]},
                    "soma_dim_1": {"tile": num_genes, "filters": shuffled_lz4},
                },
                "attrs": {"soma_data": {"filters": shuffled_lz4}},
            }
        }
    }


def _obs_schema(categories: dict[str, list[str]]) -> Any:
    import pyarrow as pa

    fields = [pa.field("soma_joinid", pa.int64(), nullable=False), pa.field("obs_id", pa.large_string())]
    fields += [pa.field(c, pa.dictionary(pa.int32(), pa.large_string()), nullable=True) for c in categories]
    return pa.schema(fields)


def _obs_table(source: Source, start: int, stop: int, codes: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    cols = {
        "soma_joinid": pa.array(np.arange(start, stop, dtype=np.int64)),
        "obs_id": pa.array(source.obs_ids(start, stop), type=pa.large_string()),
    }
    for c, cats in source.categories.items():
        idx = pa.array(codes[c].astype(np.int32), mask=codes[c] < 0)
        cols[c] = pa.DictionaryArray.from_arrays(idx, pa.array(cats, type=pa.large_string()))
    return pa.table(cols, schema=_obs_schema(source.categories))


def _x_table(start: int, block: sp.csr_matrix) -> Any:
    import pyarrow as pa

    rows = np.repeat(np.arange(start, start + block.shape[0], dtype=np.int64), np.diff(block.indptr))
    return pa.table(
        {
            "soma_dim_0": pa.array(rows),
            "soma_dim_1": pa.array(block.indices.astype(np.int64)),
            "soma_data": pa.array(block.data.astype(np.float32)),
        }
    )


def write_experiment(source: Source, uri: Path, *, block_rows: int, row_tile: int, progress: bool) -> int:
    """Create the experiment at `uri` and stream every block of `source` into it; returns nnz written."""
    import pyarrow as pa
    import tiledbsoma
    from tqdm import tqdm

    vocab, n, g = source.vocab, source.num_rows, len(source.vocab)
    nnz = 0
    with tiledbsoma.Experiment.create(str(uri)) as exp:
        obs = exp.add_new_dataframe("obs", schema=_obs_schema(source.categories), domain=[(0, max(n - 1, 0))])
        rna = exp.add_new_collection("ms").add_new_collection(MEASUREMENT, tiledbsoma.Measurement)
        var_schema = pa.schema(
            [
                pa.field("soma_joinid", pa.int64(), nullable=False),
                pa.field("var_id", pa.large_string()),
                pa.field("ensembl", pa.large_string()),
            ]
        )
        var = rna.add_new_dataframe("var", schema=var_schema, domain=[(0, g - 1)])
        var.write(
            pa.table(
                {
                    "soma_joinid": pa.array(np.arange(g, dtype=np.int64)),
                    "var_id": pa.array(vocab.genes, type=pa.large_string()),
                    "ensembl": pa.array([e or "" for e in vocab.ensembl], type=pa.large_string()),
                },
                schema=var_schema,
            )
        )
        x = rna.add_new_collection("X").add_new_sparse_ndarray(
            LAYER_OF_KIND[source.value_kind],
            type=pa.float32(),
            shape=(n, g),
            platform_config=x_platform_config(g, source.mean_nnz, row_tile),
        )
        exp.metadata["sclabel_vocab_hash"] = vocab.hash
        exp.metadata["sclabel_source"] = source.path
        obs_uri, x_uri = obs.uri, x.uri
        obs.close()
        x.close()
    # Reopened for writing: tiledbsoma 2.3 drops the dictionary (enumeration) values of categorical columns
    # written through the handle add_new_dataframe returns inside an open experiment.
    # Blocks arrive in row order with sorted genes: already TileDB's global order, so skip its sort.
    write_opts = {"tiledb": {"write": {"sort_coords": False}}}
    with (
        tiledbsoma.DataFrame.open(obs_uri, "w") as obs,
        tiledbsoma.SparseNDArray.open(x_uri, "w") as x,
        tqdm(total=n, unit="cells", disable=not progress or None) as bar,
    ):
        for start, block, codes in source.blocks(block_rows):
            x.write(_x_table(start, block), platform_config=write_opts)
            obs.write(_obs_table(source, start, start + block.shape[0], codes))
            nnz += block.nnz
            bar.update(block.shape[0])
    return nnz


def open_source(args: argparse.Namespace) -> Source:
    """The input named on the command line: a cell store directory or an .h5ad file."""
    src = args.input
    if is_remote(src):  # s3://bucket/prefix: a cell store there
        if args.vocab or args.layer or args.use_raw or args.obs_columns:
            raise SclabelError(f"{src}: --vocab, --layer, --use-raw and --obs-columns apply to .h5ad input")
        return open_store_source(src)
    if not src.exists():
        raise SclabelError(f"{src}: input not found")
    if src.is_dir():
        from sclabel_dist.data import format as fmt

        if not (src / fmt.INDEX_FILE).is_file():
            raise SclabelError(f"{src}: not a cell store (no {fmt.INDEX_FILE}) and not an .h5ad file")
        if args.vocab or args.layer or args.use_raw or args.obs_columns:
            raise SclabelError(f"{src}: --vocab, --layer, --use-raw and --obs-columns apply to .h5ad input")
        return open_store_source(src)
    if src.suffix not in (".h5ad", ".h5"):
        raise SclabelError(f"{src}: expected a cell store directory or an .h5ad file")
    cols = [c for c in args.obs_columns.split(",") if c] if args.obs_columns else None
    return open_h5ad_source(
        src, args.vocab, layer=args.layer, use_raw=args.use_raw, value_kind=args.value_kind, obs_columns=cols
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sclabel-data to-soma", description=__doc__.splitlines()[0])
    p.add_argument(
        "input", type=as_path, help="a cell store (directory or s3://bucket/prefix) or an .h5ad file"
    )
    p.add_argument("--out", required=True, type=Path, help="the SOMA experiment directory to create")
    p.add_argument("--vocab", type=Path, help="(.h5ad) vocabulary: a vocab.json or a cell store")
    p.add_argument("--layer", help="(.h5ad) read layers/LAYER instead of X")
    p.add_argument("--use-raw", action="store_true", help="(.h5ad) read raw/X")
    p.add_argument("--value-kind", choices=("auto", "counts", "lognorm"), default="auto", help="(.h5ad)")
    p.add_argument("--obs-columns", help="(.h5ad) comma-separated categorical obs columns (default: all)")
    p.add_argument("--block-rows", type=int, default=4096, help="rows per write block (memory)")
    p.add_argument("--row-tile", type=int, default=16, help="rows per TileDB space tile")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _is_experiment(path: Path) -> bool:
    """--overwrite replaces a SOMA experiment only, never another directory or file."""
    import tiledbsoma

    try:
        tiledbsoma.Experiment.open(str(path)).close()
    except Exception:  # tiledbsoma raises several types for "not an experiment"
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.out
    if out.exists() and not args.overwrite:
        raise SclabelError(f"{out}: already exists (use --overwrite)")
    if out.exists() and not _is_experiment(out):
        raise SclabelError(f"{out}: exists and is not a SOMA experiment; refusing to replace it")
    if args.block_rows < 1 or args.row_tile < 1:
        raise SclabelError("--block-rows and --row-tile must be at least 1")
    t0 = time.perf_counter()
    source = open_source(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replaced_on_success(out) as tmp:
            nnz = write_experiment(
                source, tmp, block_rows=args.block_rows, row_tile=args.row_tile, progress=not args.quiet
            )
    finally:
        for close in source.closers:
            close()
    dt = time.perf_counter() - t0
    print(
        f"to-soma: {source.num_rows} cells x {len(source.vocab)} genes, {nnz} non-zeros, layer "
        f"{LAYER_OF_KIND[source.value_kind]!r}, obs {list(source.categories)} -> {out} in {dt:.1f} s"
    )
    return 0
