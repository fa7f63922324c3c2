"""The dask runner: a LocalCluster, a separate scheduler and workers, a worker killed mid-run."""

import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from pssr.blockwise.predict import restore
from pssr.io import formats as io


def _same_up_to_float_order(a, b):
    # Workers run torch with 1 thread, this process with 2: the same blocks and batches give the
    # same result up to float summation order (never a seam, never a missing block).
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.ptp(b)))


class _DieOnce:
    """Worker plugin: the first task to start executing kills its worker process (once)."""

    def __init__(self, flag):
        self.flag = str(flag)

    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, **kw):
        import os as _os

        if finish == "executing" and _os.path.exists(self.flag):
            _os.remove(self.flag)
            _os._exit(1)


@pytest.mark.slow
def test_local_cluster_two_workers_matches_local(model_path, isbi, tmp_path):
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=(2, 96, 96), chunks=(1, 48, 48), dtype="uint8")
    z[...] = isbi[:2, :96, :96]
    out = tmp_path / "d.ome.zarr"
    restore(
        str(tmp_path / "in.zarr"),
        model=model_path,
        output=out,
        tile=32,
        workers=2,
        progress=False,
        dtype="float32",
    )
    ref = restore(isbi[:2, :96, :96], model=model_path, tile=32, progress=False, dtype="float32").output
    _same_up_to_float_order(np.asarray(io.read_image(out).data[...]), ref)


@pytest.mark.slow
def test_separate_scheduler_and_worker_processes(model_path, isbi, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    sched = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            ":0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1", "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        from dask.distributed import Client

        with Client(addr, timeout="60s") as c:
            c.wait_for_workers(1, timeout=60)
        src = io.write_tiff(tmp_path / "in.tif", isbi[:2, :96, :96], axes="ZYX")
        out = tmp_path / "s.ome.zarr"
        restore(
            str(src), model=model_path, output=out, tile=32, scheduler=addr, progress=False, dtype="float32"
        )
        ref = restore(isbi[:2, :96, :96], model=model_path, tile=32, progress=False, dtype="float32").output
        _same_up_to_float_order(np.asarray(io.read_image(out).data[...]), ref)
    finally:
        for p in (worker, sched):
            p.terminate()
            p.wait(timeout=30)


@pytest.mark.slow
def test_worker_death_is_retried_and_output_complete(model_path, isbi, tmp_path):
    from dask.distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import WorkerPlugin

    plugin_cls = type("DieOnce", (_DieOnce, WorkerPlugin), {})
    flag = tmp_path / "die-once"
    flag.write_text("1")
    src = io.write_tiff(tmp_path / "in.tif", isbi[:2, :96, :96], axes="ZYX")
    out = tmp_path / "w.ome.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            client.register_plugin(plugin_cls(flag))
            restore(
                str(src),
                model=model_path,
                output=out,
                tile=32,
                scheduler=cluster.scheduler_address,
                progress=False,
                dtype="float32",
            )
    assert not flag.exists()  # a worker really died
    ref = restore(isbi[:2, :96, :96], model=model_path, tile=32, progress=False, dtype="float32").output
    _same_up_to_float_order(np.asarray(io.read_image(out).data[...]), ref)
    assert zarr.open_group(str(out), mode="r").attrs["pssr"]["status"] == "complete"


def test_cuda_jobs_use_dask_cuda_when_installed(monkeypatch):
    """On CUDA, dask-cuda's LocalCUDACluster (one worker per GPU) is used when the [gpu] extra is there."""
    import types

    from pssr.blockwise import distributed

    made = {}

    class FakeCUDACluster:
        def __init__(self, **kw):
            made["cuda"] = kw

    def plain(**kw):
        made["plain"] = kw

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=FakeCUDACluster))
    assert isinstance(distributed._local_cluster("cuda", None, plain), FakeCUDACluster)
    assert made["cuda"]["n_workers"] is None and made["cuda"]["threads_per_worker"] == 1
    distributed._local_cluster("cuda", 3, plain)
    assert made["cuda"]["n_workers"] == 3
    for device in ("cpu", "cuda:1"):  # an explicit GPU index or the CPU: plain processes
        made.clear()
        distributed._local_cluster(device, 2, plain)
        assert set(made) == {"plain"} and made["plain"]["n_workers"] == 2 and made["plain"]["processes"]
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # not installed: plain workers, GPUs round robin
    made.clear()
    distributed._local_cluster("cuda", 2, plain)
    assert "plain" in made and made["plain"]["n_workers"] == 2
