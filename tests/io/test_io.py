import os

import numpy as np
import pytest
import tifffile
import zarr

from pssr.io import formats as io


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("axes", ["YX", "ZYX", "TYX"])
def test_tiff_roundtrip_with_pixel_size(tmp_path, dtype, axes):
    shape = {"YX": (20, 24), "ZYX": (3, 20, 24), "TYX": (4, 20, 24)}[axes]
    data = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    scale = {"X": 0.004, "Y": 0.004}
    if "Z" in axes:
        scale["Z"] = 0.05
    p = io.write_tiff(tmp_path / "a.tif", data, axes=axes, scale=scale, unit="micrometer")
    img = io.read_image(p)
    assert img.axes == axes
    np.testing.assert_array_equal(img.data, data)
    assert img.dtype == dtype
    for k, v in scale.items():
        assert img.scale[k] == pytest.approx(v, rel=1e-5)
    assert img.unit == "micrometer"
    assert not list(tmp_path.glob(".*partial"))


def test_read_real_imagej_stack(isbi_path):
    img = io.read_image(isbi_path)
    assert img.axes == "ZYX" and img.shape == (30, 512, 512)
    assert img.scale == pytest.approx({"X": 0.004, "Y": 0.004, "Z": 0.05})


def test_read_ome_tiff(tmp_path):
    data = np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16)
    p = tmp_path / "x.ome.tif"
    tifffile.imwrite(
        p,
        data,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1, "PhysicalSizeZ": 0.5},
    )
    img = io.read_image(p)
    assert img.axes == "ZYX"
    assert img.scale == pytest.approx({"X": 0.1, "Y": 0.1, "Z": 0.5})


def test_png(tmp_path):
    import imageio.v3 as iio

    data = np.arange(256, dtype=np.uint8).reshape(16, 16)
    iio.imwrite(tmp_path / "a.png", data)
    img = io.read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(img.data, data)
    iio.imwrite(tmp_path / "rgb.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(io.PssrIOError, match="RGB"):
        io.read_image(tmp_path / "rgb.png")


def test_ome_zarr_roundtrip_lazy_with_pyramid(tmp_path):
    data = np.random.default_rng(0).random((3, 128, 96)).astype(np.float32)
    p = io.write_ome_zarr(
        tmp_path / "a.ome.zarr",
        data,
        axes="ZYX",
        scale={"Z": 0.05, "Y": 0.002, "X": 0.002},
        unit="micrometer",
    )
    img = io.read_image(p)
    assert isinstance(img.data, zarr.Array)  # lazy
    assert img.axes == "ZYX" and img.unit == "micrometer"
    assert img.scale == pytest.approx({"Z": 0.05, "Y": 0.002, "X": 0.002})
    np.testing.assert_array_equal(img.data[1, 10:20, 5:9], data[1, 10:20, 5:9])
    g = zarr.open_group(str(p), mode="r")
    assert len(list(g.arrays())) >= 2  # pyramid
    ms = io.ome_zarr_metadata(g)
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"][-1] == pytest.approx(0.004)


def test_plain_zarr_array_is_lazy(tmp_path):
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=(4, 64, 64), chunks=(1, 32, 32), dtype="uint8")
    z[2] = 7
    img = io.read_image(tmp_path / "v.zarr")
    assert img.axes == "ZYX" and isinstance(img.data, zarr.Array)
    assert int(img.data[2, 5, 5]) == 7


def test_errors(tmp_path):
    with pytest.raises(io.PssrIOError, match="does not exist"):
        io.read_image(tmp_path / "missing.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(io.PssrIOError, match="cannot read"):
        io.read_image(bad)
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(io.PssrIOError, match="unsupported extension"):
        io.read_image(tmp_path / "x.jpg")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(io.PssrIOError, match="no OME-Zarr"):
        io.read_image(tmp_path / "g.zarr")
    with pytest.raises(io.PssrIOError, match="axes='TYX' does not fit"):
        io.read_image(io.write_tiff(tmp_path / "y.tif", np.zeros((4, 4), np.uint8), axes="YX"), axes="TYX")


def test_output_checks(tmp_path):
    (tmp_path / "out.tif").write_bytes(b"old")
    with pytest.raises(io.PssrIOError, match="already exists.*--overwrite"):
        io.write_tiff(tmp_path / "out.tif", np.zeros((4, 4), np.uint8), axes="YX")
    assert (tmp_path / "out.tif").read_bytes() == b"old"
    io.write_tiff(tmp_path / "out.tif", np.zeros((4, 4), np.uint8), axes="YX", overwrite=True)
    assert io.read_image(tmp_path / "out.tif").shape == (4, 4)
    with pytest.raises(io.PssrIOError, match="must end in"):
        io.check_output_path(tmp_path / "out.jpg")
    with pytest.raises(io.PssrIOError, match="does not exist"):
        io.check_output_path(tmp_path / "nodir" / "o.tif")


def test_unwritable(tmp_path, monkeypatch):
    # CI runs as root, which ignores permission bits: simulate a read-only folder.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(io.PssrIOError, match="not writable"):
        io.check_output_path(tmp_path / "o.tif")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", boom)
    with pytest.raises(OSError, match="disk full"):
        io.write_tiff(tmp_path / "o.tif", np.zeros((4, 4), np.uint8), axes="YX")
    assert list(tmp_path.iterdir()) == []


def test_zarr_axes_from_dimension_names_and_a_bioformats2raw_root(tmp_path):
    import zarr

    a = zarr.create_array(str(tmp_path / "a.zarr"), shape=(2, 1, 3, 16, 16), dtype="uint8",
                          dimension_names=["t", "c", "z", "y", "x"])  # fmt: skip
    img = io.read_image(tmp_path / "a.zarr")
    assert img.axes == "TCZYX" and not img.axes_guessed
    b = zarr.create_array(str(tmp_path / "b.zarr"), shape=(2, 1, 3, 16, 16), dtype="uint8")
    del a, b
    with pytest.raises(io.PssrIOError, match="no usable axis metadata"):
        io.read_image(tmp_path / "b.zarr")
    assert io.read_image(tmp_path / "b.zarr", axes="TCZYX").axes == "TCZYX"
    root = zarr.open_group(str(tmp_path / "r.ome.zarr"), mode="w")
    img0 = root.create_group("0")
    img0.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "y", "type": "space"},
                         {"name": "x", "type": "space"}], "datasets": [{"path": "s0"}]}]}  # fmt: skip
    with pytest.raises(io.PssrIOError, match=r"bioformats2raw layout\): give one of .*r\.ome\.zarr/0"):
        io.read_image(tmp_path / "r.ome.zarr")


# ------------------------------------------------- origin (translation) and time calibration


def _ngff_group(path, data, axes, datasets_tf, ms_tf=None, version="0.5", units=None):
    """A hand-written OME-Zarr image (one level) with the given transformations."""
    g = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    g.create_array("0", data=data, chunks=data.shape)
    kinds = {"t": "time", "c": "channel"}
    ax = [
        {"name": a, "type": kinds.get(a, "space"), **({"unit": units[a]} if units and a in units else {})}
        for a in axes
    ]
    ms = {"axes": ax, "datasets": [{"path": "0", "coordinateTransformations": datasets_tf}]}
    if ms_tf:
        ms["coordinateTransformations"] = ms_tf
    if version == "0.5":
        g.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    else:
        g.attrs["multiscales"] = [{"version": "0.4", **ms}]
    return path


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_origin_time_unit_and_multiscale_transform_are_read(tmp_path, version):
    data = np.arange(2 * 3 * 16 * 16, dtype=np.uint16).reshape(2, 3, 16, 16)
    p = _ngff_group(
        tmp_path / "in.ome.zarr",
        data,
        "tzyx",
        [
            {"type": "scale", "scale": [1.0, 0.5, 0.25, 0.25]},
            {"type": "translation", "translation": [0, 1, 2, 3]},
        ],
        ms_tf=[
            {"type": "scale", "scale": [30.0, 1.0, 2.0, 2.0]},
            {"type": "translation", "translation": [60, 0, 0, 0.5]},
        ],
        version=version,
        units={"t": "second", "y": "micrometer", "x": "micrometer", "z": "micrometer"},
    )
    img = io.read_image(p)
    # world = ms_scale * (ds_scale * i + ds_translation) + ms_translation
    assert img.scale == pytest.approx({"T": 30.0, "Z": 0.5, "Y": 0.5, "X": 0.5})
    assert img.origin == pytest.approx({"T": 60.0, "Z": 1.0, "Y": 4.0, "X": 6.5})
    assert img.time_unit == "second" and img.unit == "micrometer"
    # An axes override keeps the calibration of the axes it keeps.
    img2 = io.read_image(p, axes="TZYX")
    assert img2.origin == img.origin and img2.time_unit == "second"


def test_ome_zarr_unknown_transformation_is_refused(tmp_path):
    p = _ngff_group(
        tmp_path / "in.ome.zarr", np.zeros((8, 8), np.uint8), "yx", [{"type": "affine", "affine": []}]
    )
    with pytest.raises(io.PssrIOError, match="transformation 'affine' is not supported"):
        io.read_image(p)


def test_written_ome_zarr_levels_carry_origin_and_time(tmp_path):
    data = np.zeros((2, 64, 64), np.uint8)
    p = io.write_ome_zarr(
        tmp_path / "o.ome.zarr", data, axes="TYX", scale={"T": 5.0, "Y": 0.1, "X": 0.1}, unit="micrometer",
        origin={"T": 1.0, "Y": 2.0, "X": 3.0}, time_unit="minute",
    )  # fmt: skip
    ms = io.ome_zarr_metadata(zarr.open_group(str(p), mode="r"))
    assert ms["axes"][0] == {"name": "t", "type": "time", "unit": "minute"}
    for k, ds in enumerate(ms["datasets"]):
        f = 2**k
        tf = {t["type"]: t[t["type"]] for t in ds["coordinateTransformations"]}
        assert tf["scale"] == pytest.approx([5.0, 0.1 * f, 0.1 * f])
        # a level downsampled f times: its pixel 0 is centred (f-1)/2 level-0 pixels further on
        assert tf["translation"] == pytest.approx([1.0, 2.0 + (f - 1) / 2 * 0.1, 3.0 + (f - 1) / 2 * 0.1])
    back = io.read_image(p)
    assert back.origin == pytest.approx({"T": 1.0, "Y": 2.0, "X": 3.0}) and back.time_unit == "minute"


def test_imagej_tiff_frame_interval_and_origin_roundtrip(tmp_path):
    p = io.write_tiff(
        tmp_path / "t.tif", np.zeros((3, 8, 8), np.uint8), axes="TYX", scale={"T": 2.5, "Y": 0.5, "X": 0.5},
        unit="micrometer", origin={"Y": -1.0, "X": 2.0}, time_unit="minute",
    )  # fmt: skip
    img = io.read_image(p)
    assert img.scale == pytest.approx({"T": 2.5, "Y": 0.5, "X": 0.5})
    assert img.time_unit == "minute"
    assert img.origin == pytest.approx({"Y": -1.0, "X": 2.0})
    ij = tifffile.TiffFile(p).imagej_metadata
    assert ij["finterval"] == 2.5 and ij["tunit"] == "min" and ij["xorigin"] == pytest.approx(-4.0)


def test_mixed_space_units_are_converted_to_the_plane_unit(tmp_path):
    p = _ngff_group(
        tmp_path / "m.ome.zarr",
        np.zeros((2, 8, 8), np.uint8),
        "zyx",
        [
            {"type": "scale", "scale": [0.05, 4.0, 4.0]},
            {"type": "translation", "translation": [0.1, 400, 800]},
        ],
        units={"z": "micrometer", "y": "nanometer", "x": "nanometer"},
    )
    img = io.read_image(p)
    assert img.unit == "nanometer"
    assert img.scale == pytest.approx({"Z": 50.0, "Y": 4.0, "X": 4.0})
    assert img.origin == pytest.approx({"Z": 100.0, "Y": 400.0, "X": 800.0})
    q = _ngff_group(
        tmp_path / "q.ome.zarr",
        np.zeros((2, 8, 8), np.uint8),
        "zyx",
        [],
        units={"z": "furlong", "x": "nanometer"},
    )
    with pytest.raises(io.PssrIOError, match="different units.*cannot convert"):
        io.read_image(q)


def test_a_level_opened_by_its_path_keeps_its_calibration(tmp_path):
    p = io.write_ome_zarr(
        tmp_path / "o.ome.zarr", np.zeros((64, 64), np.uint8), axes="YX", scale={"Y": 0.5, "X": 0.25},
        unit="micrometer", origin={"Y": 3.0, "X": 4.0},
    )  # fmt: skip
    s0, s1 = io.read_image(p / "s0"), io.read_image(p / "s1")
    assert s0.scale == pytest.approx({"Y": 0.5, "X": 0.25}) and s0.origin == pytest.approx(
        {"Y": 3.0, "X": 4.0}
    )
    assert s1.scale == pytest.approx({"Y": 1.0, "X": 0.5}) and s1.unit == "micrometer"
    assert s1.origin == pytest.approx({"Y": 3.25, "X": 4.125})


@pytest.mark.parametrize(
    ("transforms", "match"),
    [
        ([{"type": "scale", "scale": [0.0, 1.0]}], "axis Y a pixel size of 0.0"),
        ([{"type": "scale", "scale": [1.0, -2.0]}], "axis X a pixel size of -2.0"),
        ([{"type": "scale", "scale": [float("nan"), 1.0]}], "pixel size of nan"),
        ([{"type": "translation", "translation": [float("inf"), 0]}], "origin .translation. of inf"),
        ([{"type": "translation", "translation": [1, 2, 3]}], r"must be a list of 2 numbers"),
        ([{"type": "translation", "translation": [None, 0]}], r"must be a list of 2 numbers"),
        ([{"type": "translation", "path": "t"}], "separate array"),
        ({"type": "scale", "scale": [1, 1]}, "must be a list"),
    ],
)
def test_bad_calibration_is_refused_when_read(tmp_path, transforms, match):
    p = _ngff_group(tmp_path / "b.ome.zarr", np.zeros((8, 8), np.uint8), "yx", transforms)
    with pytest.raises(io.PssrIOError, match=match):
        io.read_image(p)


def test_time_units_are_ngff_names(tmp_path, caplog):
    data = np.zeros((2, 8, 8), np.uint8)
    for tunit, want in (("usec", "microsecond"), ("sec", "second"), ("frame", None)):
        p = tmp_path / f"{tunit}.tif"
        tifffile.imwrite(p, data, imagej=True, metadata={"axes": "TYX", "finterval": 2.0, "tunit": tunit})
        img = io.read_image(p)
        assert img.scale["T"] == 2.0 and img.time_unit == want, tunit
    assert "'frame' is not an OME-NGFF time unit" in caplog.text
    z = io.write_ome_zarr(tmp_path / "t.ome.zarr", data, axes="TYX", scale={"T": 2.0}, time_unit="sec")
    assert io.read_image(z).time_unit == "second"


def test_tiff_axes_in_different_units_are_converted(tmp_path):
    data = np.zeros((2, 32, 32), np.uint8)
    ome = tmp_path / "o.ome.tif"
    meta = {
        "axes": "ZYX",
        "PhysicalSizeX": 0.1,
        "PhysicalSizeY": 0.1,
        "PhysicalSizeZ": 500,
        "PhysicalSizeZUnit": "nm",
    }
    tifffile.imwrite(ome, data, ome=True, metadata=meta)
    img = io.read_image(ome)
    assert img.unit == "micrometer" and img.scale == pytest.approx({"X": 0.1, "Y": 0.1, "Z": 0.5})
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(
        ij, data, imagej=True, resolution=(10.0, 10.0),
        metadata={"axes": "ZYX", "unit": "um", "spacing": 500, "zunit": "nm", "zorigin": -2},
    )  # fmt: skip
    img = io.read_image(ij)
    assert img.unit == "micrometer" and img.scale == pytest.approx({"X": 0.1, "Y": 0.1, "Z": 0.5})
    assert img.origin == pytest.approx({"Z": 1.0})  # 2 sections of 0.5 um


def test_a_frame_interval_without_unit_stays_without_unit(tmp_path):
    p = io.write_tiff(tmp_path / "t.tif", np.zeros((2, 8, 8), np.uint8), axes="TYX", scale={"T": 5.0})
    assert "tunit" not in tifffile.TiffFile(p).imagej_metadata
    img = io.read_image(p)
    assert img.scale["T"] == 5.0 and img.time_unit is None


def test_a_transformation_that_is_not_an_object_is_named(tmp_path):
    p = _ngff_group(tmp_path / "s.ome.zarr", np.zeros((8, 8), np.uint8), "yx", ["scale"])
    with pytest.raises(io.PssrIOError, match="must be an object"):
        io.read_image(p)


# ------------------------------------------------------------ declared sizes, lazy TIFFs (issue 23)
def _tiff_bomb(path) -> None:
    """283 bytes whose tags declare 100000 x 100000 pixels (one 16x16 tile listed)."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(path, mode="r+") as t:
        t.pages[0].tags["ImageWidth"].overwrite(100000)
        t.pages[0].tags["ImageLength"].overwrite(100000)


def test_a_tiff_declaring_more_than_it_holds_is_refused_in_bounded_memory(tmp_path):
    import subprocess
    import sys
    import textwrap

    bomb = tmp_path / "bomb.tif"
    _tiff_bomb(bomb)
    assert bomb.stat().st_size < 400
    with pytest.raises(io.PssrIOError, match=r"bomb\.tif.*100000 x 100000 pixels.*10\.0 GB.*283 bytes"):
        io.read_image(bomb)
    # In a process that may not take more than 3 GB: refused before any allocation (it took 17 GB).
    code = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        from pssr.io import formats as io
        try:
            io.read_image({str(bomb)!r})
        except io.PssrIOError as e:
            # VmHWM: this process image's peak (ru_maxrss would carry the forking pytest's)
            hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
            print("refused", int(hwm.split()[1]) // 1000)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(io.__file__).parents[2])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.startswith("refused"), r.stderr[-2000:]
    assert int(r.stdout.split()[1]) < 400  # MB


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_tiff_with_its_data_cut_off_is_refused(tmp_path, compression):
    p = tmp_path / "cut.tif"
    tifffile.imwrite(p, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), compression=compression)
    data = p.read_bytes()
    with tifffile.TiffFile(p) as t:
        end = max(o + c for o, c in zip(t.pages[0].dataoffsets, t.pages[0].databytecounts, strict=True))
    p.write_bytes(data[: end - 100] + data[end:] if end < len(data) else data[: end - 100])
    with pytest.raises(io.PssrIOError, match=r"cut\.tif.*declares 64 x 64 pixels"):
        io.read_image(p)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_large_tiff_is_read_lazily_region_by_region(tmp_path, monkeypatch, compression):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    a = np.random.default_rng(1).integers(0, 60000, (3, 2, 40, 56), dtype=np.uint16)
    p = io.write_tiff(tmp_path / "big.tif", a, axes="TZYX")
    if compression is None:  # pssr writes zlib: rewrite it uncompressed and contiguous
        tifffile.imwrite(p, a, imagej=True, metadata={"axes": "TZYX"})
    monkeypatch.setattr(io, "TIFF_LAZY_BYTES", 1000)
    img = io.read_image(p)
    assert not isinstance(img.data, np.ndarray) and img.axes == "TZYX" and img.shape == a.shape
    np.testing.assert_array_equal(np.asarray(img.data[...]), a)

    @settings(max_examples=30, deadline=None)
    @given(
        t=st.integers(0, 2),
        sl=st.lists(
            st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(1, 3)), min_size=2, max_size=2
        ),
    )
    def check(t, sl):
        idx = (t, slice(None), *(slice(a0, b0, s) for a0, b0, s in sl))
        np.testing.assert_array_equal(img.data[idx], a[idx])

    check()
