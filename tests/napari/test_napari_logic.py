"""The plugin's pure functions, without a viewer (napari itself is not imported)."""

import numpy as np
import pytest

from napari_pssr import _logic


class FakeLayer:
    def __init__(self, data, rgb=False, scale=None, translate=None, name="x"):
        self.data, self.rgb, self.multiscale, self.name = data, rgb, False, name
        self.scale = scale or (1.0,) * data.ndim
        self.translate = translate or (0.0,) * data.ndim


def test_infer_axes():
    assert _logic.infer_axes(2) == "YX"
    assert _logic.infer_axes(3) == "ZYX"
    assert _logic.infer_axes(3, frames=5) == "TYX"
    assert _logic.infer_axes(3, "T") == "TYX"
    assert _logic.infer_axes(4) == "TZYX"
    with pytest.raises(_logic.WidgetInputError, match="5 dimensions"):
        _logic.infer_axes(5)


def test_layer_validation():
    with pytest.raises(_logic.WidgetInputError, match="RGB"):
        _logic.layer_input(FakeLayer(np.zeros((8, 8, 3)), rgb=True))
    with pytest.raises(_logic.WidgetInputError, match="choose an image layer"):
        _logic.layer_input(None)
    inp = _logic.layer_input(FakeLayer(np.zeros((3, 8, 8), np.uint8)))
    assert inp.axes == "ZYX"


def test_geometry_roundtrip_and_overlay():
    sc, tr = _logic.restored_geometry((0.05, 0.016, 0.016), (0, 0.006, 0.006), 4)
    assert sc == pytest.approx((0.05, 0.004, 0.004))
    assert tr == pytest.approx((0, 0, 0))  # the restored sample lands on the HR ground truth
    sc2, tr2 = _logic.crappified_geometry(sc, tr, 4)
    assert sc2 == pytest.approx((0.05, 0.016, 0.016)) and tr2 == pytest.approx((0, 0.006, 0.006))
    # An HR pixel centre and the LR pixel it falls in agree in world coordinates:
    # LR pixel 3 covers HR pixels 12..15, centred at 13.5.
    lr_world = tr2[-1] + 3 * sc2[-1]
    hr_world = tr[-1] + 13.5 * sc[-1]
    assert lr_world == pytest.approx(hr_world)


def test_run_crappify_and_restore(tmp_path, isbi):
    import torch

    from pssr.degrade.crappify import get_preset
    from pssr.nn.model import ModelConfig, build_model
    from pssr.nn.modelfile import load_model, save_model

    inp = _logic.layer_input(FakeLayer(isbi[:2, :64, :64], scale=(1, 1, 1)))
    lr, kw = _logic.run_crappify(inp, "em", 4, 0)
    assert lr.shape == (2, 16, 16) and kw["scale"][-1] == 4
    torch.manual_seed(0)
    cfg = ModelConfig(scale=4, size="small", widths=(8, 16), blocks=1)
    p = save_model(
        tmp_path / "m.safetensors", build_model(cfg), cfg, {"crappifier": get_preset("em", 4).to_dict()}
    )
    m = load_model(p)
    lin = _logic.layer_input(FakeLayer(lr, scale=kw["scale"], translate=kw["translate"]))
    res = _logic.run_restore(lin, m, fidelity=True)
    (out, okw, _), (fid, fkw, _) = res["layers"]
    assert out.shape == (2, 64, 64) and okw["scale"][-1] == pytest.approx(1)
    assert okw["translate"][-1] == pytest.approx(0)
    assert fid.shape == lr.shape
    # A lazy (dask) layer is restored block by block into a zarr store, and stays lazy.
    import dask.array as da

    lazy = _logic.layer_input(FakeLayer(da.from_array(lr, chunks=(1, 16, 16))))
    res = _logic.run_restore(lazy, m, workdir=str(tmp_path))
    out2 = res["layers"][0][0]
    assert not isinstance(out2, np.ndarray)
    np.testing.assert_allclose(np.asarray(out2[...]), out, atol=1e-4)


def test_manifest_in_package_and_wheel(tmp_path):
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from npe2 import PluginManifest

    root = Path(__file__).resolve().parents[2]
    m = PluginManifest.from_file(root / "napari_pssr" / "napari.yaml")
    assert m.name == "pssr-toolkit"  # npe2: must equal the distribution name
    top = root / "napari.yaml"
    assert top.resolve() == (root / "napari_pssr" / "napari.yaml").resolve()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(root),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    whl = next(tmp_path.glob("*.whl"))
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert "napari_pssr/napari.yaml" in names
        assert "pssr/data/isbi_em_lr.tif" in names
        ep = next(n for n in names if n.endswith("entry_points.txt"))
        assert "napari_pssr:napari.yaml" in z.read(ep).decode()
        (tmp_path / "napari.yaml").write_bytes(z.read("napari_pssr/napari.yaml"))
    assert PluginManifest.from_file(tmp_path / "napari.yaml").name == "pssr-toolkit"


def test_train_plan_from_scratch_and_from_a_start_model():
    import hashlib

    from pssr.nn.modelfile import builtin_models, load_model

    plan = _logic.train_plan(start=None, preset="pssr-em", scale=2, frames=3, size="small")
    assert (plan.model_config.scale, plan.model_config.in_channels, plan.model_config.size) == (2, 3, "small")
    assert plan.crappifier.kind == "pssr-em" and plan.init is None and plan.description == {}
    with pytest.raises(_logic.WidgetInputError, match="needs a start model"):
        _logic.train_plan(start=None, preset=_logic.AS_START, scale=4, frames=1, size="small")
    # Fine-tuning fluo-mf: the widget's scale / frames / size are ignored for the parent's.
    fm = load_model("fluo-mf")
    plan = _logic.train_plan(start="fluo-mf", preset=_logic.AS_START, scale=2, frames=1, size="large")
    assert plan.model_config == fm.config and plan.model_config.in_channels == 5
    assert plan.crappifier == fm.crappifier  # its degradation, noise jitter included
    assert plan.norm == fm.normalization
    assert plan.init == "fluo-mf"
    sha = hashlib.sha256(builtin_models()["fluo-mf"].read_bytes()).hexdigest()
    assert plan.description == {"init_sha256": sha}
    # Another preset with a start model: the preset at the parent's scale.
    plan = _logic.train_plan(start="em", preset="em", scale=2, frames=1, size="small")
    assert plan.crappifier.kind == "em" and plan.crappifier.scale == 4 and plan.model_config.size == "base"
    assert _logic.start_settings("fluo-mf") == {"scale": 4, "frames": 5, "size": "small"}


def test_train_plan_start_file_without_degradation(tmp_path):
    from pssr.nn.model import ModelConfig, build_model
    from pssr.nn.modelfile import save_model

    cfg = ModelConfig(scale=2, size="small", widths=(8, 16), blocks=1)
    p = save_model(tmp_path / "paired.safetensors", build_model(cfg), cfg, {"crappifier": None})
    with pytest.raises(_logic.WidgetInputError, match="records no degradation; choose a preset"):
        _logic.train_plan(start=str(p), preset=_logic.AS_START, scale=4, frames=1, size="base")
    plan = _logic.train_plan(start=str(p), preset="fluo", scale=4, frames=1, size="base")
    assert plan.model_config.widths == (8, 16) and plan.crappifier.scale == 2
    assert plan.init == str(p.resolve())


def test_device_choices_offer_auto_and_what_is_here(monkeypatch):
    import torch

    from napari_pssr import _logic
    from pssr.nn import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert _logic.device_choices() == ["auto", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _logic.device_choices() == ["auto", "cpu", "cuda:0", "cuda:1"]


def test_parent_check_note_says_what_a_fine_tune_kept(tmp_path):
    # The Train widget's status after a fine-tune: the same sentence as pssr train --init prints.
    from pssr.nn.model import ModelConfig, build_model
    from pssr.nn.modelfile import save_model

    cfg = ModelConfig(scale=2, size="small", widths=(4, 8), blocks=1)
    check = {"kept": "parent", "applied": True, "patches": 64, "held_out": True,
             "psnr_finetune": 18.0, "psnr_parent": 18.5}  # fmt: skip
    ft = save_model(tmp_path / "ft.safetensors", build_model(cfg), cfg,
                    {"training": {"init_from": "em", "parent_check": check}})  # fmt: skip
    note = _logic.parent_check_note(str(ft))
    assert note.startswith("kept the parent em (its weights are saved)") and "-0.50 dB" in note
    scratch = save_model(tmp_path / "s.safetensors", build_model(cfg), cfg, {"training": {"init_from": None}})
    assert _logic.parent_check_note(str(scratch)) is None
