"""napari's own reader and napari-ome-zarr open a restored output; how napari picks a reader.

Needs a display: run under ``xvfb-run -a``.
"""

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the [napari] extra is not installed")

from pssr.blockwise.predict import restore  # noqa: E402
from pssr.io import formats as io  # noqa: E402

pytestmark = pytest.mark.napari


@pytest.fixture(scope="module")
def restored(model_path, isbi, tmp_path_factory):
    x = io.Image(
        isbi[0, :80, :96], "YX", scale={"Y": 0.016, "X": 0.016}, unit="micrometer", origin={"Y": 3.0}
    )
    out = tmp_path_factory.mktemp("r") / "r.ome.zarr"
    restore(
        x,
        model=model_path,
        output=out,
        tile=32,
        fidelity=True,
        noise="model",
        backend="torch",
        progress=False,
    )
    return out, [0.008, 0.008], [3.0 - 0.004, -0.004]


def test_napari_builtin_reader_opens_the_pyramid(make_napari_viewer, restored):
    out, _, _ = restored
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(out))  # napari's default: plugin="napari", its built-in reader
    assert layer.multiscale and [d.shape for d in layer.data] == [(160, 192), (80, 96)]
    np.testing.assert_array_equal(np.asarray(layer.data[0]), io.read_image(out).data[...])
    # The built-in reader reads no OME metadata (napari's design): scale 1, no offset.
    np.testing.assert_allclose(layer.scale, [1, 1])


def test_pssr_reader_by_name_and_by_preference(make_napari_viewer, restored):
    from napari.settings import get_settings

    out, scale, translate = restored
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(out), plugin="pssr-toolkit")
    np.testing.assert_allclose(layer.scale, scale)
    np.testing.assert_allclose(layer.translate, translate)
    # napari offers every reader that accepts folders; a preference picks one without asking.
    prefs = get_settings().plugins
    before = dict(prefs.extension2reader)
    try:
        prefs.extension2reader = {
            **before,
            "*.zarr/": "pssr-toolkit",
        }  # napari matches folders with a trailing slash
        [layer] = viewer.open(str(out), plugin=None)
        np.testing.assert_allclose(layer.translate, translate)
    finally:
        prefs.extension2reader = before


def test_napari_ome_zarr(make_napari_viewer, restored):
    pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr (the dev extra) is not installed")
    out, scale, translate = restored
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(out), plugin="napari-ome-zarr")
    assert [d.shape for d in layer.data] == [(160, 192), (80, 96)]
    np.testing.assert_allclose(layer.scale, scale)
    # napari-ome-zarr 0.10 drops OME-Zarr translations (theirs: the metadata is right, as
    # ome-zarr-py and ome-zarr-models read it); pssr's reader keeps them.
    assert np.allclose(layer.translate, translate) or np.allclose(layer.translate, 0)
