"""The local runner: the pending batches of a restoration, one after the other, in this process.

Reading, computing and writing overlap: the next batch's input is read in a background thread
(:class:`Prefetch`, at most one batch ahead) and the previous batch is written (chunks,
checksums, done markers, pyramid levels) in another while the current one computes, at most one
batch behind.  On a GPU the network is a small part of a run (docs/benchmarks/gpu.md), so the
CPU-side work of three batches runs side by side instead of one after the other, and a batch's
blocks are written by several threads (:func:`pssr.util.io_threads`; each block is its own
chunk).  The dask runner (:mod:`pssr.blockwise.distributed`) runs the same batches as tasks; both depend
on :mod:`pssr.blockwise.engine` and not on each other, so either can resume the other's output.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pssr.blockwise.engine import Predictor, process_blocks, trim_heap, write_group
from pssr.blockwise.plan import Job, block_reads
from pssr.blockwise.tiling import Block
from pssr.nn.modelfile import LoadedModel
from pssr.util import io_threads

__all__ = ["Prefetch", "run_local"]


def _key(idx: tuple) -> tuple:
    return tuple((i.start, i.stop) if isinstance(i, slice) else i for i in idx)


class Prefetch:
    """The input, with the next batch's regions read in a background thread.

    ``start(i)`` (before batch ``i`` runs) takes batch ``i``'s regions, read while batch ``i-1``
    computed, and starts reading batch ``i+1``: reading overlaps computing, at most one batch
    ahead (bounded memory), and the network sees exactly the same data (bit-identical output).
    """

    def __init__(self, arr: Any, job: Job, batches: list[list[Block]]) -> None:
        self.arr, self.job, self.batches = arr, job, batches
        self.shape, self.dtype, self.ndim = tuple(arr.shape), arr.dtype, len(arr.shape)
        self._cache: dict[tuple, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pssr-prefetch")
        self._next = None

    def _read(self, i: int) -> dict[tuple, np.ndarray]:
        out = {}
        for b in self.batches[i]:
            for idx in block_reads(self.shape, self.job, b):
                out[_key(idx)] = np.asarray(self.arr[idx])
        return out

    def start(self, i: int) -> None:
        """Batch ``i`` is about to run."""
        self._cache = self._next.result() if self._next is not None else {}
        self._next = self._pool.submit(self._read, i + 1) if i + 1 < len(self.batches) else None

    def __getitem__(self, idx: tuple) -> np.ndarray:
        hit = self._cache.pop(_key(idx), None)
        return hit if hit is not None else self.arr[idx]

    def close(self) -> None:
        """Stop reading ahead."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def run_local(
    arr: Any,
    model: LoadedModel,
    job: Job,
    pending: list[list[Block]],
    done_keys: set[str],
    *,
    n_total: int,
    progress: bool = True,
    callback=None,
    on_written=None,
) -> bool:
    """Run the ``pending`` batches in this process on ``job.device``; True when cancelled.

    ``on_written(keys)`` is called with the keys of each batch's blocks once they are written.
    """
    from tqdm.auto import tqdm

    from pssr.blockwise import store

    group = store.open_arrays(job.out, mode="r+")
    pred = Predictor.for_job(model, job)
    count = len(done_keys)
    bar = tqdm(total=n_total, initial=count, disable=not progress, unit="block", desc="restore")
    vox, t0 = 0, time.monotonic()
    reader = Prefetch(arr, job, pending)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pssr-write")
    n_io = io_threads()
    blocks_pool = ThreadPoolExecutor(max_workers=n_io, thread_name_prefix="pssr-io") if n_io > 1 else None

    def write(blocks: list[Block], results: list[dict]) -> list[dict]:
        stats = write_group(job, blocks, results, done_keys, group, pool=blocks_pool)
        if on_written is not None:  # only ever called from this one thread, in batch order
            on_written([st["key"] for st in stats])
        del results
        trim_heap()
        return stats

    def finish(fut) -> bool:
        """Account for a written batch; True when the callback cancels."""
        nonlocal count, vox
        for st in fut.result():  # re-raises the writer's error
            count += 1
            vox += st["voxels"]
            bar.update(1)
            if callback is not None and callback(count, n_total) is False:
                return True
        bar.set_postfix_str(f"{vox / max(time.monotonic() - t0, 1e-9) / 1e6:.2f} Mvox/s")
        return False

    # On a GPU, scaling and casting the batch's HR blocks is the critical path's CPU part: on the
    # I/O threads. On the CPU the network dominates and leaves no core for it (not measurable here).
    post = None if str(job.device) != "cpu" else 1
    behind = None  # the previous batch's write, in flight while this batch computes
    try:
        for i, blocks in enumerate(pending):
            reader.start(i)
            results = process_blocks(reader, pred, job, blocks, post_threads=post)
            if behind is not None and finish(behind):
                return True  # this batch is computed but not written: it stays pending
            behind = writer.submit(write, blocks, results)
            del results
        if behind is not None:
            return finish(behind)
    finally:
        writer.shutdown(wait=True)  # a write in flight completes (its blocks are marked) or raises
        if blocks_pool is not None:
            blocks_pool.shutdown(wait=True)
        reader.close()
        bar.close()
    return False
