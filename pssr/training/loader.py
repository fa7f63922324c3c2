"""Training batches drawn ahead in worker processes (``pssr train --loader-workers N``).

On a GPU the network step takes milliseconds while one process crappifies patches at a few
hundred per second, so the accelerator waits on the sampler.  :class:`ParallelBatches` wraps a
:class:`~pssr.training.data.PairSampler` and draws the batch of step ``k`` in a pool of processes, a few
steps ahead.  The batch of step ``k`` depends only on ``(key, k)``, where ``key`` comes from the
sampler's generator state when training starts, so the batches are the same with any number of
workers and a resumed run (same generator state in the checkpoint, step counter from the
checkpoint) draws exactly the batches the uninterrupted run drew.  The sampler's own generator is
not advanced in this mode.

Workers are forked where the platform allows it (the sources are then shared, not copied),
and spawned elsewhere (the sampler is then pickled once per worker).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from pssr.errors import PssrError

__all__ = ["ParallelBatches", "batch_key"]

_SAMPLER: Any = None  # the sampler inside a worker process


def _init(sampler: Any) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the training process handles it
    # (checkpoint, then exit); a worker killed by it mid-task could leave the pool hanging.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _SAMPLER
    _SAMPLER = sampler


def _draw(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    key, step, batch = args
    return _SAMPLER.sample(batch, rng=np.random.default_rng([key, step]))


def batch_key(sampler: Any) -> int:
    """A 63-bit key from the sampler generator's state (what a checkpoint stores)."""
    state = json.dumps(sampler.rng.bit_generator.state, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(state.encode()).digest()[:8], "little") >> 1


class ParallelBatches:
    """A sampler look-alike whose :meth:`sample` returns step ``k``'s batch, drawn ahead in a pool.

    Parameters
    ----------
    sampler : PairSampler
        What draws patches (its ``validation_set`` and ``rng`` are passed through).
    workers : int
        Worker processes (>= 1).
    batch : int
        Patches per batch (every :meth:`sample` call must ask for this many).
    start : int
        The step of the first batch (see :meth:`seek` for a resumed run).
    ahead : int, optional
        Batches in flight (default ``2 * workers``).
    """

    def __init__(self, sampler: Any, workers: int, batch: int, start: int = 0, ahead: int | None = None):
        if workers < 1:
            raise PssrError(f"workers={workers} must be >= 1 (0 means: draw in the training process).")
        self.sampler, self.batch = sampler, batch
        self.ahead = ahead or 2 * workers
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        # concurrent.futures rather than multiprocessing.Pool: a worker that dies (killed, out of
        # memory) breaks the pool with an error instead of leaving a result that never comes.
        self.pool = ProcessPoolExecutor(
            workers, mp_context=mp.get_context(method), initializer=_init, initargs=(sampler,)
        )
        self.pending: deque = deque()
        self.seek(start)

    def seek(self, step: int) -> None:
        """Draw from step ``step`` on, keyed by the sampler's generator state now (after a resume)."""
        self.key = batch_key(self.sampler)
        self.step = self.next_submit = step
        for fut in self.pending:
            fut.cancel()
        self.pending.clear()

    @property
    def rng(self) -> np.random.Generator:
        """The wrapped sampler's generator (not advanced: batches depend on the step)."""
        return self.sampler.rng

    @property
    def scale(self) -> int:
        """The sampler's scale."""
        return self.sampler.scale

    def validation_set(self, n: int = 16, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
        """The sampler's fixed validation patches."""
        return self.sampler.validation_set(n, seed)

    def sample(self, batch: int, **_: Any) -> tuple[np.ndarray, np.ndarray]:
        """The next step's ``(lr, hr)`` batch."""
        if batch != self.batch:
            raise PssrError(f"batch={batch} differs from the loader's batch={self.batch}.")
        while len(self.pending) < self.ahead:
            self.pending.append(self.pool.submit(_draw, (self.key, self.next_submit, self.batch)))
            self.next_submit += 1
        try:
            out = self.pending.popleft().result()
        except BrokenProcessPool as e:
            raise PssrError(
                f"a --loader-workers process died while drawing the batch of step {self.step} (killed, "
                "or out of memory?); run again with fewer --loader-workers, or 0 to draw in the training "
                "process (--resume <out>.ckpt.safetensors continues from the last checkpoint)."
            ) from e
        self.step += 1
        return out

    def close(self) -> None:
        """Stop the workers (batches being drawn finish; those not started are dropped)."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ParallelBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
