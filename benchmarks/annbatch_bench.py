"""annbatch side of benchmarks/loader_bench.py; runs in .bench/venv312 (annbatch needs Python 3.12).

    python annbatch_bench.py prepare IN.h5ad OUT_COLLECTION     # DatasetCollection.add_adatas, defaults
    python annbatch_bench.py run OUT_COLLECTION                 # prints one JSON line of results

Loader settings as annbatch recommends for this comparison: chunk_size 256, preload_nchunks 32, shuffle,
zarrs codec pipeline, sparse CSR batches (no GPU preloading on CPU machines).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_IMPORTS_START = time.perf_counter()  # import_s: zarr here, anndata and annbatch in run()
import zarr  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_measure import measure  # noqa: E402

zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def prepare(h5ad: str, out: str) -> None:
    from annbatch import DatasetCollection

    DatasetCollection(out).add_adatas(adata_paths=[h5ad], shuffle=True)


def load_x_only(g):
    """X plus an obs with no columns: the loader yields only what the benchmark compares (the matrix)."""
    import anndata as ad

    obs = ad.io.read_elem(g["obs"])
    return ad.AnnData(X=ad.io.sparse_dataset(g["X"]), obs=obs[[]])


def run(collection: str, warmup: int, batches: int, repeats: int) -> dict:
    import anndata as ad
    from annbatch import DatasetCollection, Loader

    t0 = time.perf_counter()  # the clock starts after the imports, as every method's does (loader_bench.py)
    import_s = t0 - _IMPORTS_START
    with ad.settings.override(remove_unused_categories=False):
        loader = Loader(
            batch_size=256, chunk_size=256, preload_nchunks=32, shuffle=True, preload_to_gpu=False
        )
        loader = loader.use_collection(DatasetCollection(collection), load_adata=load_x_only)

    def forever():
        while True:
            yield from loader

    # The same timing and per-repeat records as ours (bench_measure.measure: stdlib only, so it imports here).
    out = measure(lambda: forever(), warmup, batches, repeats, lambda b: b["X"].shape[0], t0=t0)
    return {**out, "import_s": import_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=("prepare", "run"))
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.command == "prepare":
        prepare(*args.paths)
    else:
        print(json.dumps(run(args.paths[0], args.warmup, args.batches, args.repeats)))


if __name__ == "__main__":
    main()
