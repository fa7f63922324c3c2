"""The local runner: the pending batches of a restoration, one after the other, in this process.

Reading overlaps computing (:class:`Prefetch`: the next batch's input is read in a background
thread while the current one computes, at most one batch ahead).  The dask runner
(:mod:`pssr.distributed`) runs the same batches as tasks; both depend on :mod:`pssr.engine`
and not on each other, so either can resume the other's output.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pssr.engine import Job, Predictor, block_reads, run_group
from pssr.modelfile import LoadedModel
from pssr.tiling import Block

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
    import zarr
    from tqdm.auto import tqdm

    group = zarr.open_group(job.out, mode="r+")
    pred = Predictor(model, device=job.device, tta=job.tta, precision=job.precision)
    count = len(done_keys)
    bar = tqdm(total=n_total, initial=count, disable=not progress, unit="block", desc="restore")
    vox, t0 = 0, time.monotonic()
    reader = Prefetch(arr, job, pending)
    try:
        for i, blocks in enumerate(pending):
            reader.start(i)
            stats = run_group(reader, pred, job, blocks, done_keys, group)
            if on_written is not None:
                on_written([st["key"] for st in stats])
            for st in stats:
                count += 1
                vox += st["voxels"]
                bar.update(1)
                if callback is not None and callback(count, n_total) is False:
                    return True
            bar.set_postfix_str(f"{vox / max(time.monotonic() - t0, 1e-9) / 1e6:.2f} Mvox/s")
    finally:
        reader.close()
        bar.close()
    return False
