"""`sclabel-data inspect STORE`: cells, genes, nnz, shard sizes, dtypes, obs columns and match reports."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores.location import as_path


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summarize(store: str | Path) -> dict[str, Any]:
    """A JSON-able summary of a store, a directory or s3://... (reads index.json and the reports, not the shards)."""
    store = as_path(store)
    index = fmt.read_index(store)
    rows = [s.num_rows for s in index.shards]
    datasets = []
    for d in index.datasets:
        rp = store / d.report
        report = json.loads(rp.read_text()) if rp.is_file() else {}
        datasets.append(
            {
                **vars(d),
                "shards": sum(s.dataset == d.name for s in index.shards),
                "match": {
                    k: report.get(k)
                    for k in (
                        "genes_matched",
                        "genes_total",
                        "fraction_genes",
                        "fraction_counts",
                        "duplicates_dropped",
                    )
                },
            }
        )
    return {
        "store": str(store),
        "format": f"{index.format} v{index.format_version}",
        "num_rows": index.num_rows,
        "num_genes": index.num_genes,
        "nnz": index.nnz,
        "mean_nnz_per_cell": round(index.nnz / max(index.num_rows, 1), 1),
        "vocab_hash": index.vocab_hash,
        "num_shards": index.num_shards,
        "shard_rows": {
            "min": min(rows, default=0),
            "max": max(rows, default=0),
            "mean": round(sum(rows) / max(len(rows), 1), 1),
        },
        "dtypes": sorted({f"{s.indices_dtype}/{s.data_dtype}" for s in index.shards}),
        "obs_columns": {c: len(v) for c, v in index.obs_columns.items()},
        "disk_bytes": disk_bytes(store),
        "datasets": datasets,
    }


def format_text(s: dict[str, Any]) -> str:
    lines = [
        f"{s['store']}  ({s['format']}, vocab {s['vocab_hash'][:12]})",
        f"cells {s['num_rows']:,}  genes {s['num_genes']:,}  nnz {s['nnz']:,}  ({s['mean_nnz_per_cell']} per cell)",
        f"shards {s['num_shards']}  rows/shard min {s['shard_rows']['min']} max {s['shard_rows']['max']} mean {s['shard_rows']['mean']}",
        f"dtypes (indices/data) {', '.join(s['dtypes'])}  disk {s['disk_bytes'] / 1e6:.1f} MB",
        f"obs columns {', '.join(f'{c} ({n} categories)' for c, n in s['obs_columns'].items()) or '-'}",
        "",
        f"{'dataset':<40} {'kind':<8} {'cells':>9} {'genes matched':>16} {'counts':>8} {'dups':>5}",
    ]
    for d in s["datasets"]:
        m = d["match"]
        genes = f"{m['genes_matched']}/{m['genes_total']}" if m.get("genes_total") else "-"
        frac = f"{m['fraction_counts']:.1%}" if m.get("fraction_counts") is not None else "-"
        lines.append(
            f"{d['name']:<40} {d['value_kind']:<8} {d['num_rows']:>9,} {genes:>16} {frac:>8} {m.get('duplicates_dropped') or 0:>5}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sclabel-data inspect", description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    summary = summarize(args.store)
    print(json.dumps(summary, indent=1) if args.json else format_text(summary))
    return 0
