"""A plan before a big run: blocks, output size, disk, memory and time (``pssr plan``).

Which blocks hold data is :func:`pssr.blockwise.plan.work_blocks`' to say (the run's own plan:
blocks that read no stored input chunk, or are masked out, are skipped).  :func:`disk_needed`
bounds the bytes an output takes (uncompressed populated blocks, side arrays and the pyramid);
:func:`calibrate` restores a few real blocks here (nothing written) to time them and measure memory.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pssr.blockwise.plan import Job
from pssr.blockwise.tiling import Block

__all__ = ["calibrate", "disk_needed"]


def disk_needed(job: Job, blocks: list[Block], n_levels: int) -> int:
    """Upper bound of the bytes the output's blocks take (uncompressed; pyramid levels included)."""
    s = job.scale
    lr_px = sum((b.core[1] - b.core[0]) * (b.core[3] - b.core[2]) for b in blocks)
    pyramid = sum(4.0**-k for k in range(n_levels))  # 1 + 1/4 + 1/16 ...
    total = lr_px * s * s * (np.dtype(job.out_dtype).itemsize * pyramid + (4 if job.tta else 0))
    if job.fidelity:
        total += lr_px * 4
    return int(total)


def calibrate(arr: Any, model: Any, job: Job, blocks: list[Block], n: int = 3) -> dict[str, float]:
    """Restore up to ``n`` batches of real blocks here (nothing written): seconds per block, peak RSS.

    The first batch warms the network up and is not timed (when there is more than one).
    """
    import resource

    from pssr.blockwise.engine import Predictor, process_blocks
    from pssr.blockwise.tiling import group_blocks

    pred = Predictor.for_job(model, job)
    groups = group_blocks(blocks, job.batch)[: max(1, n) + 1]
    times, counted = 0.0, 0
    for i, g in enumerate(groups):
        t0 = time.perf_counter()
        process_blocks(arr, pred, job, g)
        dt = time.perf_counter() - t0
        if i > 0 or len(groups) == 1:
            times += dt
            counted += len(g)
    return {
        "blocks_timed": counted,
        "seconds_per_block": times / max(counted, 1),
        # the process's peak so far: input opened, sample read, model loaded, batches restored
        "peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
    }
