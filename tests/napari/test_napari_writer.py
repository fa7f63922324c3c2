"""The plugin's writer and bioimage.io packages in the widgets.

The writer is reached as napari reaches it (``napari.save_layers(..., plugin="pssr-toolkit")``, the
npe2 manifest's writer contribution), and the files are read back by pssr and by the plugin's
reader.  The widget tests need a display: run under ``xvfb-run -a``.
"""

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the [napari] extra is not installed")

from pssr.errors import WidgetInputError  # noqa: E402
from pssr.io.formats import read_image  # noqa: E402

pytestmark = pytest.mark.napari

SCALE = (0.05, 0.016, 0.016)
TRANSLATE = (1.0, 2.5, -3.25)


@pytest.fixture(autouse=True)
def _plugins_discovered():
    # napari discovers plugins when a viewer starts; napari.save_layers without one needs npe2 to
    from npe2 import PluginManager

    PluginManager.instance().discover(include_npe1=False)


def _layer(data, **kw):
    from napari.layers import Image

    return Image(data, name="cells", **kw)


@pytest.mark.parametrize("name", ["cells.ome.zarr", "cells.tif"])
def test_writer_keeps_data_scale_and_translation(tmp_path, name):
    data = np.random.default_rng(0).integers(0, 4000, (3, 20, 24), dtype=np.uint16)
    layer = _layer(data, scale=SCALE, translate=TRANSLATE, units="micrometer")
    path = tmp_path / name
    written = napari.save_layers(str(path), [layer], plugin="pssr-toolkit")
    assert [str(p) for p in written] == [str(path)]
    img = read_image(path, lazy=False)
    assert img.axes == "ZYX" and img.unit == "micrometer" and img.data.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(img.data), data)
    np.testing.assert_allclose([img.scale[a] for a in "ZYX"], SCALE)
    if name.endswith(".zarr"):
        np.testing.assert_allclose([img.origin[a] for a in "ZYX"], TRANSLATE)
        # and opened back in napari (the plugin's reader), the layer is where it was
        from napari_pssr._reader import get_reader

        (back, kw, _kind), *_ = get_reader(str(path))(str(path))
        np.testing.assert_allclose(kw["scale"], SCALE)
        np.testing.assert_allclose(kw["translate"], TRANSLATE)
        np.testing.assert_array_equal(np.asarray(back[0] if isinstance(back, list) else back), data)
    else:  # ImageJ TIFF: calibration and the Y/X origin (ImageJ has a zorigin too)
        np.testing.assert_allclose([img.origin[a] for a in "YX"], TRANSLATE[1:])


def test_writer_uses_axis_labels_and_uncalibrated_layers_stay_uncalibrated(tmp_path):
    data = np.zeros((2, 16, 16), np.float32)
    layer = _layer(data, axis_labels=("t", "y", "x"))
    napari.save_layers(str(tmp_path / "t.ome.zarr"), [layer], plugin="pssr-toolkit")
    img = read_image(tmp_path / "t.ome.zarr")
    assert img.axes == "TYX" and img.unit is None and img.origin == {}


def test_writer_refuses_to_replace_a_file_and_rgb_layers(tmp_path):
    from napari_pssr._writer import write_image_layer

    path = tmp_path / "keep.tif"
    path.write_bytes(b"precious")
    layer = _layer(np.zeros((16, 16), np.uint8))
    data, attrs, _ = layer.as_layer_data_tuple()
    with pytest.raises(Exception, match="exists"):
        write_image_layer(str(path), data, attrs)
    assert path.read_bytes() == b"precious"
    rgb = _layer(np.zeros((16, 16, 3), np.uint8), rgb=True)
    data, attrs, _ = rgb.as_layer_data_tuple()
    with pytest.raises(WidgetInputError, match="RGB"):
        write_image_layer(str(tmp_path / "rgb.tif"), data, attrs)
    assert not (tmp_path / "rgb.tif").exists()


@pytest.fixture(scope="module")
def small_package(tmp_path_factory):
    """A tiny network exported as a bioimage.io package (the .zip `pssr export` writes)."""
    pytest.importorskip("bioimageio.spec")
    import torch

    from pssr.degrade.crappify import get_preset
    from pssr.nn.export import export_bioimageio
    from pssr.nn.model import ModelConfig, build_model
    from pssr.nn.modelfile import save_model

    d = tmp_path_factory.mktemp("pkg")
    torch.manual_seed(0)
    cfg = ModelConfig(scale=4, size="small", widths=(8, 16), blocks=1)
    model = save_model(
        d / "m.safetensors", build_model(cfg), cfg, {"crappifier": get_preset("pssr-em", 4).to_dict()}
    )
    return export_bioimageio(model, d / "m.zip"), model


def test_restore_widget_takes_a_package(make_napari_viewer, qtbot, small_package):
    from napari_pssr._widgets import FROM_FILE, MODEL_FILTER, RestoreWidget
    from pssr.blockwise.predict import restore

    pkg, model = small_package
    assert "*.zip" in MODEL_FILTER and "*.safetensors" in MODEL_FILTER
    viewer = make_napari_viewer()
    lr = np.random.default_rng(1).integers(0, 255, (24, 24), dtype=np.uint8)
    layer = viewer.add_image(lr, name="lr")
    w = RestoreWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model.value = FROM_FILE
    w.model_file.value = str(pkg)
    w.layer.value = layer
    n = len(viewer.layers)
    w.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: len(viewer.layers) > n or "error" in w.status.value, timeout=60000)
    assert "done" in w.status.value, w.status.value
    out = viewer.layers[f"{layer.name} restored (4x)"]
    # the package restores exactly as the model file it was exported from
    expected = restore(lr, model=str(model), progress=False, device="cpu").output
    np.testing.assert_array_equal(np.asarray(out.data), expected)


def test_train_widget_starts_from_a_package(make_napari_viewer, qtbot, small_package, tmp_path):
    import hashlib

    import napari_pssr._widgets as W
    from pssr.nn.modelfile import load_model, read_metadata

    pkg, model = small_package
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.random.default_rng(2).random((2, 96, 96), dtype=np.float32), name="hr")
    w = W.TrainWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.start.value = W.START_FILE
    w.start_file.value = str(pkg)
    assert (w.scale.value, w.frames.value, w.size.value) == (4, 1, "small") and not w.size.enabled
    w.layers.value = [layer]
    w.minutes.value = 0.05  # the smallest the widget takes: 3 s
    w.patch.value = 8
    out = tmp_path / "ft.safetensors"
    w.out.value = str(out)
    w.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: "saved" in w.status.value or "error" in w.status.value, timeout=120000)
    assert "saved" in w.status.value, w.status.value
    tr = read_metadata(out)["training"]
    assert tr["init_sha256"] == hashlib.sha256(pkg.read_bytes()).hexdigest()
    assert load_model(out).config == load_model(model).config
