"""ONNX Runtime as the network's CPU backend: torch's output, tiled == whole, resume, choice, cache."""

import json
import logging

import numpy as np
import pytest
import torch
import zarr

import pssr.nn.onnx_backend as ob
from pssr.blockwise.engine import Job, Predictor
from pssr.blockwise.predict import restore
from pssr.blockwise.store import done_blocks
from pssr.degrade.crappify import get_preset
from pssr.io import formats as io
from pssr.nn.modelfile import load_model
from pssr.nn.onnx_backend import BackendError, OnnxNetwork, resolve_backend

needs_ort = pytest.mark.skipif(not ob.available(), reason="pip install 'pssr-toolkit[onnx]'")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Every graph of this module is exported here (a cold cache: the timings include exports)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("pssr-cache")
    mp.setenv("PSSR_CACHE", str(root))
    yield root / "onnx"
    mp.undo()


def _rel(a, ref):
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.ptp(ref))


# ------------------------------------------------------------------------------ same output
@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
@needs_ort
def test_em_equals_torch_on_real_data(isbi):
    lm = load_model("em")
    lr = get_preset("pssr-em", 4)(isbi[27, :320, :320], rng=0)  # 80x80, held-out section
    t = restore(lr, model=lm, dtype="float32", backend="torch", progress=False)
    o = restore(lr, model=lm, dtype="float32", backend="onnxruntime", progress=False)
    assert (t.summary["backend"], o.summary["backend"]) == ("torch", "onnxruntime")
    assert _rel(o.output, t.output) < 1e-4  # measured: 2.2e-7


@needs_ort
def test_multiframe_with_tta_equals_torch(mf_model_path, em_lr):
    kw = dict(model=mf_model_path, axes="TYX", tta=True, dtype="float32", progress=False)
    t = restore(em_lr[:, :48, :64], backend="torch", **kw)
    o = restore(em_lr[:, :48, :64], backend="onnxruntime", **kw)
    assert o.summary["backend"] == "onnxruntime"
    assert _rel(o.output, t.output) < 1e-4
    assert float(np.abs(o.uncertainty - t.uncertainty).max()) < 1e-4 * np.ptp(t.output)


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
@needs_ort
def test_tiled_onnxruntime_equals_whole_torch(model_path, em_lr):
    # An odd width: the right-hand reads need a graph of their own (and TTA's rotations another).
    lr = em_lr[:, :64, :75]
    kw = dict(model=model_path, dtype="float32", progress=False)
    whole = restore(lr, tile=512, backend="torch", **kw)
    tiled = restore(lr, tile=16, backend="onnxruntime", **kw)
    assert tiled.summary["backend"] == "onnxruntime"
    np.testing.assert_allclose(tiled.output, whole.output, rtol=0, atol=1e-4 * np.ptp(whole.output))
    # With TTA on an odd size tiled != whole in torch too (a rotated block pads another side than
    # the rotated image): ONNX Runtime must give torch's tiled result.
    t = restore(lr[:1], tile=32, backend="torch", tta=True, **kw)
    o = restore(lr[:1], tile=32, backend="onnxruntime", tta=True, **kw)
    np.testing.assert_allclose(o.output, t.output, rtol=0, atol=1e-4 * np.ptp(t.output))


@needs_ort
def test_interrupted_run_resumes_to_the_same_bytes(model_path, em_lr, tmp_path):
    src = io.write_tiff(tmp_path / "in.tif", em_lr[:2, :64, :60], axes="ZYX")
    kw = dict(model=model_path, tile=16, backend="onnxruntime", progress=False)
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(InterruptedError):
        restore(str(src), output=out, callback=lambda done, total: done < 9, **kw)
    n_done = len(done_blocks(str(out)))
    assert 0 < n_done < 32
    r = restore(str(src), output=out, **kw)
    ref = restore(str(src), output=tmp_path / "ref.ome.zarr", **kw)
    np.testing.assert_array_equal(np.asarray(r.output[...]), np.asarray(ref.output[...]))
    attrs = zarr.open_group(str(out), mode="r").attrs["pssr"]
    assert attrs["job"]["backend"] == "onnxruntime" and attrs["summary"]["backend"] == "onnxruntime"


@needs_ort
def test_auto_resumes_a_torch_run_with_torch(model_path, em_lr, tmp_path):
    src = io.write_tiff(tmp_path / "in.tif", em_lr[:1, :64, :60], axes="ZYX")
    kw = dict(model=model_path, tile=16, progress=False)
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(InterruptedError):
        restore(str(src), output=out, backend="torch", callback=lambda done, total: done < 5, **kw)
    r = restore(str(src), output=out, **kw)  # the same command with the default backend (auto)
    assert r.summary["backend"] == "torch"
    ref = restore(str(src), output=tmp_path / "ref.ome.zarr", backend="torch", **kw)
    np.testing.assert_array_equal(np.asarray(r.output[...]), np.asarray(ref.output[...]))


def test_job_without_backend_reads_as_torch_and_resumes(model_path, tmp_path):
    lm = load_model(model_path)
    job = Job(
        input="x.tif", input_axes="YX", input_array=None, model="m", scale=2, frames=1, context_axis=None,
        lo=0.0, hi=1.0, full_scale=1.0, tile=32, halo=lm.halo, out=str(tmp_path / "o"), out_dtype="uint8",
    )  # fmt: skip
    old = json.loads(job.to_json())
    del old["backend"]  # written before the field existed
    assert Job(**old).backend == "torch"
    assert job.same_work(old)
    # What runs the network does not change the work (as the device does not): either resumes.
    job.backend = "onnxruntime"
    assert job.same_work(old) and job.same_work(json.loads(job.to_json()) | {"backend": "torch"})


# ------------------------------------------------------------------------ choice and errors
def test_auto_chooses_onnxruntime_on_the_cpu_at_float32_when_installed(monkeypatch, model_path):
    lm = load_model(model_path)
    monkeypatch.setattr(ob, "missing", lambda: [])
    assert resolve_backend("auto", "cpu", "float32", lm) == "onnxruntime"
    assert resolve_backend("auto", "cuda", "float16", lm) == "torch"
    assert resolve_backend("auto", "cuda:1", "float32", lm) == "torch"
    assert resolve_backend("auto", "mps", "float32", lm) == "torch"
    assert resolve_backend("auto", "cpu", "bfloat16", lm) == "torch"
    assert resolve_backend("auto", "cpu", "float32", load_model("bilinear:2")) == "torch"  # no weights
    assert resolve_backend("TORCH", "cpu", "float32", lm) == "torch"
    # Resuming, auto keeps what the interrupted run used (a job from before the field: torch).
    assert resolve_backend("auto", "cpu", "float32", lm, stored={"tile": 32}) == "torch"
    assert resolve_backend("auto", "cpu", "float32", lm, stored={"backend": "torch"}) == "torch"
    assert resolve_backend("auto", "cpu", "float32", lm, stored={"backend": "onnxruntime"}) == "onnxruntime"
    assert resolve_backend("onnxruntime", "cpu", "float32", lm, stored={"tile": 32}) == "onnxruntime"
    monkeypatch.setattr(ob, "missing", lambda: ["onnxruntime"])
    assert resolve_backend("auto", "cpu", "float32", lm) == "torch"
    assert resolve_backend("auto", "cpu", "float32", lm, stored={"backend": "onnxruntime"}) == "torch"
    r = restore(np.zeros((16, 16), np.float32) + np.eye(16), model=lm, progress=False)
    assert r.summary["backend"] == "torch"
    with pytest.raises(BackendError, match=r"backend='tensorrt' must be one of auto, torch, onnxruntime"):
        resolve_backend("tensorrt", "cpu", "float32")


def test_explicit_onnxruntime_where_it_cannot_run_is_a_clear_error(monkeypatch, model_path):
    with pytest.raises(
        BackendError, match=r"runs on the CPU only, but the device is 'cuda'.*--backend torch"
    ):
        resolve_backend("onnxruntime", "cuda", "float16")
    with pytest.raises(BackendError, match=r"float32 only, but the precision is 'bfloat16'"):
        resolve_backend("onnxruntime", "cpu", "bfloat16")
    with pytest.raises(BackendError, match="CPU only"):  # before the network is moved to a GPU
        Predictor(load_model(model_path), device="cuda", backend="onnxruntime")
    monkeypatch.setattr(ob, "missing", lambda: ["onnxruntime", "onnxscript"])
    install = r"pip install 'pssr-toolkit\[onnx\]'"
    with pytest.raises(BackendError, match=r"onnxruntime, onnxscript not installed.*" + install):
        resolve_backend("onnxruntime", "cpu", "float32")
    with pytest.raises(BackendError, match=r"pip install 'pssr-toolkit\[onnx\]'"):
        restore(np.ones((16, 16), np.float32), model=model_path, backend="onnxruntime", progress=False)
    assert isinstance(BackendError("x"), ValueError)  # a PssrError: the CLI prints one line, status 2


@needs_ort
def test_a_model_the_exporter_cannot_handle(monkeypatch, model_path, tmp_path, caplog):
    monkeypatch.setenv("PSSR_CACHE", str(tmp_path))  # nothing cached: the export must run

    def unsupported(*a, **k):
        raise RuntimeError("no ONNX function for aten::mystery_op")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    x = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    with caplog.at_level(logging.WARNING, logger="pssr"):
        r = restore(x, model=model_path, dtype="float32", progress=False)  # auto: torch, one warning
    assert r.summary["backend"] == "torch"
    warned = [m for m in caplog.messages if "ONNX Runtime is not used" in m]
    assert len(warned) == 1 and "aten::mystery_op" in warned[0]
    with pytest.raises(BackendError, match=r"cannot be exported to ONNX .*mystery_op.*--backend torch"):
        restore(x, model=model_path, backend="onnxruntime", progress=False)


# ------------------------------------------------------------------------------------ cache
@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
@needs_ort
def test_cache_is_reused_and_a_bad_file_is_rebuilt(model_path, tmp_path, caplog):
    lm = load_model(model_path)
    first = OnnxNetwork(lm, cache=tmp_path)
    first.prepare([(1, 32, 32), (1, 64, 48)])  # one remainder (0, 0): one graph
    assert first.exports == 1
    (path,) = tmp_path.glob("*.onnx")
    assert path == first.path((0, 0)) and not list(tmp_path.glob(".*"))  # no temporary file left
    again = OnnxNetwork(lm, cache=tmp_path)
    x = np.random.default_rng(0).random((1, 1, 40, 36), dtype=np.float32)
    with torch.no_grad():
        want = lm.net(torch.from_numpy(x)).numpy()
    assert _rel(again(x), want) < 1e-4 and again.exports == 0  # from the cache
    # A whole, valid graph that computes something else (one weight changed) is exported again ...
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(path.read_bytes())
    init = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    path.write_bytes(graph.SerializeToString())
    with caplog.at_level(logging.WARNING, logger="pssr"):
        rebuilt = OnnxNetwork(lm, cache=tmp_path)
        rebuilt.prepare([(1, 32, 32)])
    assert rebuilt.exports == 1 and any("differs from torch" in m for m in caplog.messages)
    assert _rel(rebuilt(x), want) < 1e-4
    # ... and so is a truncated file; the rebuilt file is then used.
    path.write_bytes(path.read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pssr"):
        fixed = OnnxNetwork(lm, cache=tmp_path)
        fixed.prepare([(1, 32, 32)])
    assert fixed.exports == 1 and any("not usable" in m for m in caplog.messages)
    fine = OnnxNetwork(lm, cache=tmp_path)
    fine.prepare([(1, 32, 32)])
    assert fine.exports == 0


@needs_ort
def test_predictor_loads_from_the_cache(model_path, cache):
    lm = load_model(model_path)
    a = Predictor(lm, backend="onnxruntime")
    x = np.random.default_rng(1).random((2, 1, 24, 20), dtype=np.float32)
    ya, _ = a(x)
    b = Predictor(lm, backend="onnxruntime")
    yb, _ = b(x)
    assert b.onnx.exports == 0 and b.onnx.cache == cache
    np.testing.assert_array_equal(ya, yb)
    yt, _ = Predictor(lm)(x)
    assert _rel(yb, yt) < 1e-4


# -------------------------------------------------------------------------------------- CLI
def test_cli_backend(model_path, isbi, tmp_path, capsys):
    from pssr.cli.app import main

    src = io.write_tiff(tmp_path / "in.tif", isbi[0, :32, :32], axes="YX")
    args = ["-q", "predict", str(src), str(tmp_path / "t.tif"), "--model", str(model_path)]
    assert main([*args, "--backend", "torch"]) == 0
    assert "torch; verified" in capsys.readouterr().out
    assert io.read_image(tmp_path / "t.tif").shape == (64, 64)
    with pytest.raises(SystemExit):  # argparse: not one of auto, torch, onnxruntime
        main([*args[:3], str(tmp_path / "x.tif"), *args[4:], "--backend", "nope"])
