"""Device and precision selection (issue 13 item 1, 2, 5) — logic tested with and without a GPU visible."""

import json

import numpy as np
import pytest
import torch
import zarr

from pssr.blockwise.predict import PredictError, parse_memory, restore
from pssr.cli.app import main
from pssr.nn import devices
from pssr.nn.devices import DeviceError, resolve_device, resolve_precision, worker_device


def _fake_cuda(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert resolve_device("auto") == "mps"
    _fake_cuda(monkeypatch, 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("CUDA:1") == "cuda:1"


def test_explicit_devices_are_checked(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    with pytest.raises(DeviceError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    _fake_cuda(monkeypatch, 2)
    with pytest.raises(DeviceError, match=r"2 CUDA GPU\(s\), numbered 0..1"):
        resolve_device("cuda:2")
    with pytest.raises(DeviceError, match="not a device"):
        resolve_device("gpu")
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS is not available"):
        resolve_device("mps")


def test_each_dask_worker_takes_its_own_gpu(monkeypatch):
    _fake_cuda(monkeypatch, 4)
    assert [worker_device("cuda", i) for i in range(6)] == [f"cuda:{i % 4}" for i in range(6)]
    assert worker_device("cuda:1", 3) == "cuda:1"  # an explicit GPU is kept
    assert worker_device("cuda", None) == "cuda"  # unnamed workers (an external scheduler)
    assert worker_device("cpu", 2) == "cpu"
    _fake_cuda(monkeypatch, 1)  # dask-cuda: one visible GPU per worker
    assert worker_device("cuda", 3) == "cuda"


def test_precision():
    assert resolve_precision("auto", "cpu") == "float32"
    # measured on an H100 within 1/1000 of the range (docs/benchmarks/gpu.md)
    assert resolve_precision("auto", "cuda") == "float16"
    assert resolve_precision("auto", "cuda:1") == "float16"
    assert resolve_precision("auto", "mps") == "float32"  # not measured there
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(DeviceError, match="float16.*needs a GPU"):
        resolve_precision("float16", "cpu")
    with pytest.raises(DeviceError, match="must be one of"):
        resolve_precision("half", "cpu")


def test_restore_records_device_and_precision(isbi, tmp_path):
    out = tmp_path / "o.ome.zarr"
    res = restore(isbi[0, :64, :64], model="bilinear:4", output=out, progress=False)
    assert res.summary["device"] == resolve_device("auto") and res.summary["precision"] == "float32"
    job = zarr.open_group(str(out), mode="r").attrs["pssr"]["job"]
    assert job["device"] == resolve_device("auto") and job["precision"] == "float32"


def test_bfloat16_autocast_on_cpu_close_to_float32(isbi):
    x = isbi[0, :96, :96]
    a = restore(x, model="em", dtype="float32", progress=False).output
    b = restore(x, model="em", dtype="float32", precision="bfloat16", progress=False).output
    err = float(np.abs(a - b).max()) / float(np.ptp(a))
    # bfloat16 keeps 8 bits of mantissa: close, but not within 1/1000 of the range, so the
    # default stays float32 (docs/benchmarks/predict.md).
    assert 0 < err < 0.05, err


def test_job_carries_device_and_precision_to_dask_workers(isbi, tmp_path):
    from pssr.blockwise import distributed

    src = tmp_path / "in.tif"
    import tifffile

    tifffile.imwrite(src, isbi[0, :32, :32])
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(InterruptedError):
        restore(
            str(src),
            model="em",
            output=out,
            precision="bfloat16",
            progress=False,
            callback=lambda d, n: False,
        )
    job = dict(zarr.open_group(str(out), mode="r").attrs["pssr"]["job"])
    assert job["precision"] == "bfloat16"
    _, pred, _, _, _ = distributed._worker_state(json.dumps(job, sort_keys=True))
    assert pred.precision == "bfloat16" and pred.device.type == job["device"].split(":")[0]
    distributed._CACHE.clear()


def test_cli_device_and_memory_errors(tmp_path, capsys):
    assert main(["predict", "x.tif", str(tmp_path / "o.tif"), "--device", "gpu"]) == 2
    assert "not a device" in capsys.readouterr().err
    assert main(["predict", "x.tif", str(tmp_path / "o.tif"), "--memory", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err


def test_memory_budget_bounds_the_automatic_tile(isbi, tmp_path, caplog):
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("2e+9") == parse_memory("2e9") == 2e9
    with pytest.raises(PredictError, match="below 64 MB; give at least '64MB'"):
        parse_memory("1MB")
    for bad in (float("nan"), float("inf"), "nan", "lots"):
        with pytest.raises(PredictError, match="not a size"):
            parse_memory(bad)
    x = isbi[0]
    tiles = {}
    for mem in ("100MB", "1GB"):
        out = tmp_path / f"o{mem}.ome.zarr"
        with pytest.raises(InterruptedError):
            restore(x, model="em", output=out, memory=mem, progress=False, callback=lambda d, n: False)
        tiles[mem] = zarr.open_group(str(out), mode="r").attrs["pssr"]["job"]["tile"]
    assert tiles["100MB"] < tiles["1GB"]
    # A budget below what the smallest tile needs is used anyway, and said so with the number to give
    from pssr.blockwise import predict
    from pssr.nn.modelfile import load_model

    with caplog.at_level("WARNING", logger="pssr.blockwise.predict"):
        predict.auto_tile(load_model("em"), "cpu", 64e6, batch=4)
    assert "below what the smallest tile" in caplog.text and "--memory" in caplog.text


def test_float16_overflow_is_recomputed_in_float32(caplog):
    """An input that overflows float16 (past 65504) is computed again in float32, never written as inf."""
    from pssr.blockwise.engine import Predictor
    from pssr.nn.modelfile import load_model

    lm = load_model("em")
    x = np.random.default_rng(0).random((2, 1, 48, 48), dtype=np.float32) * 1e6
    ref, _ = Predictor(lm, device="cpu", precision="float32")(x)
    p16 = Predictor(lm, device="cpu", precision="float16")  # CPU autocast: the same code path as CUDA
    with caplog.at_level("WARNING", logger="pssr.blockwise.engine"):
        out, _ = p16(x)
    assert p16.overflowed and "float16 overflowed" in caplog.text
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, ref)
    # An ordinary input stays in float16, close to float32
    p16b = Predictor(lm, device="cpu", precision="float16")
    y = x / 1e6
    out16, _ = p16b(y)
    assert not p16b.overflowed
    ref32, _ = Predictor(lm, device="cpu", precision="float32")(y)
    # the README's figure: float16 within 1/1000 of the output range of float32
    assert np.abs(out16 - ref32).max() < 1e-3 * (ref32.max() - ref32.min())


def test_auto_tile_uses_gpu_memory_on_cuda(monkeypatch):
    """On CUDA the automatic tile comes from the GPU's free memory and the 8 GB default budget."""
    from pssr.blockwise import predict
    from pssr.nn.modelfile import load_model

    lm = load_model("em")
    monkeypatch.setattr(predict, "_available_memory", lambda: 1e12)
    free = {"bytes": 80e9}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (free["bytes"], 80e9))
    big = predict.auto_tile(lm, "cuda", predict.DEFAULT_GPU_MEMORY, batch=4)
    small = predict.auto_tile(lm, "cuda", predict.DEFAULT_MEMORY, batch=4)
    assert big > small >= lm.config.multiple
    assert big % lm.config.multiple == 0
    free["bytes"] = 1e9  # a nearly full GPU: half of what is free bounds the budget
    assert predict.auto_tile(lm, "cuda", predict.DEFAULT_GPU_MEMORY, batch=4) < small
    # The CPU ignores GPU memory, and counts one block per batch (blocks run one at a time there)
    cpu = predict.auto_tile(lm, "cpu", predict.DEFAULT_MEMORY, batch=4)
    assert cpu > small
    monkeypatch.setattr(predict, "_available_memory", lambda: 1e9)
    assert predict.auto_tile(lm, "cpu", predict.DEFAULT_MEMORY, batch=4) < cpu


def test_output_started_on_a_gpu_in_float16_is_finished_on_a_cpu(model_path, isbi, tmp_path, monkeypatch):
    """`auto` continues in the precision the run started with, float16 (the CUDA default) included:
    the same command finishes a GPU-started output on a CPU node, bytes equal to an uninterrupted run."""
    from pssr.blockwise import predict
    from pssr.nn.modelfile import load_model

    lm = load_model(model_path)
    x = isbi[:2, :64, :64]
    kw = dict(model=lm, tile=32, progress=False, backend="torch")
    with monkeypatch.context() as m:  # what a CUDA run with the defaults records: float16
        m.setattr(predict, "resolve_precision", lambda p, d: "float16")
        ref = restore(x, output=tmp_path / "ref.ome.zarr", **kw)
        with pytest.raises(InterruptedError):
            restore(x, output=tmp_path / "o.ome.zarr", callback=lambda done, total: done < 3, **kw)
    res = restore(x, output=tmp_path / "o.ome.zarr", resume=True, **kw)  # precision auto, on the CPU
    assert res.summary["precision"] == "float16"
    np.testing.assert_array_equal(np.asarray(res.output), np.asarray(ref.output))
    # An explicit other precision is still refused, naming the setting
    with monkeypatch.context() as m:
        m.setattr(predict, "resolve_precision", lambda p, d: "float16")
        with pytest.raises(InterruptedError):
            restore(x, output=tmp_path / "p.ome.zarr", callback=lambda done, total: done < 3, **kw)
    with pytest.raises(PredictError, match="precision 'float16' -> 'float32'"):
        restore(x, output=tmp_path / "p.ome.zarr", resume=True, precision="float32", **kw)
