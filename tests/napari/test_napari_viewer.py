"""The widgets in a real napari viewer (needs a display: run under xvfb-run)."""

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the [napari] extra is not installed")

pytestmark = pytest.mark.napari


@pytest.fixture
def small_model(tmp_path):
    import torch

    from pssr.degrade.crappify import get_preset
    from pssr.nn.model import ModelConfig, build_model
    from pssr.nn.modelfile import save_model

    torch.manual_seed(0)
    cfg = ModelConfig(scale=4, size="small", widths=(8, 16), blocks=1)
    return save_model(
        tmp_path / "m.safetensors", build_model(cfg), cfg, {"crappifier": get_preset("pssr-em", 4).to_dict()}
    )


def _restore_widget(viewer, model_path):
    from napari_pssr._widgets import FROM_FILE, RestoreWidget

    w = RestoreWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model.value = FROM_FILE
    w.model_file.value = str(model_path)
    return w


def test_sample_data_and_restore_end_to_end(make_napari_viewer, qtbot, small_model):
    viewer = make_napari_viewer()
    viewer.open_sample("pssr-toolkit", "em")
    lr_layer = viewer.layers["EM 16 nm (low-res)"]
    hr_layer = viewer.layers["EM 4 nm (ground truth)"]
    w = _restore_widget(viewer, small_model)
    w.layer.value = lr_layer
    w.fidelity.value = True
    n = len(viewer.layers)
    w.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: len(viewer.layers) >= n + 2, timeout=60000)
    out = viewer.layers[f"{lr_layer.name} restored (4x)"]
    assert out.data.shape == (4, 256, 256) == hr_layer.data.shape
    np.testing.assert_allclose(out.scale, hr_layer.scale)
    np.testing.assert_allclose(out.translate, hr_layer.translate, atol=1e-9)
    assert "done" in w.status.value
    assert w.device.value == "auto" and " on cpu" in w.status.value  # auto resolved and reported


def test_cancel_leaves_nothing(make_napari_viewer, qtbot, small_model):
    viewer = make_napari_viewer()
    data = np.random.default_rng(0).random((6, 200, 200)).astype(np.float32)
    layer = viewer.add_image(data, name="big")
    w = _restore_widget(viewer, small_model)
    w.layer.value = layer
    w.tile.value = 32
    w._cancel = True  # cancel arrives before the first block finishes
    orig_start = w._start

    def start_then_cancel():
        orig_start()
        w.cancel()

    start_then_cancel()
    qtbot.waitUntil(lambda: "cancel" in w.status.value and not w.cancel_btn.enabled, timeout=60000)
    assert [lyr.name for lyr in viewer.layers] == ["big"]
    assert w.run_btn.enabled


@pytest.mark.parametrize("bad", ["rgb", "5d"])
def test_bad_layers_show_error_not_raise(make_napari_viewer, qtbot, small_model, bad, monkeypatch):
    import napari_pssr._widgets as W

    shown = []
    monkeypatch.setattr(W, "show_error", lambda msg: shown.append(msg))
    viewer = make_napari_viewer()
    if bad == "rgb":
        layer = viewer.add_image(np.zeros((32, 32, 3), np.uint8), rgb=True, name="rgb")
    else:
        layer = viewer.add_image(np.zeros((2, 2, 2, 32, 32), np.float32), name="5d")
    w = _restore_widget(viewer, small_model)
    w.layer.value = layer
    w.run_btn.clicked.emit()  # must not raise into the event loop
    assert shown and ("RGB" in shown[0] or "5 dimensions" in shown[0])
    assert w.status.value.startswith("error")
    assert len(viewer.layers) == 1


def test_crappify_widget(make_napari_viewer, qtbot):
    from napari_pssr._widgets import CrappifyWidget

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.random.default_rng(0).random((64, 64)).astype(np.float32), name="hr")
    w = CrappifyWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.reset_choices()
    w.layer.value = layer
    w.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=30000)
    assert viewer.layers[1].data.shape == (16, 16)
    assert viewer.layers[1].scale[-1] == 4


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_train_widget_trains_saves_and_offers_model(make_napari_viewer, qtbot, tmp_path, isbi):
    from napari_pssr._widgets import SESSION_MODELS, RestoreWidget, TrainWidget

    viewer = make_napari_viewer()
    layer = viewer.add_image(isbi[:3, :128, :128], name="isbi")
    restore_w = RestoreWidget(viewer)
    w = TrainWidget(viewer)
    viewer.window.add_dock_widget(restore_w)
    viewer.window.add_dock_widget(w)
    w.reset_choices()
    w.layers.value = [layer]
    w.minutes.value = 0.1
    w.patch.value = 16
    w.out.value = str(tmp_path / "t.safetensors")
    w.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: "saved" in w.status.value, timeout=120000)
    assert "saved" in w.status.value
    assert any(v == str(tmp_path / "t.safetensors") for v in SESSION_MODELS.values())
    assert any(c.startswith("session:") for c in restore_w.model.choices)


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_train_widget_fine_tunes_from_a_builtin(make_napari_viewer, qtbot, tmp_path, data_dir, monkeypatch):
    import hashlib

    import tifffile

    import napari_pssr._widgets as W
    from pssr.nn.modelfile import builtin_models, load_model, read_metadata

    shown = []
    monkeypatch.setattr(W, "show_error", lambda msg: shown.append(msg))
    viewer = make_napari_viewer()
    vnc = tifffile.imread(data_dir / "em" / "drosophila_l3_vnc_sstem.tif")[:3, :128, :128]
    layer = viewer.add_image(vnc, name="vnc")
    w = W.TrainWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.reset_choices()
    assert w.start.value == W.START_NONE
    assert {"em", "fluo", "fluo-mf", W.START_FILE} <= set(w.start.choices)
    w.size.value = "small"
    w.start.value = "fluo-mf"  # the parent's architecture is shown and fixed
    assert (w.frames.value, w.size.value) == (5, "small") and not w.frames.enabled
    w.start.value = "em"
    assert (w.scale.value, w.frames.value, w.size.value) == (4, 1, "base")
    assert not w.size.enabled and w.preset.value == W._logic.AS_START
    w.layers.value = [layer]
    w.minutes.value = 0.05
    w.patch.value = 16
    out = tmp_path / "ft.safetensors"
    w.out.value = str(out)
    w.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: "saved" in w.status.value or "error" in w.status.value, timeout=120000)
    assert "saved" in w.status.value, (w.status.value, shown)
    tr = read_metadata(out)["training"]
    assert tr["init_from"] == "em"
    assert tr["init_sha256"] == hashlib.sha256(builtin_models()["em"].read_bytes()).hexdigest()
    # checked against em on held-out rows, as pssr train --init: the better one kept and said
    assert tr["parent_check"]["applied"] and tr["parent_check"]["kept"] in ("parent", "fine-tune")
    assert f"kept the {tr['parent_check']['kept']}" in w.status.value
    assert load_model(out).config == load_model("em").config
    assert f"session: {out.stem}" in w.start.choices  # can be the next start model
    # Back to scratch: the controls are free again and the preset leaves "as start model".
    w.start.value = W.START_NONE
    assert w.size.enabled and w.preset.value == "em"
    # A start file that is not a model: an error in the viewer, not raised into Qt.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    w.start.value = W.START_FILE
    assert not w.start_file.native.isHidden()  # (the viewer itself is not shown)
    assert w.size.enabled and not shown
    w.start_file.value = str(bad)
    assert shown and "bad.safetensors" in shown[-1] and w.size.enabled
