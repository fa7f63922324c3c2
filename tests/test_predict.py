import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from pssr import io
from pssr.crappify import get_preset
from pssr.model import ModelConfig, build_model
from pssr.modelfile import load_model, save_model
from pssr.predict import PredictError, restore
from pssr.tiling import frame_indices, plan_blocks


def _make_model(path, frames=1, scale=2, crap="pssr-em"):
    torch.manual_seed(0)
    cfg = ModelConfig(scale=scale, in_channels=frames, size="small", widths=(8, 16), blocks=1)
    net = build_model(cfg)
    with torch.no_grad():  # make the untrained net do something non-trivial
        net.out.weight.mul_(10)
    meta = {"crappifier": get_preset(crap, scale).to_dict()}
    return save_model(path, net, cfg, meta)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return _make_model(tmp_path_factory.mktemp("m") / "m.safetensors")


@pytest.fixture(scope="module")
def mf_model_path(tmp_path_factory):
    return _make_model(tmp_path_factory.mktemp("m") / "mf.safetensors", frames=3)


@pytest.fixture(scope="module")
def em_lr(isbi):
    return get_preset("pssr-em", 2)(isbi[:3, :230, :250], rng=0).astype(np.float32)


# ------------------------------------------------------------------------------ tiling
def test_plan_blocks_covers_everything_once():
    blocks = plan_blocks((2, 70, 45), tile=16, halo=8, multiple=8)
    cover = np.zeros((2, 70, 45), int)
    for b in blocks:
        y0, y1, x0, x1 = b.core
        cover[(*b.plane, slice(y0, y1), slice(x0, x1))] += 1
        ry0, ry1, rx0, rx1 = b.read
        assert ry0 <= y0 and ry1 >= y1 and rx0 <= x0 and rx1 >= x1
        assert ry0 % 8 == 0 and rx0 % 8 == 0  # down-sampling phase kept
    assert np.all(cover == 1)
    assert len({b.key for b in blocks}) == len(blocks)
    with pytest.raises(ValueError, match="multiples of 8"):
        plan_blocks((70, 45), tile=20, halo=8, multiple=8)


def test_group_blocks_fixed_batches():
    from pssr.tiling import group_blocks

    blocks = plan_blocks((2, 70, 45), tile=16, halo=8, multiple=8)
    groups = group_blocks(blocks, 4)
    assert [b for g in groups for b in g] == blocks  # every block once, plan order
    for g in groups:
        assert 1 <= len(g) <= 4
        assert len({(b.read[1] - b.read[0], b.read[3] - b.read[2]) for b in g}) == 1
    assert group_blocks(blocks, 4) == groups  # a pure function of the plan
    with pytest.raises(ValueError, match="batch=0"):
        group_blocks(blocks, 0)


def test_frame_indices_edge_replication():
    assert frame_indices(0, 10, 5) == [0, 0, 0, 1, 2]
    assert frame_indices(9, 10, 5) == [7, 8, 9, 9, 9]
    assert frame_indices(4, 10, 1) == [4]


# -------------------------------------------------------------------------- in memory
@pytest.mark.parametrize("tile", [16, 40, 64])
def test_tiled_equals_whole_image(model_path, em_lr, tile):
    whole = restore(em_lr, model=model_path, tile=512, dtype="float32", progress=False).output
    tiled = restore(em_lr, model=model_path, tile=tile, dtype="float32", progress=False).output
    assert tiled.shape == whole.shape == (3, em_lr.shape[1] * 2, em_lr.shape[2] * 2)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-4 * np.ptp(whole))


def test_tiled_equals_whole_with_trained_builtin(isbi):
    # Trained weights switch many ReLUs off for a given input; the halo must still cover the
    # architecture's full receptive field, or seams appear on other inputs.
    from pssr.model import receptive_radius

    m = load_model("em")
    assert m.meta["receptive_field"] == receptive_radius(m.net)
    lr = get_preset("pssr-em", 4)(isbi[27, :320, :320], rng=0)  # 80x80, held-out section
    whole = restore(lr, model=m, tile=512, dtype="float32", progress=False).output
    tiled = restore(lr, model=m, tile=16, dtype="float32", progress=False).output
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-4 * np.ptp(whole))


def test_tta_and_uncertainty(model_path, em_lr):
    r = restore(em_lr[:1], model=model_path, tta=True, dtype="float32", progress=False)
    plain = restore(em_lr[:1], model=model_path, dtype="float32", progress=False).output
    assert r.uncertainty.shape == r.output.shape
    assert r.uncertainty.max() > 0
    assert not np.allclose(r.output, plain)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_dtype_kept_and_clipped(model_path, isbi, dtype):
    x = isbi[0, :64, :64].astype(dtype)
    if dtype == np.uint16:
        x = x * 200
    out = restore(x, model=model_path, progress=False).output
    assert out.dtype == dtype and out.shape == (128, 128)
    f = restore(x, model=model_path, dtype="float32", progress=False).output
    assert f.dtype == np.float32


def test_multiframe_first_and_last_frames_restored(mf_model_path, em_lr):
    r = restore(em_lr, model=mf_model_path, axes="TYX", dtype="float32", progress=False)
    assert r.output.shape[0] == 3
    assert all(np.ptp(r.output[t]) > 0 for t in range(3))
    with pytest.raises(PredictError, match="no time or z axis"):
        restore(em_lr[0], model=mf_model_path, progress=False)


def test_empty_blocks_skipped(model_path):
    x = np.zeros((96, 96), np.float32)
    x[:32, :32] = np.random.default_rng(0).random((32, 32))
    r = restore(x, model=model_path, tile=32, dtype="float32", progress=False)
    assert r.summary["empty_blocks"] == 8
    assert np.all(r.output[64:, 64:] == 0)


def test_bad_inputs(model_path):
    with pytest.raises(PredictError, match="NaN"):
        restore(np.full((32, 32), np.nan, np.float32), model=model_path, progress=False)
    with pytest.raises(PredictError, match="5 dimensions"):
        restore(np.zeros((2, 2, 2, 32, 32)), model=model_path, progress=False)
    with pytest.raises(PredictError, match="too small"):
        restore(np.zeros((1, 32)), model=model_path, axes="YX", progress=False)
    with pytest.raises(PredictError, match="multiple of"):
        restore(np.zeros((32, 32)), model=model_path, tile=7, progress=False)


# ------------------------------------------------------------------------------ files
def test_file_to_ome_zarr_pyramid_scale_and_translate(model_path, isbi, tmp_path):
    src = io.write_tiff(
        tmp_path / "in.tif",
        isbi[:2, :200, :200],
        axes="ZYX",
        scale={"X": 0.008, "Y": 0.008, "Z": 0.05},
        unit="micrometer",
    )
    before = src.read_bytes()
    out = tmp_path / "out.ome.zarr"
    r = restore(str(src), model=model_path, output=out, tile=64, progress=False)
    img = io.read_image(out)
    assert img.shape == (2, 400, 400) and img.dtype == np.uint8
    assert img.scale["X"] == pytest.approx(0.004) and img.scale["Z"] == pytest.approx(0.05)
    g = zarr.open_group(str(out), mode="r")
    ms = io.ome_zarr_metadata(g)
    assert len(ms["datasets"]) >= 2
    tr = ms["datasets"][0]["coordinateTransformations"][1]["translation"]
    assert tr[-1] == pytest.approx(-0.5 * 0.004)  # -(s-1)/2 HR pixels: exact overlay
    assert g.attrs["pssr"]["status"] == "complete"
    assert not (out / ".pssr_done").exists()
    assert src.read_bytes() == before  # input untouched
    mem = restore(isbi[:2, :200, :200], model=model_path, tile=64, progress=False).output
    np.testing.assert_array_equal(np.asarray(r.output[...]), mem)
    with pytest.raises(PredictError, match="already exists.*--overwrite"):
        restore(str(src), model=model_path, output=out, progress=False)


def test_file_to_tiff_and_zarr_input(model_path, isbi, tmp_path):
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=(2, 100, 120), chunks=(1, 50, 60), dtype="uint8")
    z[...] = isbi[:2, :100, :120]
    r = restore(str(tmp_path / "in.zarr"), model=model_path, output=tmp_path / "o.tif", progress=False)
    img = io.read_image(tmp_path / "o.tif")
    assert img.shape == (2, 200, 240) and img.axes == "ZYX"
    assert not list(tmp_path.glob(".*work*"))
    assert r.summary["blocks"] >= 2


def test_fidelity_flags_inserted_structure(model_path, isbi, tmp_path):
    hr = isbi[0, :256, :256]
    cfg = get_preset("pssr-em", 2)
    lr = cfg(hr, rng=0)
    r = restore(lr, model=model_path, fidelity=True, noise="model", dtype="float32", progress=False)
    assert r.fidelity.shape == lr.shape
    assert "fidelity" in r.summary
    # An LR input with structure the restoration cannot explain, e.g. a bright square
    # added to the input *after* restoring: the map flags exactly that region.
    from pssr.predict import fidelity_map

    faithful = hr.astype(np.float32)  # the truth explains the measurement within noise
    z_ok = fidelity_map(faithful, lr, cfg, full_scale=255.0)
    fake = faithful.copy()
    fake[100:140, 100:140] += 80  # invented structure
    z_bad = fidelity_map(fake, lr, cfg, full_scale=255.0)
    assert np.mean(np.abs(z_ok) > 3) < 0.01
    assert np.mean(np.abs(z_bad[52:68, 52:68]) > 3) > 0.9
    assert np.mean(np.abs(z_bad[:40, :40]) > 3) < 0.01


def test_fidelity_needs_acquisition_model(tmp_path, em_lr):
    torch.manual_seed(0)
    cfg = ModelConfig(scale=2, size="small", widths=(8, 16), blocks=1)
    p = save_model(tmp_path / "paired.safetensors", build_model(cfg), cfg, {"crappifier": None})
    with pytest.raises(PredictError, match="fidelity needs the model's acquisition model"):
        restore(em_lr[0], model=p, fidelity=True, progress=False)


# ------------------------------------------------------------------- resume after kill
RUN_SCRIPT = """
import sys, time
import pssr.engine as E
import pssr.predict as P
import pssr.store as S
slow = sys.argv[4] == "slow"
orig_p, orig_w = E.process_blocks, S.write_block
counts = {"computed": 0, "written": 0}
def w(*a, **k):
    orig_w(*a, **k)
    counts["written"] += 1
    if slow:
        time.sleep(0.3)
def p(arr, pred, job, blocks):
    counts["computed"] += len(blocks)
    return orig_p(arr, pred, job, blocks)
S.write_block, E.process_blocks = w, p
P.restore(sys.argv[1], model=sys.argv[2], output=sys.argv[3], tile=32, progress=False)
print(counts["computed"], counts["written"])
"""


def _run(src, model, out, mode):
    args = [sys.executable, "-c", RUN_SCRIPT, str(src), str(model), str(out), mode]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def test_sigkill_then_same_command_resumes_identically(model_path, isbi, tmp_path):
    src = io.write_tiff(tmp_path / "in.tif", isbi[:2, :160, :160], axes="ZYX")
    out = tmp_path / "o.ome.zarr"
    proc = _run(src, model_path, out, "slow")
    done_dir = out / ".pssr_done"
    t0 = time.time()
    while time.time() - t0 < 120:
        if done_dir.is_dir() and len(list(done_dir.iterdir())) >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len([f for f in done_dir.iterdir() if not f.name.startswith(".")])
    assert 0 < n_done < 50  # 2 planes x 5 x 5 blocks
    assert zarr.open_group(str(out), mode="r").attrs["pssr"]["status"] == "running"
    # The same command again finishes the job ...
    again = _run(src, model_path, out, "fast")
    computed, written = map(int, again.communicate(timeout=300)[0].split())
    assert again.returncode == 0
    assert written == 50 - n_done  # finished blocks are never written again
    assert computed <= 50 - n_done + 3  # at most the rest of the batch that was in flight
    assert zarr.open_group(str(out), mode="r").attrs["pssr"]["status"] == "complete"
    # ... and the result is identical to an uninterrupted run of that command.
    ref = _run(src, model_path, tmp_path / "ref.ome.zarr", "fast")
    ref.communicate(timeout=300)
    np.testing.assert_array_equal(
        np.asarray(io.read_image(out).data[...]),
        np.asarray(io.read_image(tmp_path / "ref.ome.zarr").data[...]),
    )


def test_resume_with_other_settings_refused(model_path, isbi, tmp_path):
    src = io.write_tiff(tmp_path / "in.tif", isbi[0, :64, :64], axes="YX")
    out = tmp_path / "o.ome.zarr"
    stop = lambda done, total: False  # cancel after the first block  # noqa: E731
    with pytest.raises(InterruptedError):
        restore(str(src), model=model_path, output=out, tile=32, progress=False, callback=stop)
    with pytest.raises(PredictError, match=r"used other settings or inputs \(tile 32 -> 64\)"):
        restore(str(src), model=model_path, output=out, tile=64, resume=True, progress=False)
    restore(str(src), model=model_path, output=out, tile=32, resume=True, progress=False)


# ----------------------------------------------------------------------- distributed
def _same_up_to_float_order(a, b):
    # Workers run torch with 1 thread, this process with 2: the same blocks and batches give the
    # same result up to float summation order (never a seam, never a missing block).
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.ptp(b)))


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


def test_cli_predict_and_errors(model_path, isbi, tmp_path):
    from pssr.cli import main

    src = io.write_tiff(tmp_path / "in.tif", isbi[:2, :64, :64], axes="ZYX")
    assert main(["-q", "predict", str(src), str(tmp_path / "o.tif"), "--model", str(model_path)]) == 0
    assert io.read_image(tmp_path / "o.tif").shape == (2, 128, 128)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pssr",
            "predict",
            str(src),
            str(tmp_path / "o.tif"),
            "--model",
            str(model_path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "pssr", "predict", str(src), str(tmp_path / "x.tif"), "--model", "nope"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "neither a built-in" in r.stderr


def test_same_relative_command_resumes(model_path, isbi, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    io.write_tiff("in.tif", isbi[0, :64, :64], axes="YX")
    with pytest.raises(InterruptedError):
        restore(
            "in.tif",
            model=model_path,
            output="o.ome.zarr",
            tile=32,
            progress=False,
            callback=lambda done, total: False,
        )
    r = restore("in.tif", model=model_path, output="o.ome.zarr", tile=32, progress=False)
    assert r.summary["blocks"] == 4
    assert zarr.open_group("o.ome.zarr", mode="r").attrs["pssr"]["status"] == "complete"


def test_failed_in_memory_run_leaves_no_temp(model_path, monkeypatch, tmp_path):
    import tempfile

    import pssr.store as S

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(S, "write_block", boom)
    with pytest.raises(OSError, match="disk full"):
        restore(np.random.rand(32, 32).astype(np.float32), model=model_path, progress=False)
    assert list(tmp_path.iterdir()) == []


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
