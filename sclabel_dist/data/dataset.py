"""The streaming pipeline: partition -> shuffle -> read (threads) -> tokenise -> mask -> batch, with exact resume.

One StreamingCellDataset per rank. Iterating it yields CellBatch (or raw CSRBlock) forever for split "train",
epoch after epoch, or one deterministic pass for "val". Work runs in a small thread pool (no forked workers:
TileDB and zarr hold threads and locks that do not survive fork): window reads are submitted up to
`read_threads * read_ahead` windows ahead (into the next epoch near an epoch's end, so the readers never idle
at the boundary), batch assembly + tokenisation a few batches ahead, so memory is bounded by the configuration.
The pool's FIFO order guarantees a batch job only waits on reads submitted before it, so the pool never
deadlocks on itself.

State: {seed, epoch, samples_seen, world_size, history, epoch_samples, elastic}; samples_seen counts the
batches handed to the caller (not those read ahead). See partition.py for why these integers reproduce the
stream. data.elastic=true streams the world-size-invariant order instead (partition.plan_slices): every rank
takes its slice of each optimizer step's global batch, which needs `grad_accum`, and each cell's mask is keyed
by its epoch position, so a resume at any world size replays the same steps.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sclabel_dist.config import DataConfig, TokenizeConfig
from sclabel_dist.data import kernel_warmup, partition, shuffle
from sclabel_dist.data.batch import CellBatch
from sclabel_dist.data.corpus import Corpus, build_corpus
from sclabel_dist.data.stores.base import CSRBlock
from sclabel_dist.data.tokenize import tokenize_block
from sclabel_dist.errors import SclabelError

_BATCHES_AHEAD = 2  # per read thread: tokenised batches in flight
_MMAP_THRESHOLD = 32 << 20  # glibc's largest
_TRIM_THRESHOLD = 128 << 20


def _keep_freed_memory() -> None:
    """Let glibc reuse the memory of freed batches instead of handing it back to the kernel.

    A tokenised batch is ~11 MB of arrays made in a reader thread and freed by the consumer. With glibc's
    defaults each comes from a fresh mmap (or a heap top trimmed as soon as it is freed), so every batch
    page-faults all its memory in again: a third of the tokenised path's CPU (benchmarks/RESULTS.md, issue
    20). Raising the mmap and trim thresholds (process-wide; memory is kept, at most what was in use at
    once) makes them reuse the arena. Skipped off glibc and when MALLOC_*_THRESHOLD_ is set by the user.
    """
    import ctypes
    import os
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, _TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class StreamingCellDataset:
    """A rank's stream of batches over a Corpus; `state_dict()` / `load_state_dict()` resume it exactly."""

    def __init__(
        self,
        corpus: Corpus,
        data: DataConfig,
        tokenize: TokenizeConfig,
        *,
        rank: int,
        world_size: int,
        seed: int,
        split: str = "train",
        raw: bool = False,
        grad_accum: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise SclabelError(f"rank {rank} outside world size {world_size}")
        tokenize.validate()
        self.corpus = corpus
        self.data = data
        self.tokenize = tokenize
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.split = split
        self.raw = raw
        self.train = split == "train"
        self.grad_accum = grad_accum  # micro-batches per optimizer step: the slices of data.elastic
        self.elastic = data.elastic and self.train
        self.vocab = corpus.stores[0].vocab if corpus.stores else None
        self.value_kinds = sorted({k for s in corpus.stores for _, _, k in s.value_kinds()})
        self._epoch = 0
        self._history: list[list[int]] = []  # [world_size, global samples] of earlier segments this epoch
        self._consumed = 0  # rows this rank handed out in the current segment (equal on every rank)
        self._pool: ThreadPoolExecutor | None = None
        self._num_batches: int | None = None
        # Reads of the next epoch's first windows, submitted while this epoch's last windows drain:
        # (epoch, windows {w: future}, next window to submit). Only a stream that reaches the epoch's end
        # uninterrupted uses them (segment 0 from position 0); anything else drops them.
        self._carry: tuple[int, dict[int, Future], int] | None = None
        self._pin = torch.cuda.is_available()
        _keep_freed_memory()
        # The compiled kernels are made ready in a thread of their own (kernel_warmup): a tokenised stream's
        # while the first window is read, a raw stream's once its first batch is out, having taken the numpy
        # paths until then (benchmarks/RESULTS.md, issue 20, sessions 7 and 10).
        self._owns_warmup = kernel_warmup.start()
        self._handed_out = threading.Event()  # the first batch has reached the caller
        self._warm = threading.Thread(target=self._warm_kernels, name="sclabel-warm", daemon=True)
        self._warm.start()

    def _warm_kernels(self) -> None:
        """Run the first batch's code on one cell of the first store with the compiled kernels: loads the
        cached code of the signatures the stream will call (a batch that needs one meanwhile waits on numba's
        compile lock and then finds it loaded). A raw stream does it after its first batch. Then, once the
        first batch is out, one full garbage collection (~0.1 s holding the GIL), here rather than at a random
        point mid-stream in every thread: importing numba made ~100k objects. Failures are left to the
        stream to report."""
        import gc

        if self.raw:
            self._handed_out.wait(timeout=30)
        try:
            with kernel_warmup.warming():
                import sclabel_dist.data.kernels  # noqa: F401

                if self.corpus.total_rows:
                    first = next(s for s, n in enumerate(self.corpus.num_rows) if n)
                    block, order = self.corpus.read(np.array([first]), np.zeros(1, dtype=np.int64))
                    self._batch_from(block, order, np.random.default_rng(0))
        except Exception:  # noqa: BLE001 - only a warm-up: the stream reports its own errors
            pass
        finally:
            if self._owns_warmup:
                kernel_warmup.finish()
        self._handed_out.wait(timeout=30)
        gc.collect()

    # -- plans -----------------------------------------------------------------------------------------

    def _epoch_units(self, epoch: int) -> partition.Units:
        if not self.train:  # validation: every selected row once, in store order
            return self.corpus.chunks
        return partition.epoch_units(
            self.corpus.chunks, seed=self.seed, epoch=epoch, weights=self.data.weights or None
        )

    def _plan(self, units: partition.Units) -> partition.RankPlan | partition.SlicePlan:
        if self.elastic:
            return partition.plan_slices(
                units,
                rank=self.rank,
                world=self.world_size,
                batch_size=self.data.batch_size,
                grad_accum=self.grad_accum,
                window_units=self.data.shuffle_chunks,
            )
        return partition.plan_rank(
            units,
            rank=self.rank,
            world=self.world_size,
            batch_size=self.data.batch_size,
            window_units=self.data.shuffle_chunks,
            drop_last=self.data.drop_last and self.train,
        )

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches every rank delivers in an epoch at this world size (with mixing weights: +-1 across epochs)."""
        if self._num_batches is None:
            self._num_batches = self._plan(self._epoch_units(0)).num_batches
        return self._num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    # -- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A few JSON-able integers describing what the caller has consumed."""
        done = sum(s for _, s in self._history)
        return {
            "seed": self.seed,
            "epoch": self._epoch,
            "samples_seen": done + self._consumed * self.world_size,
            "world_size": self.world_size,
            "history": [list(h) for h in self._history],
            "epoch_samples": self._epoch_units(self._epoch).num_rows,
            "elastic": self.elastic,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from state_dict(); another world size repartitions the rest of the epoch (partition.py)."""
        try:
            seed, epoch, seen, world = (
                int(state[k]) for k in ("seed", "epoch", "samples_seen", "world_size")
            )
            history = [[int(w), int(s)] for w, s in state.get("history", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise SclabelError(f"loader state {state!r}: malformed ({exc})") from None
        self.seed, self._epoch = seed, epoch
        expected = state.get("epoch_samples")
        if expected is not None and int(expected) != self._epoch_units(epoch).num_rows:
            raise SclabelError(
                f"loader state: the checkpoint's epoch had {expected} cells, this corpus has "
                f"{self._epoch_units(epoch).num_rows}; the stores, filters or splits changed since"
            )
        current = seen - sum(s for _, s in history)
        if current % world:
            raise SclabelError(f"loader state: {current} samples do not split over {world} ranks")
        if bool(state.get("elastic", False)) != self.elastic and seen > 0:
            raise SclabelError(
                f"loader state: the checkpoint streamed epoch {epoch} with data.elastic="
                f"{str(bool(state.get('elastic', False))).lower()}; resume it with the same setting"
            )
        if self.elastic:
            # One global stream for any world size: each rank continues at its slice of the same global step.
            step_cells = self.data.batch_size * self.grad_accum * self.world_size
            if current % step_cells:
                raise SclabelError(
                    f"loader state: {current} samples are not whole steps of {step_cells} cells; the global "
                    "batch changed since the checkpoint"
                )
            self._history, self._consumed, self._carry = [], current // self.world_size, None
            return
        if world != self.world_size and current > 0:
            # Close the old world's segment; the new world gets what remains of the epoch.
            history.append([world, current])
            current = 0
        self._history = history
        self._consumed = current // world if world == self.world_size else 0
        self._carry = None

    # -- iteration ---------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[CellBatch | CSRBlock]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.data.read_threads, thread_name_prefix="sclabel-read")
        if not self.train:
            yield from self._segment(self._plan(self._epoch_units(0)), 0, 0, 0, count=False)
            return
        if self.num_batches_per_epoch == 0:
            raise SclabelError(
                f"{self.corpus.total_rows} training cells give no full batch of {self.data.batch_size} on each "
                f"of {self.world_size} ranks: lower data.batch_size or add data"
            )
        while True:
            units = partition.segment_units(
                self._epoch_units(self._epoch),
                [tuple(h) for h in self._history],
                window_units=self.data.shuffle_chunks,
                seed=self.seed,
                epoch=self._epoch,
            )
            segment = len(self._history)
            yield from self._segment(self._plan(units), self._epoch, segment, self._consumed, count=True)
            self._epoch += 1
            self._history = []
            self._consumed = 0

    def _segment(
        self, plan: partition.RankPlan, epoch: int, segment: int, start: int, *, count: bool
    ) -> Iterator[CellBatch | CSRBlock]:
        """The batches of one segment from stream position `start` (a multiple of the batch size)."""
        pool = self._pool
        assert pool is not None
        bsz = self.data.batch_size
        windows: dict[int, Future] = {}
        next_window = plan.window_of(start) if start < plan.num_samples else plan.num_windows
        carry, self._carry = self._carry, None
        if carry is not None and carry[0] == epoch and segment == 0 and start == 0:
            _, windows, next_window = carry
        max_windows = self.data.read_threads * self.data.read_ahead
        pending: deque[Future] = deque()
        b_next = start // bsz
        following: list = []  # [plan, windows, next window] of the next epoch, once its reads start

        def submit_reads(upto: int) -> None:
            nonlocal next_window
            while next_window <= min(upto, plan.num_windows - 1):
                windows[next_window] = pool.submit(self._read_window, plan, next_window, epoch, segment)
                next_window += 1
            if count and upto >= plan.num_windows:
                # The read-ahead horizon passes the epoch's end: keep the readers busy with the next
                # epoch's first windows (the batches between stay bounded by the same max_windows).
                if not following:
                    following.extend([self._plan(self._epoch_units(epoch + 1)), {}, 0])
                nxt, ahead, w = following
                while w <= min(upto - plan.num_windows, nxt.num_windows - 1):
                    ahead[w] = pool.submit(self._read_window, nxt, w, epoch + 1, 0)
                    w += 1
                following[2] = w

        try:
            while b_next < plan.num_batches or pending:
                while b_next < plan.num_batches and len(pending) < _BATCHES_AHEAD * self.data.read_threads:
                    p0 = min(b_next * bsz, plan.num_samples)
                    p1 = min(p0 + bsz, plan.num_samples)
                    first = plan.window_of(p0)
                    last = plan.window_of(p1 - 1) if p1 > p0 else first
                    # This batch's windows, then the batch, then the read-ahead: the first batch waits on
                    # its own window only, not on the whole read-ahead (FIFO: still only on earlier jobs).
                    submit_reads(last)
                    for w in [w for w in windows if w < first]:
                        del windows[w]  # batch jobs already hold the futures they need
                    parts = [
                        (windows[w], int(plan.window_starts[w])) for w in range(first, last + 1) if p1 > p0
                    ]
                    keys = plan.global_positions(p0, p1) if isinstance(plan, partition.SlicePlan) else None
                    pending.append(pool.submit(self._make_batch, parts, p0, p1, epoch, segment, b_next, keys))
                    submit_reads(max(last, first + max_windows - 1))
                    b_next += 1
                batch = pending.popleft().result()
                if count:
                    self._consumed += bsz  # counted when handed over: read-ahead is not consumption
                if following and b_next >= plan.num_batches and not pending:
                    self._carry = (epoch + 1, following[1], following[2])  # set before the last hand-over
                self._handed_out.set()
                yield batch
        finally:
            # A consumer that stops early (validation reads only its first batches) leaves reads queued:
            # cancel those not yet started, so they do not compete with training. Done ones are unaffected.
            for fut in [*pending, *windows.values()]:
                fut.cancel()

    def _read_window(self, plan: partition.RankPlan, w: int, epoch: int, segment: int) -> tuple:
        store, pos = partition.window_rows(
            plan, w, seed=self.seed, epoch=epoch, segment=segment, rank=self.rank, shuffle_=self.train
        )
        return self.corpus.read(store, pos)

    def _make_batch(
        self,
        parts: list[tuple[Future, int]],
        p0: int,
        p1: int,
        epoch: int,
        segment: int,
        index: int,
        keys: np.ndarray | None = None,
    ) -> CellBatch | CSRBlock:
        """Rows [p0, p1) of the stream from the windows covering them, tokenised unless raw.

        keys: the cells' global epoch positions (data.elastic): masks drawn per cell, not per batch."""
        pieces = []
        for fut, w_start in parts:
            block, order = fut.result()
            lo, hi = max(p0 - w_start, 0), min(p1 - w_start, len(order))
            if hi > lo:
                pieces.append((block, order[lo:hi]))
        if self.raw:
            rng = None
        elif keys is None:
            rng = shuffle.token_rng(self.seed, epoch, segment, self.rank, index)
        else:
            rng = shuffle.cell_token_rng(self.seed, epoch)
        if len(pieces) == 1:
            return self._batch_from(*pieces[0], rng, keys)
        return self._batch_from(
            CSRBlock.concat([b.take(r) for b, r in pieces], self.corpus.num_genes), None, rng, keys
        )

    def _batch_from(
        self, block: CSRBlock, rows: np.ndarray | None, rng: Any, keys: np.ndarray | None = None
    ) -> CellBatch | CSRBlock:
        """The batch of `block`'s `rows` (all of them when None), tokenised unless raw.

        A batch inside one window (the usual case) is tokenised from its rows in place."""
        if self.raw:
            return block if rows is None else block.take(rows)
        batch = tokenize_block(
            block.indptr,
            block.indices,
            block.data,
            block.lognorm,
            self.tokenize,
            train=self.train,
            mask=True,
            rng=rng,
            rows=rows,
            cell_keys=keys,
        )
        return batch.pin_memory() if self._pin else batch

    def close(self) -> None:
        """Stop the reader threads and close the stores."""
        self._handed_out.set()
        self._warm.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.corpus.close()


def build_dataset(
    data: DataConfig,
    tokenize: TokenizeConfig,
    *,
    rank: int,
    world_size: int,
    seed: int,
    split: str = "train",
    raw: bool = False,
    grad_accum: int = 1,
) -> StreamingCellDataset:
    """Open the corpus of `split` and return this rank's stream (raw=True: CSRBlock batches, no tokenising)."""
    if not raw:  # numba's initialisation overlaps the stores' opening (a raw stream's first batch needs none)
        kernel_warmup.start_numba_init()
    corpus = build_corpus(data, split=split, seed=seed)
    return StreamingCellDataset(
        corpus,
        data,
        tokenize,
        rank=rank,
        world_size=world_size,
        seed=seed,
        split=split,
        raw=raw,
        grad_accum=grad_accum,
    )
