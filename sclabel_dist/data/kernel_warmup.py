"""The loader's compiled kernels made ready off the first batch's path.

numba's first call in a process initialises its CPU target (~0.7 s of one core, mostly imports holding the
GIL) and then loads each signature's cached code, or compiles it on the first run after an install (seconds).
A stream runs that in a thread of its own (`start` / `warming` / `finish`). While a warm-up is under way,
`compiled_ready()` is False and the raw paths (the CSR row gather, the SOMA COO -> CSR conversion) take their
numpy twins, which give the same arrays, so no raw batch waits on numba (benchmarks/RESULTS.md, issue 20,
session 10). The tokeniser has no numpy twin in the package: a tokenised batch waits for its kernel.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_lock = threading.Lock()
_started = threading.Event()  # a warm-up was started in this process
_ready = threading.Event()  # ... and it has finished (successfully or not: the stream reports errors)
_numba_init = threading.Event()  # start_numba_init has run
_local = threading.local()  # .warming: this thread is the warm-up, which must call the kernels themselves


def compiled_ready() -> bool:
    """True when the numba kernels can be called without waiting on their initialisation: no warm-up is
    under way in this process (then a first call initialises them where it is made, as numba does), or it has
    finished, or this is the warm-up's own thread."""
    return not _started.is_set() or _ready.is_set() or getattr(_local, "warming", False)


def start() -> bool:
    """Mark a warm-up as under way. True for the first caller, which must run it and then call `finish`."""
    with _lock:
        if _started.is_set():
            return False
        _started.set()
        return True


def finish() -> None:
    _ready.set()


@contextmanager
def warming() -> Iterator[None]:
    """Within: this thread calls the compiled kernels whatever `compiled_ready` says to the others."""
    _local.warming = True
    try:
        yield
    finally:
        _local.warming = False


def start_numba_init() -> None:
    """Initialise numba's CPU target in a background thread, once per process (a tokenised stream does it
    while its stores open: its first batch needs the kernels)."""
    with _lock:
        if _numba_init.is_set():
            return
        _numba_init.set()
    threading.Thread(target=_init_numba, name="sclabel-kernels", daemon=True).start()


def _init_numba() -> None:
    """Import the kernels and make the cheapest cached call (a warm-up: the stream reports its own errors)."""
    try:
        from sclabel_dist.data.kernels import take_rows

        empty = np.zeros(0, dtype=np.int64)
        take_rows(np.zeros(1, np.int64), empty.astype(np.uint16), empty.astype(np.uint8), empty)
    except Exception:  # noqa: BLE001 - a warm-up only
        pass


def compile_all() -> list[str]:
    """Compile (or load from numba's on-disk cache) the kernels of the usual store layouts: uint16 gene
    indices; uint8, uint16 and uint32 counts or float32 log-normalised values; binned and continuous
    tokens, with the gene bag; the row gather; the SOMA conversion. Otherwise the first process after an
    install compiles the ones it meets (seconds each): a tokenised stream inside its first batch, a raw one
    beside its first batches. Returns what it ran."""
    from sclabel_dist.config import TokenizeConfig
    from sclabel_dist.data import kernels
    from sclabel_dist.data.tokenize import tokenize_block

    indptr = np.array([0, 3, 5], dtype=np.int64)
    genes = np.array([1, 4, 9, 0, 2], dtype=np.uint16)
    rows = np.array([1, 0], dtype=np.int64)
    done = []
    for dtype in (np.uint8, np.uint16, np.uint32, np.float32):
        values = np.array([3, 1, 2, 5, 1], dtype=dtype)
        kernels.take_rows(indptr, genes, values, rows)
        for encoding in ("binned", "continuous"):
            cfg = TokenizeConfig(max_len=3, value_encoding=encoding, gene_bag=True)
            for train in (True, False):
                rng = np.random.default_rng(0)
                lognorm = np.full(2, dtype == np.float32)
                tokenize_block(
                    indptr, genes, values, lognorm, cfg, train=train, mask=train, rng=rng, rows=rows
                )
            done.append(f"{np.dtype(dtype).name} {encoding}")
    coords = np.array([7, 7, 9], dtype=np.int64)
    kernels.coo_to_csr(coords, coords - 7, np.ones(3, np.float32), np.array([7, 9]), np.arange(3), np.uint16)
    return [*done, "coo_to_csr"]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    argparse.ArgumentParser(
        prog="sclabel-data compile-kernels", description=compile_all.__doc__.split("Returns")[0]
    ).parse_args(argv)
    t0 = time.perf_counter()
    done = compile_all()
    print(
        f"compiled kernels: {', '.join(done)} ({time.perf_counter() - t0:.1f} s; cached for later processes)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
