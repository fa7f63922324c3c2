"""Outputs are never silently wrong: pyramid levels, the input untouched, one writer per output,
resume after interruptions and corruption, NaN inputs, leftovers, and ``pssr verify``."""

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pssr.blockwise import predict as P
from pssr.blockwise import store as S
from pssr.blockwise.integrity import IntegrityError, LockedError, OutputLock, check_distinct
from pssr.blockwise.predict import PredictError, restore
from pssr.blockwise.verify import verify_output
from pssr.cli.app import main
from pssr.io import formats as io
from pssr.io import pyramid

MODEL = "bilinear:4"  # the real pipeline with a fast, weight-free network


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small untrained U-Net (halo 8): a real network, fast enough for many runs."""
    import torch

    from pssr.degrade.crappify import get_preset
    from pssr.nn.model import ModelConfig, build_model
    from pssr.nn.modelfile import save_model

    torch.manual_seed(0)
    cfg = ModelConfig(scale=4, in_channels=1, size="small", widths=(8, 16), blocks=1)
    net = build_model(cfg)
    with torch.no_grad():
        net.out.weight.mul_(10)
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    return str(save_model(path, net, cfg, {"crappifier": get_preset("pssr-em", 4).to_dict()}))


@pytest.fixture(scope="module")
def crop(isbi):
    return isbi[0, :128, :128].copy()


def _levels(path):
    g = zarr.open_group(str(path), mode="r")
    ms = dict(g.attrs)["ome"]["multiscales"][0]
    return [np.asarray(g[d["path"]][...]) for d in ms["datasets"]]


# ------------------------------------------------------------------------- 1. pyramid
def test_pyramid_levels_equal_downsampled_s0_with_many_tiles(crop, tiny, tmp_path):
    src = io.write_tiff(tmp_path / "p128.tif", crop, axes="YX")
    out = tmp_path / "p.ome.zarr"
    restore(str(src), model=tiny, output=out, tile=32, progress=False)
    lv = _levels(out)
    assert len(lv) == 4
    for below, level in zip(lv, lv[1:]):
        mean = below[: below.shape[0] // 2 * 2, : below.shape[1] // 2 * 2].astype(np.float64)
        mean = mean.reshape(level.shape[0], 2, level.shape[1], 2).mean((1, 3))
        # No zero-filled patches: every pixel is the rounded 2x2 mean of the level below.
        assert np.abs(level.astype(np.float64) - mean).max() <= 0.5 + 1e-6
        np.testing.assert_array_equal(level, pyramid.downsample2(below, level.dtype))


# ---------------------------------------------------------------------- 2. input safety
def test_input_inside_output_is_refused_and_untouched(crop, tmp_path):
    src = io.write_tiff(tmp_path / "lr.tif", crop[:64, :64], axes="YX")
    x = tmp_path / "x.ome.zarr"
    restore(str(src), model=MODEL, output=x, progress=False)
    before = np.asarray(zarr.open_group(str(x), mode="r")["s0"][...]).copy()
    with pytest.raises(IntegrityError, match="lies inside|contains|is the input"):
        restore(str(x / "s0"), model=MODEL, output=x, overwrite=True, progress=False)
    # Output inside the input, and the input given through a symlink/relative path.
    with pytest.raises(IntegrityError):
        restore(str(x), model=MODEL, output=x / "s9.ome.zarr", progress=False)
    np.testing.assert_array_equal(zarr.open_group(str(x), mode="r")["s0"][...], before)
    assert main(["-q", "predict", str(x / "s0"), str(x), "--overwrite", "--model", MODEL]) == 2
    np.testing.assert_array_equal(zarr.open_group(str(x), mode="r")["s0"][...], before)


def test_zarr_backed_in_memory_input_is_not_overwritten(crop, tmp_path):
    """A napari layer backed by a zarr array restored into its own store."""
    import dask.array as da

    x = tmp_path / "x.ome.zarr"
    restore(crop[:64, :64], model=MODEL, output=x, progress=False)
    s0 = zarr.open_group(str(x), mode="r")["s0"]
    for data in (s0, da.from_zarr(s0)):
        with pytest.raises(IntegrityError):
            restore(data, model=MODEL, output=x, overwrite=True, progress=False)
    assert zarr.open_group(str(x), mode="r").attrs["pssr"]["status"] == "complete"


def test_side_files_never_overwrite_the_input(crop, tmp_path):
    src = io.write_tiff(tmp_path / "r.fidelity.tif", crop[:64, :64], axes="YX")
    raw = src.read_bytes()
    with pytest.raises(IntegrityError):
        restore(
            str(src), model="em", output=tmp_path / "r.tif", fidelity=True, overwrite=True, progress=False
        )
    assert src.read_bytes() == raw


def test_crappify_refuses_its_own_input(crop, tmp_path):
    src = io.write_tiff(tmp_path / "s.tif", crop[:64, :64], axes="YX")
    raw = src.read_bytes()
    assert main(["crappify", str(src), str(src), "--overwrite"]) == 2
    assert main(["crappify", str(src), str(tmp_path / "." / "s.tif"), "--overwrite"]) == 2
    assert src.read_bytes() == raw


def test_check_distinct_symlink(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "in.tif").write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "link")
    with pytest.raises(IntegrityError):
        check_distinct([tmp_path / "link" / "in.tif"], [tmp_path / "a" / "in.tif"])
    check_distinct([tmp_path / "a" / "in.tif"], [tmp_path / "a" / "in2.tif"])  # siblings are fine


# --------------------------------------------------------------------------------- 3. lock
def test_lock_refuses_second_writer_and_recovers_stale(tmp_path):
    out = tmp_path / "o.ome.zarr"
    with OutputLock(out) as lock:
        with pytest.raises(LockedError, match="pssr-lock"):
            OutputLock(out).acquire()
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert not lock.path.exists()
    # A lock left by a dead process on this host is stale: taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": 1.0}))
    with OutputLock(out):
        pass
    # A lock from another host cannot be judged: refused, naming the file.
    lock.path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": 1.0, "taken": 0}))
    with pytest.raises(LockedError, match="elsewhere"):
        OutputLock(out).acquire()


# -------------------------------------------------------------------- 4. default tile resume
def test_same_command_resumes_with_default_tile_when_free_memory_changed(crop, tiny, tmp_path, monkeypatch):
    src = io.write_tiff(tmp_path / "in.tif", crop, axes="YX")
    out = tmp_path / "o.ome.zarr"
    # The default tile comes from free memory, which differs between the two runs.
    monkeypatch.setattr(P, "choose_tile", lambda *a, **k: 32)
    with pytest.raises(InterruptedError):
        restore(str(src), model=tiny, output=out, progress=False, callback=lambda d, n: d < 2)
    monkeypatch.setattr(P, "choose_tile", lambda *a, **k: 48)
    res = restore(str(src), model=tiny, output=out, progress=False)
    assert zarr.open_group(str(out), mode="r").attrs["pssr"]["job"]["tile"] == 32
    ref = restore(str(src), model=tiny, tile=32, progress=False)
    np.testing.assert_array_equal(np.asarray(res.output[...]), ref.output)
    # An explicit other tile is a different job: refused, not silently mixed.
    with pytest.raises(PredictError, match="other settings|already exists"):
        restore(str(src), model=tiny, output=out, tile=48, progress=False)


# --------------------------------------------------------------------- 5. corrupt chunks
def _chunk_files(out, array="s0"):
    return sorted(p for p in (out / array / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage"])
def test_corrupt_done_chunk_is_detected_and_redone(crop, tiny, tmp_path, damage, caplog):
    src = io.write_tiff(tmp_path / "in.tif", crop, axes="YX")
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(InterruptedError):
        restore(str(src), model=tiny, output=out, tile=32, progress=False, callback=lambda d, n: d < 6)
    f = _chunk_files(out)[0]
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif damage == "delete":
        f.unlink()
    else:
        f.write_bytes(os.urandom(len(f.read_bytes())))
    with caplog.at_level("WARNING", logger="pssr.blockwise.store"):
        res = restore(str(src), model=tiny, output=out, tile=32, progress=False)
    assert "will be redone" in caplog.text
    ref = restore(str(src), model=tiny, tile=32, progress=False)
    np.testing.assert_array_equal(np.asarray(res.output[...]), ref.output)
    verify_output(out, progress=False)


# ------------------------------------------------------------------------------ 6. NaN
def test_nan_in_any_block_fails_with_coordinates(tmp_path, monkeypatch):
    vol = np.random.default_rng(0).random((4, 64, 64), dtype=np.float32)
    vol[1, 40:50, 20:30] = np.nan
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=vol.shape, chunks=(1, 64, 64), dtype="float32")
    z[...] = vol
    # The up-front check reads a strided sample of big inputs; make it miss the patch.
    from pssr.blockwise import inputs

    real = inputs.strided_sample
    monkeypatch.setattr(inputs, "strided_sample", lambda a: np.nan_to_num(real(a)))
    out = tmp_path / "o.tif"
    with pytest.raises(PredictError, match=r"Z=1, y=4\d, x=[23]\d"):
        restore(str(tmp_path / "in.zarr"), model=MODEL, output=out, tile=16, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------------ 8. leftovers
def test_full_disk_names_the_work_folder_and_resumes(crop, tmp_path, monkeypatch, capsys):
    src = io.write_tiff(tmp_path / "in.tif", crop, axes="YX")
    out = tmp_path / "o.tif"
    orig, n = S.write_block, {"k": 0}

    def full(*a, **k):
        n["k"] += 1
        if n["k"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(*a, **k)

    monkeypatch.setattr(S, "write_block", full)
    assert main(["-q", "predict", str(src), str(out), "--model", MODEL, "--tile", "16"]) == 2
    err = capsys.readouterr().err
    work = tmp_path / ".o.tif.pssr-work.zarr"
    assert "No space left" in err and str(work) in err and "resume" in err
    assert not out.exists() and work.is_dir()
    monkeypatch.setattr(S, "write_block", orig)
    assert main(["-q", "predict", str(src), str(out), "--model", MODEL, "--tile", "16"]) == 0
    assert not work.exists()
    np.testing.assert_array_equal(
        tifffile.imread(out), restore(crop, model=MODEL, tile=16, progress=False).output
    )


def test_failure_before_any_block_leaves_nothing(tmp_path):
    vol = np.full((2, 32, 32), np.nan, np.float32)
    src = io.write_tiff(tmp_path / "nan.tif", vol, axes="ZYX")
    with pytest.raises(PredictError):
        restore(str(src), model=MODEL, output=tmp_path / "o.tif", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.tif"]


# ----------------------------------------------------------------------------- verify
def test_verify_ok_and_finds_each_kind_of_fault(crop, tmp_path):
    out = tmp_path / "o.ome.zarr"
    restore(crop, model=MODEL, output=out, tile=32, progress=False)
    assert main(["-q", "verify", str(out)]) == 0
    r = verify_output(out, progress=False)
    assert r["blocks"] == 16 and r["levels"] == 4
    g = zarr.open_group(str(out), mode="r+")
    # A changed value in s0: checksum mismatch, with the block's coordinates.
    s0 = g["s0"]
    s0[100, 300] = s0[100, 300] + 1
    with pytest.raises(IntegrityError, match=r"s0 block at y 0:32 x 64:96"):
        verify_output(out, progress=False)
    s0[100, 300] = s0[100, 300] - 1
    verify_output(out, progress=False)
    # A changed recorded checksum (not the data): the message names both suspects.
    ck = zarr.open_array(str(out / ".pssr" / "checksums"), mode="r+")
    ck[5, 0, 0] = ck[5, 0, 0] ^ 1
    with pytest.raises(
        IntegrityError, match=r"block 5 of .pssr/checksums\); the block or its recorded checksum"
    ):
        verify_output(out, progress=False)
    ck[5, 0, 0] = ck[5, 0, 0] ^ 1
    # A zeroed patch in a pyramid level.
    g["s2"][0:10, 0:10] = 0
    with pytest.raises(IntegrityError, match="level s2"):
        verify_output(out, progress=False)


def test_verify_refuses_running_and_invalid(crop, tmp_path):
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(InterruptedError):
        restore(crop, model=MODEL, output=out, tile=32, progress=False, callback=lambda d, n: d < 3)
    with pytest.raises(IntegrityError, match="interrupted"):
        verify_output(out, progress=False)
    assert main(["-q", "verify", str(out)]) == 2


def test_written_ome_zarr_validates_with_ome_zarr_models(tmp_path, crop):
    from ome_zarr_models.v05 import Image

    out = tmp_path / "o.ome.zarr"
    restore(np.stack([crop[:64, :64]] * 3), model="em", output=out, fidelity=True, tta=False, progress=False)
    g = zarr.open_group(str(out), mode="r")
    Image.from_zarr(g)
    names = {name: arr.metadata.dimension_names for name, arr in g.arrays()}
    assert set(names) == {"s0", "s1", "s2"}  # the image group holds the image only
    names["fidelity"] = S.open_arrays(out)["fidelity"].metadata.dimension_names
    ck = zarr.open_array(str(out / ".pssr" / "checksums"), mode="r")
    assert ck.metadata.dimension_names == ("block", "array", "byte")
    assert all(d == ("z", "y", "x") for d in names.values()), names


def test_five_d_plain_tiff_needs_axes(tmp_path):
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((2, 2, 2, 16, 16), np.uint8))
    with pytest.raises(io.PssrIOError, match="--axes"):
        restore(str(tmp_path / "five.tif"), model=MODEL, output=tmp_path / "o.ome.zarr")
    with pytest.raises(PredictError, match="each at most once"):
        restore(np.zeros((2, 2, 8, 8), np.float32), axes="ZZYX", model=MODEL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["five.tif"]


def test_output_is_marked_complete_only_after_verification(crop, tmp_path, monkeypatch):
    """A pyramid level that came out wrong must never be published as complete."""
    out = tmp_path / "o.ome.zarr"
    real = pyramid.Builder._compute

    def broken(self, k, idx):  # a pyramid writer that loses part of a chunk
        real(self, k, idx)
        if k == 1 and not any(idx):
            self.levels[1][:8, :8] = 0

    monkeypatch.setattr(pyramid.Builder, "_compute", broken)
    with pytest.raises(IntegrityError, match="pyramid level s1"):
        restore(crop, model=MODEL, output=out, tile=32, progress=False)
    assert zarr.open_group(str(out), mode="r").attrs["pssr"]["status"] == "running"
    monkeypatch.setattr(pyramid.Builder, "_compute", real)
    restore(crop, model=MODEL, output=out, tile=32, progress=False)  # the same command repairs it
    verify_output(out, progress=False)


def test_stale_partial_tiff_from_a_killed_run_is_removed(crop, tmp_path):
    out = tmp_path / "o.tif"
    stale = tmp_path / ".o.tif.deadbeef.partial"
    stale.write_bytes(b"half a tiff")
    restore(crop, model=MODEL, output=out, tile=32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.tif"]


def test_missing_output_folder_is_a_clear_error(crop, tmp_path):
    with pytest.raises(PredictError, match="does not exist; create it first"):
        restore(crop, model=MODEL, output=tmp_path / "nope" / "o.ome.zarr", progress=False)


# ----------------------------------------------- found by the adversarial review (issue 10)
@pytest.mark.parametrize("how", ["path", "inline", "from_array_inline"])
def test_dask_layer_opened_by_path_is_not_overwritten(crop, tmp_path, how):
    import dask.array as da

    x = tmp_path / "nap.ome.zarr"
    restore(crop[:64, :64], model=MODEL, output=x, progress=False)
    z = zarr.open_array(str(x / "s1"), mode="r")
    data = {
        "path": lambda: da.from_zarr(str(x / "s1")),  # fsspec store, as napari-ome-zarr opens layers
        "inline": lambda: da.from_zarr(z, inline_array=True),
        "from_array_inline": lambda: da.from_array(z, inline_array=True),
    }[how]()
    with pytest.raises(IntegrityError):
        restore(data, model=MODEL, output=x, overwrite=True, tile=32, progress=False)
    verify_output(x, progress=False)


def _interrupted(src, out, model, **kw):
    with pytest.raises(InterruptedError):
        restore(str(src), model=model, output=out, tile=16, progress=False, callback=lambda d, n: d < 3, **kw)


def test_resume_refuses_a_changed_input_or_model(crop, tiny, tmp_path):
    src = io.write_tiff(tmp_path / "in.tif", crop[:64, :64], axes="YX")
    out = tmp_path / "o.ome.zarr"
    _interrupted(src, out, tiny)
    time.sleep(0.01)
    io.write_tiff(src, crop[:64, :64][:, ::-1], axes="YX", overwrite=True)  # same percentiles
    with pytest.raises(PredictError, match="input_id"):
        restore(str(src), model=tiny, output=out, tile=16, progress=False)
    # A model file replaced in place (same path, other weights).
    out2 = tmp_path / "o2.ome.zarr"
    m = tmp_path / "m.safetensors"
    m.write_bytes(Path(tiny).read_bytes())
    _interrupted(src, out2, str(m))
    lm = P.load_model(str(m))
    import torch

    with torch.no_grad():
        for prm in lm.net.parameters():
            prm.mul_(0.5)
    from pssr.nn.modelfile import save_model

    save_model(m, lm.net, lm.config, lm.meta)
    with pytest.raises(PredictError, match="model_sha256"):
        restore(str(src), model=str(m), output=out2, tile=16, progress=False)


def test_side_files_are_outputs_too(crop, tmp_path):
    precious = tmp_path / "a.fidelity.json"
    precious.write_text("precious")
    src = io.write_tiff(tmp_path / "s.tif", crop[:64, :64], axes="YX")
    with pytest.raises(PredictError, match="a.fidelity.json.*already exists.*--overwrite"):
        restore(str(src), model="em", output=tmp_path / "a.tif", fidelity=True, noise="model", progress=False)
    assert precious.read_text() == "precious"
    assert not (tmp_path / "a.tif").exists()


@pytest.mark.parametrize("dtype", ["int16", "float64"])
def test_tiff_output_of_dtypes_imagej_converts(crop, tmp_path, dtype):
    x = crop[:64, :64].astype(dtype) - 100
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, x)
    out = tmp_path / "o.tif"
    restore(str(src), model=MODEL, output=out, tile=32, progress=False)
    ref = restore(x, model=MODEL, tile=32, progress=False).output
    np.testing.assert_array_equal(tifffile.imread(out), ref.astype(np.float32))


def test_empty_or_garbage_lock_from_a_crash_is_taken_over(tmp_path):
    out = tmp_path / "o.ome.zarr"
    lock = tmp_path / ".o.ome.zarr.pssr-lock"
    for content in ("", "not json", "[1, 2]"):
        lock.write_text(content)
        old = time.time() - 60
        os.utime(lock, (old, old))
        with OutputLock(out):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not lock.exists()
    # A fresh empty lock (another run is creating it): a clear message, no "pid None".
    lock.write_text("")
    with pytest.raises(LockedError, match="empty or unreadable") as e:
        OutputLock(out).acquire()
    assert "None" not in str(e.value)
    lock.unlink()


def test_half_created_work_store_is_replaced_and_killed_finish_resumes(crop, tmp_path):
    src = io.write_tiff(tmp_path / "in.tif", crop[:64, :64], axes="YX")
    out = tmp_path / "o.tif"
    work = tmp_path / ".o.tif.pssr-work.zarr"
    work.mkdir()  # a store whose creation was cut short by a full disk: no pssr attributes
    (work / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    restore(str(src), model=MODEL, output=out, tile=16, progress=False)
    assert not work.exists()

    # A finish killed after the TIFF was renamed into place, before the work store was dropped.
    def ctrl_c(done, n):
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        restore(str(src), model=MODEL, output=tmp_path / "k.tif", tile=16, progress=False, callback=ctrl_c)
    assert (tmp_path / ".k.tif.pssr-work.zarr").is_dir()  # kept for the resume
    tifffile.imwrite(tmp_path / "k.tif", np.zeros((4, 4), np.uint8))  # what the killed finish left
    restore(str(src), model=MODEL, output=tmp_path / "k.tif", tile=16, progress=False)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "k.tif"), tifffile.imread(out))


def test_moved_interrupted_output_resumes_and_settings_are_named(crop, tiny, tmp_path):
    src = io.write_tiff(tmp_path / "in.tif", crop[:64, :64], axes="YX")
    _interrupted(src, tmp_path / "a.ome.zarr", tiny)
    os.rename(tmp_path / "a.ome.zarr", tmp_path / "b.ome.zarr")
    with pytest.raises(PredictError, match=r"tile 16 -> 32"):
        restore(str(src), model=tiny, output=tmp_path / "b.ome.zarr", tile=32, progress=False)
    res = restore(str(src), model=tiny, output=tmp_path / "b.ome.zarr", tile=16, progress=False)
    ref = restore(str(src), model=tiny, tile=16, progress=False).output
    np.testing.assert_array_equal(np.asarray(res.output[...]), ref)


def test_damaged_interrupted_output_says_how_to_start_over(crop, tmp_path):
    src = io.write_tiff(tmp_path / "in.tif", crop[:64, :64], axes="YX")
    out = tmp_path / "o.ome.zarr"
    _interrupted(src, out, MODEL)
    import shutil

    shutil.rmtree(out / ".pssr" / "done")  # markers gone: everything is redone, no crash
    restore(str(src), model=MODEL, output=out, tile=16, progress=False)
    out2 = tmp_path / "o2.ome.zarr"
    _interrupted(src, out2, MODEL)
    (out2 / "s0" / "zarr.json").unlink()
    with pytest.raises(PredictError, match="damaged.*--overwrite"):
        restore(str(src), model=MODEL, output=out2, tile=16, progress=False)


def test_input_is_read_ahead_in_a_background_thread_with_identical_output(crop, tiny):
    """Issue 13 item 3: reading batch k+1 overlaps computing batch k; the output is unchanged."""
    import threading

    class Spy:
        def __init__(self, a):
            self.a, self.shape, self.dtype, self.ndim, self.threads = a, a.shape, a.dtype, a.ndim, []

        def __getitem__(self, idx):
            self.threads.append(threading.current_thread().name)
            return self.a[idx]

        def __array__(self, dtype=None, copy=None):
            return np.asarray(self.a, dtype=dtype)

    x = np.stack([crop[:64, :64]] * 3)
    spy = Spy(x)
    got = restore(spy, model=tiny, axes="ZYX", tile=16, batch=2, progress=False).output
    ref = restore(x, model=tiny, axes="ZYX", tile=16, batch=2, progress=False).output
    np.testing.assert_array_equal(got, ref)
    ahead = sum(t.startswith("pssr-prefetch") for t in spy.threads)
    assert ahead >= len(spy.threads) // 2, spy.threads[:10]


def test_zarr_input_rewritten_in_place_is_redone_not_mixed(crop, tiny, tmp_path, caplog):
    x = np.stack([crop[:64, :64], crop[64:, 64:]])
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=x.shape, chunks=(1, 64, 64), dtype="uint8")
    z[...] = x
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(InterruptedError):
        restore(
            str(tmp_path / "in.zarr"),
            model=tiny,
            output=out,
            tile=16,
            progress=False,
            callback=lambda d, n: d < 6,
        )
    z[...] = x[:, :, ::-1]  # same values, same percentiles, other data; zarr.json untouched
    with caplog.at_level("WARNING", logger="pssr.blockwise.store"):
        res = restore(str(tmp_path / "in.zarr"), model=tiny, output=out, tile=16, progress=False)
    assert "input changed" in caplog.text
    ref = restore(x[:, :, ::-1].copy(), model=tiny, tile=16, progress=False).output
    np.testing.assert_array_equal(np.asarray(res.output[...]), ref)


def test_dask_inputs_are_identified_for_resume(crop, tiny, tmp_path):
    import dask.array as da

    a = da.from_array(crop[:64, :64], chunks=32)
    b = da.from_array(crop[:64, :64][::-1].copy(), chunks=32)
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(InterruptedError):
        restore(a, model=tiny, output=out, tile=16, progress=False, callback=lambda d, n: d < 3)
    with pytest.raises(PredictError, match="input_id"):
        restore(b, model=tiny, output=out, tile=16, progress=False)
    res = restore(a, model=tiny, output=out, tile=16, progress=False)
    np.testing.assert_array_equal(
        np.asarray(res.output[...]), restore(crop[:64, :64], model=tiny, tile=16).output
    )
