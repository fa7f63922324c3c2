"""The plugin's OME-Zarr reader: a restored output opened through napari overlays its input.

Needs a display for the viewer tests: run under ``xvfb-run -a``.
"""

import numpy as np
import pytest
import tifffile

napari = pytest.importorskip("napari", reason="the [napari] extra is not installed")

from napari_pssr._reader import get_reader, ome_zarr_layer_data  # noqa: E402

pytestmark = pytest.mark.napari

LR_SAMPLE = "pssr/data/isbi_em_lr.tif"


@pytest.fixture
def lr_zarr(tmp_path):
    """A tiny calibrated LR stack (16 nm pixels, 50 nm sections) as OME-Zarr."""
    from pathlib import Path

    from pssr.io import formats as io

    lr = tifffile.imread(Path(__file__).resolve().parents[2] / LR_SAMPLE)[:2, :40, :48]
    path = tmp_path / "lr.ome.zarr"
    io.write_image(
        path, lr, axes="ZYX", scale={"Z": 0.05, "Y": 0.016, "X": 0.016}, unit="micrometer", overwrite=True
    )
    return path


def test_reader_claims_ome_zarr_only(tmp_path, lr_zarr):
    import zarr

    assert get_reader(str(lr_zarr)) is ome_zarr_layer_data
    assert get_reader([str(lr_zarr)]) is ome_zarr_layer_data
    plain = tmp_path / "plain.zarr"
    zarr.create_array(str(plain), shape=(4, 4), dtype="f4")
    assert get_reader(str(plain)) is None  # a bare array: napari's built-in reader's job
    assert get_reader(str(tmp_path / "missing.zarr")) is None
    assert get_reader([str(lr_zarr), str(lr_zarr)]) is None


def test_layer_data_composes_scale_and_translation(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "t.ome.zarr"), mode="w")
    g.create_array("0", shape=(3, 8, 8), dtype="u2")
    g.create_array("1", shape=(3, 4, 4), dtype="u2")
    ct = [
        {"type": "scale", "scale": [2.0, 0.5, 0.5]},
        {"type": "translation", "translation": [1.0, -0.25, 3]},
    ]
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "name": "t",
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": [
                    {"path": "0", "coordinateTransformations": ct},
                    {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 1.0, 1.0]}]},
                ],
                # applied after the level's own: world = 10 * (0.5 * i - 0.25) + 1
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, 10.0, 10.0]},
                    {"type": "translation", "translation": [0.0, 1.0, 1.0]},
                ],
            }
        ],
    }
    [(data, kw, kind)] = ome_zarr_layer_data(tmp_path / "t.ome.zarr")
    assert kind == "image" and kw["multiscale"] and [d.shape for d in data] == [(3, 8, 8), (3, 4, 4)]
    assert kw["channel_axis"] == 0
    np.testing.assert_allclose(kw["scale"], [5.0, 5.0])
    np.testing.assert_allclose(kw["translate"], [-1.5, 31.0])
    assert kw["axis_labels"] == ("y", "x")


def test_unsupported_transformation_is_named(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "a.ome.zarr"), mode="w")
    g.create_array("0", shape=(4, 4), dtype="f4")
    g.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": ["y", "x"],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "affine", "affine": []}]}],
        }
    ]
    with pytest.raises(ValueError, match="'affine' is not supported"):
        ome_zarr_layer_data(tmp_path / "a.ome.zarr")


def test_restored_output_opens_like_the_restore_widget(make_napari_viewer, qtbot, tmp_path, lr_zarr):
    from napari.plugins import _npe2

    import pssr
    from napari_pssr._widgets import RestoreWidget

    out = tmp_path / "x.ome.zarr"
    pssr.restore(str(lr_zarr), model="em", output=out, progress=False)

    viewer = make_napari_viewer()
    assert "pssr-toolkit" in _npe2.get_readers(str(out))  # offered in napari's reader choice
    [lr_layer] = viewer.open(str(lr_zarr), plugin="pssr-toolkit")
    np.testing.assert_allclose(lr_layer.scale, [0.05, 0.016, 0.016])
    w = RestoreWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model.value = "em"
    w.layer.value = lr_layer
    n = len(viewer.layers)
    w.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: len(viewer.layers) > n, timeout=120000)
    widget_out = viewer.layers[f"{lr_layer.name} restored (4x)"]

    [opened] = viewer.open(str(out), plugin="pssr-toolkit")
    import zarr

    from pssr.io.formats import ome_zarr_metadata

    ms = ome_zarr_metadata(zarr.open_group(str(out), mode="r"))
    assert opened.multiscale and len(opened.data) == len(ms["datasets"]) >= 2
    assert opened.data[0].shape == widget_out.data.shape == (2, 160, 192)
    for level, (a, b) in enumerate(zip(opened.data[:-1], opened.data[1:])):
        assert b.shape[-2:] == (a.shape[-2] // 2, a.shape[-1] // 2), level
    np.testing.assert_allclose(opened.scale, widget_out.scale)
    np.testing.assert_allclose(opened.translate, widget_out.translate, atol=1e-12)
    np.testing.assert_allclose(opened.scale, [0.05, 0.004, 0.004])
    np.testing.assert_allclose(opened.translate, [0.0, -0.006, -0.006], atol=1e-12)
    # the same restoration: the widget's layer and the file hold the same pixels
    np.testing.assert_allclose(np.asarray(opened.data[0]), np.asarray(widget_out.data), rtol=1e-6, atol=1e-6)
    # and it overlays the input: the world position of LR pixel (0, 0) centre is HR (1.5, 1.5)
    np.testing.assert_allclose(opened.data_to_world((0, 1.5, 1.5)), lr_layer.data_to_world((0, 0, 0)))


@pytest.mark.parametrize(
    ("dataset", "match"),
    [
        (
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.0, 1.0]}]},
            "pixel size of 0.0",
        ),
        (
            {
                "path": "0",
                "coordinateTransformations": [{"type": "translation", "translation": [float("nan"), 0]}],
            },
            "nan",
        ),
        ({"path": "missing", "coordinateTransformations": []}, "does not contain"),
    ],
)
def test_bad_metadata_is_a_clear_error_naming_the_file(tmp_path, dataset, match):
    import zarr

    g = zarr.open_group(str(tmp_path / "b.ome.zarr"), mode="w")
    g.create_array("0", shape=(4, 4), dtype="f4")
    g.attrs["multiscales"] = [{"version": "0.4", "axes": ["y", "x"], "datasets": [dataset]}]
    with pytest.raises(ValueError, match=match) as e:
        ome_zarr_layer_data(tmp_path / "b.ome.zarr")
    assert "b.ome.zarr" in str(e.value)
