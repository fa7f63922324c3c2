import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from pssr.blockwise.predict import PredictError, restore
from pssr.degrade.crappify import get_preset
from pssr.io import formats as io
from pssr.nn.modelfile import load_model

# ------------------------------------------------------------------------------ tiling


# -------------------------------------------------------------------------- in memory
@pytest.mark.parametrize("tile", [16, 40, 64])
def test_tiled_equals_whole_image(model_path, em_lr, tile):
    whole = restore(em_lr, model=model_path, tile=512, dtype="float32", progress=False).output
    tiled = restore(em_lr, model=model_path, tile=tile, dtype="float32", progress=False).output
    assert tiled.shape == whole.shape == (3, em_lr.shape[1] * 2, em_lr.shape[2] * 2)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-4 * np.ptp(whole))


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
@pytest.mark.parametrize("shape", [(128, 127), (131, 128)])
def test_tiled_equals_whole_with_tta_on_odd_sizes(isbi, shape):
    """TTA flips blocks: padding to the network's multiple inside the network landed on the other
    side of a flipped odd-sized block, so tiled and whole once differed by 0.08 of the range (the
    image must exceed a tile plus its 68-px halos for blocks to differ from the whole image)."""
    x = isbi[27][: shape[0], : shape[1]]
    kw = dict(model="em", tta=True, dtype="float32", progress=False, backend="torch")
    whole = restore(x, **kw).output
    tiled = restore(x, tile=32, **kw).output
    assert whole.shape == (shape[0] * 4, shape[1] * 4)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5 * np.ptp(whole))


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_tiled_equals_whole_with_trained_builtin(isbi):
    # Trained weights switch many ReLUs off for a given input; the halo must still cover the
    # architecture's full receptive field, or seams appear on other inputs.
    from pssr.nn.model import receptive_radius

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
    if np.dtype(dtype).kind == "f":
        return
    info = np.iinfo(dtype)
    np.testing.assert_array_equal(out, np.clip(np.rint(f), info.min, info.max).astype(dtype))
    # A saturated grid makes the (untrained, amplified) model undershoot 0: clipped, not wrapped around.
    g = np.zeros((64, 64), dtype)
    g[::8] = g[:, ::8] = info.max
    gi = restore(g, model=model_path, progress=False).output
    gf = restore(g, model=model_path, dtype="float32", progress=False).output
    assert (gf < info.min).any()
    np.testing.assert_array_equal(gi, np.clip(np.rint(gf), info.min, info.max).astype(dtype))


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
    # of 9 blocks, the data block and the 3 whose halo reaches into it are restored; 5 read only zeros
    assert r.summary["empty_blocks"] == 5
    assert np.all(r.output[128:, :] == 0) and np.all(r.output[:, 128:] == 0)  # the 5 filled blocks


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
    assert not (out / ".pssr" / "done").exists()
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


# ------------------------------------------------------------------- resume after kill


# ----------------------------------------------------------------------- distributed


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_cli_predict_and_errors(model_path, isbi, tmp_path):
    from pssr.cli.app import main

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


def test_failed_in_memory_run_leaves_no_temp(model_path, monkeypatch, tmp_path):
    import tempfile

    import pssr.blockwise.store as S

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(S, "write_block", boom)
    with pytest.raises(OSError, match="disk full"):
        restore(np.random.rand(32, 32).astype(np.float32), model=model_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_result_path_names_the_output_whatever_its_kind(model_path, em_lr, tmp_path):
    lr = em_lr[0, :48, :48]
    assert restore(lr, model=model_path, progress=False).path is None
    for name in ("o.tif", "o.ome.zarr"):
        r = restore(lr, model=model_path, output=tmp_path / name, progress=False)
        assert r.path is not None and os.path.samefile(r.path, tmp_path / name)


def test_a_section_context_model_takes_z_neighbours_of_a_tzyx_input(isbi, tmp_path):
    # em-3d was trained on Z stacks (its metadata says so): on a TZYX input its neighbours are
    # the adjacent sections of the same time point, never the same section at other times.
    from pssr.blockwise.inputs import context_axis

    assert context_axis("TZYX", 3, "Z") == 1 and context_axis("TZYX", 3, "T") == 0
    assert context_axis("TZYX", 3, "T/Z") == 0 and context_axis("ZYX", 3, "T") == 0
    assert load_model("em-3d").meta["context_axis"] == "Z"
    assert load_model("fluo-mf").meta["context_axis"] == "T"
    lr = isbi[:6, :48, :64].reshape(2, 3, 48, 64)  # two "time points" of three sections
    for model, want in (("em-3d", 1), ("fluo-mf", 0)):
        out = tmp_path / f"{model}.ome.zarr"
        with pytest.raises(InterruptedError):
            restore(lr, model=model, axes="TZYX", output=out, progress=False, callback=lambda d, n: False)
        assert zarr.open_group(str(out), mode="r").attrs["pssr"]["job"]["context_axis"] == want


def test_a_single_channel_axis_is_kept_as_a_plane_axis(isbi, tmp_path):
    # 5D OME-Zarr (bioformats2raw) stores one channel as TCZYX with C=1: restored as the TZYX
    # volume it is, keeping its axes in an OME-Zarr output; several channels stay refused.
    vol = np.ascontiguousarray(isbi[:6, :40, :48].reshape(2, 1, 3, 40, 48))
    kw = {"model": "em-3d", "dtype": "float32", "progress": False}
    five = restore(vol, axes="TCZYX", **kw).output
    four = restore(vol[:, 0], axes="TZYX", **kw).output
    assert five.shape == (2, 1, 3, 160, 192)
    np.testing.assert_array_equal(five[:, 0], four)
    out = tmp_path / "o.ome.zarr"
    restore(vol, axes="TCZYX", output=out, model="em-3d", progress=False)
    g = zarr.open_group(str(out), mode="r")
    assert [a["name"] for a in dict(g.attrs)["ome"]["multiscales"][0]["axes"]] == list("tczyx")
    assert g.attrs["pssr"]["job"]["context_axis"] == 2  # the model's Z, not T or C
    with pytest.raises(PredictError, match="TIFF output cannot hold them"):
        restore(vol, axes="TCZYX", output=tmp_path / "o.tif", model="em-3d", progress=False)
    assert not (tmp_path / "o.tif").exists()
    with pytest.raises(PredictError, match="the channel axis has 2 channels"):
        restore(np.zeros((2, 3, 40, 48), np.uint8), axes="CZYX", model="em", progress=False)


def test_file_outputs_need_axes_in_ngff_order_and_are_refused_before_any_work(isbi, tmp_path):
    vol = np.ascontiguousarray(isbi[:3, :32, :40].reshape(3, 1, 32, 40))  # ZCYX: C after Z
    with pytest.raises(PredictError, match=r"axes are ZCYX, but a file output .* order CZYX"):
        restore(vol, axes="ZCYX", output=tmp_path / "o.ome.zarr", model="bilinear:4", progress=False)
    assert list(tmp_path.iterdir()) == []
    mem = restore(vol, axes="ZCYX", model="bilinear:4", progress=False).output  # in memory: any order
    np.testing.assert_array_equal(
        mem[:, 0], restore(vol[:, 0], axes="ZYX", model="bilinear:4", progress=False).output
    )


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_a_5d_in_memory_single_channel_input_runs_on_dask_like_locally(isbi, tmp_path):
    vol = np.ascontiguousarray(isbi[:4, :32, :40].reshape(2, 1, 2, 32, 40))
    kw = {"axes": "TCZYX", "model": "bilinear:4", "progress": False}
    local = restore(vol, output=tmp_path / "l.ome.zarr", **kw)
    dask = restore(vol, output=tmp_path / "d.ome.zarr", workers=1, **kw)
    a = zarr.open_group(str(local.path), mode="r")["s0"][...]
    np.testing.assert_array_equal(zarr.open_group(str(dask.path), mode="r")["s0"][...], a)


def test_origin_and_time_calibration_reach_every_level_and_side_file(tmp_path, model_path):
    """An OME-Zarr input's translation, frame interval and time unit are carried to the output
    (every pyramid level overlays the input in world coordinates), to a TIFF output and to the
    result; the crappify CLI's low-resolution output lies where its pixels were averaged."""
    rng = np.random.default_rng(1)
    data = (rng.random((2, 48, 40)) * 255).astype(np.uint8)
    src = io.write_ome_zarr(
        tmp_path / "in.ome.zarr", data, axes="TYX", scale={"T": 4.0, "Y": 0.02, "X": 0.03}, unit="micrometer",
        origin={"T": 8.0, "Y": 10.0, "X": -5.0}, time_unit="second",
    )  # fmt: skip
    s = 2
    r = restore(str(src), model=model_path, output=tmp_path / "o.ome.zarr", fidelity=True, progress=False)
    ms = io.ome_zarr_metadata(zarr.open_group(str(tmp_path / "o.ome.zarr"), mode="r"))
    assert ms["axes"][0] == {"name": "t", "type": "time", "unit": "second"}
    for k, ds in enumerate(ms["datasets"]):
        tf = {t["type"]: t[t["type"]] for t in ds["coordinateTransformations"]}
        f = 2**k
        for i, (a, w_in, o_in) in enumerate([("Y", 0.02, 10.0), ("X", 0.03, -5.0)], start=1):
            w = w_in / s * f
            assert tf["scale"][i] == pytest.approx(w)
            # world position of the level's pixel 0 centre = the input coordinate it samples
            assert tf["translation"][i] == pytest.approx(o_in + ((f - 1) / 2 - (s - 1) / 2) * w_in / s), a
        assert tf["scale"][0] == 4.0 and tf["translation"][0] == 8.0
    assert r.origin == pytest.approx({"T": 8.0, "Y": 10.0 - 0.5 * 0.01, "X": -5.0 - 0.5 * 0.015})
    back = io.read_image(tmp_path / "o.ome.zarr")
    assert back.origin == pytest.approx(r.origin) and back.time_unit == "second" and back.scale["T"] == 4.0

    # The fidelity map (input grid) as a pssr-attributed side array of the same output
    fid = io.read_image(tmp_path / "o.ome.zarr" / ".pssr" / "fidelity")
    assert fid.origin == pytest.approx({"T": 8.0, "Y": 10.0, "X": -5.0}) and fid.scale["X"] == 0.03

    rt = restore(str(src), model=model_path, output=tmp_path / "o.tif", fidelity=True, progress=False)
    for p, want in ((tmp_path / "o.tif", r.origin), (tmp_path / "o.fidelity.tif", {"Y": 10.0, "X": -5.0})):
        img = io.read_image(p)
        assert img.scale["T"] == 4.0 and img.time_unit == "second", p
        assert img.origin == pytest.approx({a: v for a, v in want.items() if a != "T"}), (
            p
        )  # ImageJ: no T origin
    assert rt.origin == pytest.approx(r.origin)
    # an image read by pssr.io.formats goes in with its calibration
    ri = restore(io.read_image(src), model=model_path, progress=False)
    assert ri.origin == pytest.approx(r.origin) and ri.scale == pytest.approx(r.scale)
    with pytest.raises(PredictError, match="zarr group"):
        restore(zarr.open_group(str(src), mode="r"), model=model_path, progress=False)

    mem = restore(io.read_image(src).data[...], model=model_path, progress=False)
    assert mem.origin == pytest.approx({"Y": -0.5 / 2, "X": -0.5 / 2})  # in input pixels: no calibration

    from pssr.cli.app import main

    assert (
        main(
            [
                "crappify",
                str(src),
                str(tmp_path / "lr.ome.zarr"),
                "--preset",
                "em",
                "--scale",
                "4",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    lr = io.read_image(tmp_path / "lr.ome.zarr")
    assert lr.scale == pytest.approx({"T": 4.0, "Y": 0.08, "X": 0.12})
    assert lr.origin == pytest.approx({"T": 8.0, "Y": 10.0 + 1.5 * 0.02, "X": -5.0 + 1.5 * 0.03})
    assert lr.time_unit == "second"
    # TIFF and OME-Zarr agree on the origin: any chain of them lands where the input was
    for i, (mid, out) in enumerate(((".tif", ".ome.zarr"), (".ome.zarr", ".tif"), (".tif", ".tif"))):
        lr_p, sr_p = tmp_path / f"c{i}_lr{mid}", tmp_path / f"c{i}_sr{out}"
        assert main(["crappify", str(src), str(lr_p), "--preset", "em", "--scale", "4", "--seed", "0"]) == 0
        restore(str(lr_p), model="bilinear:4", output=sr_p, progress=False)
        back = io.read_image(sr_p)
        assert back.origin == pytest.approx({"Y": 10.0, "X": -5.0}), (mid, out)
        assert back.scale["Y"] == pytest.approx(0.02) and back.scale["X"] == pytest.approx(0.03), (mid, out)


def test_crappify_then_restore_of_an_uncalibrated_translated_input_overlays_it(tmp_path):
    from pssr.cli.app import main

    src = tmp_path / "hr.ome.zarr"
    io.write_ome_zarr(src, np.zeros((64, 64), np.uint8), axes="YX", origin={"Y": 8.0, "X": 16.0})
    assert main(["crappify", str(src), str(tmp_path / "lr.ome.zarr"), "--preset", "em", "--scale", "4"]) == 0
    lr = io.read_image(tmp_path / "lr.ome.zarr")
    assert lr.scale == pytest.approx({"Y": 4.0, "X": 4.0}) and lr.origin == pytest.approx(
        {"Y": 9.5, "X": 17.5}
    )
    restore(
        str(tmp_path / "lr.ome.zarr"), model="bilinear:4", output=tmp_path / "sr.ome.zarr", progress=False
    )
    sr = io.read_image(tmp_path / "sr.ome.zarr")
    assert sr.scale == pytest.approx({"Y": 1.0, "X": 1.0}) and sr.origin == pytest.approx(
        {"Y": 8.0, "X": 16.0}
    )


@pytest.mark.parametrize(
    ("scale", "origin", "match"),
    [
        ({"Y": 0.0, "X": 0.0}, {}, "pixel size of 0.0"),
        ({"Y": 0.1, "X": "0.1"}, {}, "pixel size of '0.1'"),
        ({"Y": 0.1, "X": 0.1}, {"X": float("nan")}, "origin .translation. of nan"),
    ],
)
@pytest.mark.parametrize("out", ["o.ome.zarr", "o.tif"])
def test_an_image_with_bad_calibration_is_refused_before_any_output(tmp_path, scale, origin, match, out):
    img = io.Image(np.zeros((32, 32), np.uint8), "YX", scale, "micrometer", origin=origin)
    with pytest.raises(io.PssrIOError, match=match):
        restore(img, model="bilinear:4", output=tmp_path / out, progress=False)
    assert not list(tmp_path.iterdir())


def test_an_image_keeps_the_calibration_of_the_axes_an_override_keeps(tmp_path):
    img = io.Image(np.zeros((2, 16, 16), np.uint8), "ZYX", {"Z": 0.5, "Y": 0.1, "X": 0.1}, "micrometer",
                   origin={"Z": 1.0, "Y": 2.0, "X": 3.0})  # fmt: skip
    r = restore(img, model="bilinear:4", axes="TYX", progress=False)
    assert r.scale == pytest.approx({"Y": 0.025, "X": 0.025})
    assert r.origin == pytest.approx({"Y": 2.0 - 1.5 * 0.025, "X": 3.0 - 1.5 * 0.025})
