"""The fidelity map: a faithful restoration gives noise, invented structure is flagged."""

import numpy as np
import pytest
import torch

from pssr.blockwise.predict import PredictError, restore
from pssr.degrade.crappify import get_preset
from pssr.nn.model import ModelConfig, build_model
from pssr.nn.modelfile import save_model


def test_fidelity_flags_inserted_structure(model_path, isbi, tmp_path):
    hr = isbi[0, :256, :256]
    cfg = get_preset("pssr-em", 2)
    lr = cfg(hr, rng=0)
    r = restore(lr, model=model_path, fidelity=True, noise="model", dtype="float32", progress=False)
    assert r.fidelity.shape == lr.shape
    assert "fidelity" in r.summary
    # An LR input with structure the restoration cannot explain, e.g. a bright square
    # added to the input *after* restoring: the map flags exactly that region.
    from pssr.blockwise.predict import fidelity_map

    faithful = hr.astype(np.float32)  # the truth explains the measurement within noise
    z_ok = fidelity_map(faithful, lr, cfg, full_scale=255.0)
    fake = faithful.copy()
    fake[100:140, 100:140] += 80  # invented structure
    z_bad = fidelity_map(fake, lr, cfg, full_scale=255.0)
    assert np.mean(np.abs(z_ok) > 3) < 0.01
    assert np.mean(np.abs(z_bad[52:68, 52:68]) > 3) > 0.9
    assert np.mean(np.abs(z_bad[:40, :40]) > 3) < 0.01


def test_fidelity_needs_acquisition_model(tmp_path, em_lr):
    torch.manual_seed(0)
    cfg = ModelConfig(scale=2, size="small", widths=(8, 16), blocks=1)
    p = save_model(tmp_path / "paired.safetensors", build_model(cfg), cfg, {"crappifier": None})
    with pytest.raises(PredictError, match="fidelity needs the model's acquisition model"):
        restore(em_lr[0], model=p, fidelity=True, progress=False)
