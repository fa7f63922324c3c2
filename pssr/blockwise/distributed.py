"""The same blocks as dask.distributed tasks: a LocalCluster or an existing scheduler.

Each block is one task (retried by dask if a worker dies); each worker process loads the model
once and keeps it (and the opened input/output arrays) for every later task of the same job.
Tasks write their results straight into the output zarr on a shared filesystem and mark the
blocks done, exactly as the local runner (:mod:`pssr.blockwise.runners`) does, with the same fixed batches
of :mod:`pssr.blockwise.engine`, so either runner can resume the other's output; outputs agree up to
float summation order (workers run torch with one thread each).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from pssr.blockwise.tiling import Block
from pssr.errors import PssrError

if TYPE_CHECKING:
    from pssr.blockwise.plan import Job

logger = logging.getLogger(__name__)

__all__ = ["run_distributed"]

_CACHE: dict[str, Any] = {}
_LOCK = threading.Lock()
_POOL: Any = None  # the GPU worker's write threads (see _write_pool)


def _worker_state(job_json: str, storage_options: dict[str, Any] | None = None):
    """Model, input and output opened once per worker process and job."""
    from pssr.blockwise import store
    from pssr.blockwise.engine import Predictor, open_input
    from pssr.blockwise.plan import Job
    from pssr.nn.modelfile import load_model
    from pssr.nn.onnx_backend import available as onnx_available

    with _LOCK:
        st = _CACHE.get(job_json)
        if st is None:
            job = Job(**json.loads(job_json))
            import torch

            from pssr.nn.devices import worker_device

            device = worker_device(job.device, _worker_index())
            if device == "cpu":
                torch.set_num_threads(1)
            lm = load_model(job.model, device=device)
            backend = job.backend
            if backend == "onnxruntime" and not onnx_available():
                # A worker of a cluster set up without the [onnx] extra: torch computes the same
                # network (the backend is not part of the work, as the device is not).
                logger.warning(
                    "onnxruntime is not installed on this dask worker: it runs the network in torch"
                )
                backend = "torch"
            pred = Predictor.for_job(lm, job, device=device, backend=backend)
            arr = open_input(job, storage_options)
            if store.is_remote(job.out):  # the output's credentials came beside the job, not in it
                from pssr.io import remote

                remote.set_storage_options(job.out, storage_options)
            st = (job, pred, arr, store.open_arrays(job.out, mode="r+"), _write_pool(device))
            _CACHE.clear()  # one job at a time per worker
            _CACHE[job_json] = st
    return st


def _write_pool(device: str):
    """Threads writing a task's blocks side by side on a GPU worker; None on a CPU worker.

    On a GPU the network is a few per cent of a block's time and the worker's CPU-side work
    (chunk encoding, checksums, markers) sets the pace (docs/benchmarks/gpu.md); CPU workers
    compute with one torch thread each and already fill the cores.  One pool per worker process,
    shared by every job's tasks and never shut down while the process lives: a task of one job
    may still be writing with it when a task of another job arrives (a worker with several
    threads under an external scheduler).
    """
    global _POOL
    if device == "cpu":
        return None
    from concurrent.futures import ThreadPoolExecutor

    from pssr.util import io_threads

    n = io_threads()
    if n < 2:
        return None
    if _POOL is None:  # callers hold _LOCK
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="pssr-io")
    return _POOL


def _worker_index() -> int | None:
    """The index (name) of the dask worker running this task in a LocalCluster, or None elsewhere."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return None
    return name if isinstance(name, int) else None


def _local_cluster(device: str, workers: int | None, local_cluster):
    """A LocalCluster; on CUDA with dask-cuda installed (the ``[gpu]`` extra) a LocalCUDACluster.

    dask-cuda starts one worker per GPU, each seeing only its own GPU (``CUDA_VISIBLE_DEVICES``),
    and pins it to the GPU's CPUs; without it, plain workers take GPUs round robin
    (:func:`pssr.nn.devices.worker_device`), so several workers never all land on GPU 0.
    """
    kw = {"threads_per_worker": 1, "dashboard_address": None, "silence_logs": logging.ERROR}
    if device.startswith("cuda") and ":" not in device:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            logger.info(
                "dask-cuda is not installed (pip install 'pssr-toolkit[gpu]'): plain workers take GPUs "
                "round robin"
            )
        else:
            n = workers  # None: dask-cuda starts one worker per visible GPU
            logger.info("dask-cuda LocalCUDACluster: %s", f"{n} workers" if n else "one worker per GPU")
            return LocalCUDACluster(n_workers=n, **kw)
    return local_cluster(n_workers=workers or 1, processes=True, **kw)


def restore_group_task(
    job_json: str,
    blocks: list[Block],
    skip: set[str],
    storage_options: dict[str, Any] | None = None,
    run: str | None = None,
) -> list[dict[str, Any]]:
    """Dask task: restore one fixed batch of blocks, write and mark those not in ``skip``.

    The first block's stats carry ``retries``: the transient failures this task's worker retried.
    ``run``: the id of the run that owns an output on object storage (its done records carry it).
    """
    from pssr.blockwise import store
    from pssr.blockwise.engine import run_group
    from pssr.io.remote import retry_count

    job, pred, arr, group, pool = _worker_state(job_json, storage_options)
    if run is not None:
        store.ledger(job.out).run = run  # type: ignore[attr-defined]
    before = retry_count()
    stats = run_group(arr, pred, job, blocks, skip, group, pool=pool)
    if stats:
        stats[0] = {**stats[0], "retries": retry_count() - before}
    return stats


def run_distributed(
    job: Job,
    pending: list[list[Block]],
    done_keys: set[str],
    *,
    n_total: int,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    callback=None,
    retries: int = 2,
    on_written=None,
    storage_options: dict[str, Any] | None = None,
    counters: dict[str, int] | None = None,
) -> bool:
    """Run the ``pending`` batches on dask until all finished (or raises); True when cancelled.

    Each task is one fixed batch (:func:`pssr.blockwise.tiling.group_blocks`), as in a local run, so the
    output is bit-identical to it.  ``on_written(keys)`` is called (in this process) with the keys
    of each finished task's blocks; ``counters["retries"]`` adds up the workers' retried requests.
    """
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    if job.input == "<memory>":
        raise PssrError("distributed runs need the input on disk (a path workers can read).")
    cluster = None
    if scheduler:
        client = Client(scheduler, timeout="30s")
    else:
        if workers is not None and workers < 1:
            raise PssrError(f"workers={workers} must be >= 1.")
        cluster = _local_cluster(job.device, workers, LocalCluster)
        client = Client(cluster)
    bar = tqdm(
        total=n_total,
        initial=len(done_keys),
        disable=not progress,
        unit="block",
        desc=f"restore ({len(client.scheduler_info().get('workers', {}))} workers)",
    )
    job_json = job.to_json()
    done = len(done_keys)
    vox, t0 = 0, time.monotonic()
    skip = set(done_keys)
    from pssr.blockwise import store

    led = store.ledger(job.out)
    run = getattr(led, "run", None)
    try:
        futures = [
            client.submit(
                restore_group_task, job_json, g, skip, storage_options, run, retries=retries, pure=False
            )
            for g in pending
        ]
        for fut in as_completed(futures):
            stats = fut.result()  # re-raises a task's error after its retries ran out
            try:
                led.check()  # this run lost its output's lease (object storage): no further batch
            except BaseException:
                client.cancel(futures)
                raise
            if on_written is not None:
                on_written([st["key"] for st in stats])
            done += len(stats)
            if counters is not None:
                counters["retries"] = counters.get("retries", 0) + sum(st.get("retries", 0) for st in stats)
            bar.update(len(stats))
            vox += sum(st["voxels"] for st in stats)
            bar.set_postfix_str(f"{vox / max(time.monotonic() - t0, 1e-9) / 1e6:.2f} Mvox/s")
            if callback is not None and callback(done, n_total) is False:
                client.cancel(futures)
                return True
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    return False
