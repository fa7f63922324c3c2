"""Vendor formats (ND2, CZI, LIF) through the bioio readers of the ``vendor`` extra (issue 25, item 7).

The CZI files are real: written here by Zeiss's own library (pylibCZIrw, which bioio-czi
depends on) with a pixel size, and read back through bioio-czi, ``read_image``, ``pssr predict``
and ``pssr.restore``.  No ND2 or LIF file with a licence ships on the package registries and
neither format has a writer there, so those two are tested only for their clear refusals (a file
that is not ND2/LIF, the extra missing); docs/formats.md says so.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import numpy as np
import pytest
import tifffile

from pssr.blockwise.predict import restore
from pssr.cli.app import main
from pssr.errors import PssrIOError
from pssr.io import formats as io

bioio_czi = pytest.importorskip(
    "bioio_czi", reason="the vendor extra (pssr-toolkit[vendor]) is not installed"
)
pyczi = pytest.importorskip("pylibCZIrw.czi")

TZYX = np.random.default_rng(0).integers(0, 4000, (3, 2, 24, 32), dtype=np.uint16)


def _write_czi(path, data, *, scale_xy=0.1, scale_z=0.5):
    """``data`` (T, Z, Y, X) as a real CZI with its pixel size in micrometres (CZI stores metres)."""
    with pyczi.create_czi(str(path), exist_ok=True) as f:
        for t in range(data.shape[0]):
            for z in range(data.shape[1]):
                f.write(data[t, z][..., None], plane={"T": t, "Z": z, "C": 0})
        f.write_metadata(
            document_name="pssr test", channel_names={0: "GFP"},
            scale_x=scale_xy * 1e-6, scale_y=scale_xy * 1e-6, scale_z=scale_z * 1e-6,
        )  # fmt: skip
    return path


def test_czi_reads_with_its_axes_pixel_size_and_pixels(tmp_path):
    img = io.read_image(_write_czi(tmp_path / "cells.czi", TZYX))
    assert img.axes == "TZYX" and not img.axes_guessed
    assert img.scale == pytest.approx({"Z": 0.5, "Y": 0.1, "X": 0.1}) and img.unit == "micrometer"
    assert isinstance(img.data, np.ndarray) and img.data.dtype == np.uint16
    np.testing.assert_array_equal(img.data, TZYX)


def test_a_single_plane_czi_reads_as_yx(tmp_path):
    # pylibCZIrw writes a Z pixel size of 0 when none is given (bioio reports it): "not calibrated",
    # as an OME-TIFF without PhysicalSizeZ, not a bad pixel size (was refused)
    img = io.read_image(_write_czi(tmp_path / "plane.czi", TZYX[:1, :1], scale_z=0.0))
    assert img.axes == "YX" and img.scale == pytest.approx({"Y": 0.1, "X": 0.1})
    np.testing.assert_array_equal(img.data, TZYX[0, 0])
    stack = io.read_image(_write_czi(tmp_path / "stack.czi", TZYX[:1], scale_z=0.0))
    assert stack.axes == "ZYX" and stack.scale == pytest.approx({"Y": 0.1, "X": 0.1})


def test_a_large_czi_is_read_lazily_region_by_region(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "TIFF_LAZY_BYTES", 100)
    img = io.read_image(_write_czi(tmp_path / "big.czi", TZYX))
    assert isinstance(img.data, io.VendorRegions)
    np.testing.assert_array_equal(img.data[1, :, 3:9, 5], TZYX[1, :, 3:9, 5])
    np.testing.assert_array_equal(np.asarray(img.data), TZYX)


def test_the_frame_interval_is_carried_in_seconds(tmp_path, monkeypatch):
    # pylibCZIrw cannot write acquisition times; bioio-czi reads them from the subblocks.  The
    # interval bioio reports is what pssr must carry, as an OME-TIFF's TimeIncrement.
    monkeypatch.setattr(
        bioio_czi.Reader, "time_interval", property(lambda self: timedelta(milliseconds=1500))
    )
    img = io.read_image(_write_czi(tmp_path / "movie.czi", TZYX))
    assert img.scale["T"] == pytest.approx(1.5) and img.time_unit == "second"
    one = io.read_image(_write_czi(tmp_path / "one.czi", TZYX[:1]))  # no T axis: no interval
    assert "T" not in one.scale and one.time_unit is None


def test_predict_a_czi_keeps_its_calibration(tmp_path, model_path):
    src = _write_czi(tmp_path / "cells.czi", TZYX[:1])  # ZYX, 2 planes
    out = tmp_path / "out.ome.tif"
    assert main(["-q", "predict", str(src), str(out), "--model", str(model_path)]) == 0
    res = io.read_image(out)
    assert res.axes == "ZYX" and res.shape == (2, 48, 64)
    assert res.scale == pytest.approx({"Z": 0.5, "Y": 0.05, "X": 0.05}) and res.unit == "micrometer"
    api = restore(str(src), model=model_path, progress=False)  # pssr.restore reads it the same way
    assert api.axes == "ZYX" and api.scale == pytest.approx(res.scale) and api.unit == "micrometer"
    np.testing.assert_allclose(api.output, tifffile.imread(out), atol=1e-6)


@pytest.mark.parametrize("ext", [".nd2", ".czi", ".lif"])
def test_a_file_that_is_not_that_format_is_named(tmp_path, ext, capsys, model_path):
    pytest.importorskip(io.VENDOR_EXT[ext][1])
    bad = tmp_path / f"garbage{ext}"
    bad.write_bytes(b"not a microscope file" * 50)
    with pytest.raises(PssrIOError, match=rf"garbage\{ext}.*damaged or not a {io.VENDOR_EXT[ext][0]} file"):
        io.read_image(bad)
    assert main(["-q", "predict", str(bad), str(tmp_path / "o.tif"), "--model", str(model_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged or not" in err, err


@pytest.mark.parametrize("ext", [".nd2", ".czi", ".lif"])
def test_without_the_extra_the_message_names_it(tmp_path, ext, monkeypatch):
    module = io.VENDOR_EXT[ext][1]
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    f = tmp_path / f"cells{ext}"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(PssrIOError, match=r"pip install 'pssr-toolkit\[vendor\]'") as e:
        io.read_image(f)
    assert module.replace("_", "-") in str(e.value)


def test_a_missing_dependency_of_the_reader_is_named(tmp_path, monkeypatch):
    # Found by the adversarial probe: with aicspylibczi missing, the message said bioio-czi was not
    # installed (it was); the missing dependency is named now.
    for name in [m for m in sys.modules if m == "bioio_czi" or m.startswith("bioio_czi.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "aicspylibczi", None)
    f = tmp_path / "cells.czi"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(PssrIOError, match=r"'bioio-czi', whose dependency 'aicspylibczi' is not installed"):
        io.read_image(f)
