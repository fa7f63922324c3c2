"""evaluate_model: the library call behind ``pssr evaluate``."""

import numpy as np
import pytest

import pssr
from pssr.errors import PssrError
from pssr.nn.model import ModelConfig, build_model
from pssr.nn.modelfile import save_model
from pssr.quality.evaluate import evaluate_model


def test_scores_against_baselines_on_real_em(model_path, isbi):
    hr = isbi[0, :128, :128]
    scores, lr, pred = evaluate_model(hr, model_path, seed=1)
    assert lr.shape == (64, 64) and pred.shape == (128, 128)
    assert {"model", "bilinear", "bicubic"} <= set(scores)
    assert all(np.isfinite(scores[k]["psnr"]) for k in ("model", "bilinear"))
    # Seeded: the same degradation twice, another with another seed.
    _, lr2, _ = evaluate_model(hr, model_path, seed=1)
    _, lr3, _ = evaluate_model(hr, model_path, seed=2)
    np.testing.assert_array_equal(lr, lr2)
    assert not np.array_equal(lr, lr3)
    assert pssr.evaluate_model is evaluate_model


def test_a_model_without_degradation_needs_lr_or_preset(tmp_path, isbi):
    cfg = ModelConfig(scale=2, size="small", widths=(8, 16), blocks=1)
    p = save_model(tmp_path / "paired.safetensors", build_model(cfg), cfg, {"crappifier": None})
    with pytest.raises(PssrError, match="records no degradation.*--lr.*--preset"):
        evaluate_model(isbi[0, :64, :64], p)
    scores, _, _ = evaluate_model(isbi[0, :64, :64], p, preset="pssr-em")
    assert "model" in scores


def test_mismatched_or_constant_ground_truth_is_refused_and_a_dim_image_warned(tmp_path, caplog):
    from pssr.quality.evaluate import evaluate_model
    from pssr.quality.metrics import crop_to_scale, psnr

    hr = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="larger than scale 4"):
        crop_to_scale(hr, (8, 8), 4)  # 64 px of HR for 8 LR px: another field
    assert crop_to_scale(hr[:35, :35], (8, 8), 4).shape == (32, 32)  # a remainder below the scale is cut
    with pytest.raises(ValueError, match="plane 1 has the value 7 in more than 99.8 %"):
        psnr(np.random.default_rng(0).random((2, 16, 16)), np.stack([np.eye(16), np.full((16, 16), 7.0)]))
    dim = (np.random.default_rng(0).random((64, 64)) * 3000).astype(np.uint16)
    evaluate_model(dim, "em")
    assert "reaches only" in caplog.text and "full_scale" in caplog.text
    caplog.clear()
    evaluate_model(dim, "em", params={"full_scale": 3000})  # the model's degradation at the given intensity
    assert "reaches only" not in caplog.text


def test_real_lr_with_a_simulated_degradation_is_refused():
    hr = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    with pytest.raises(PssrError, match="give one or the other"):
        evaluate_model(hr, "em", lr=hr[::4, ::4], params={"full_scale": 255})


def test_evaluate_cli_values_on_the_bundled_sample(capsys):
    """Pinned: the baselines on the bundled ISBI pair (a metric or pipeline change moves them)."""
    import json
    from pathlib import Path

    from pssr.cli.app import main

    root = Path(__file__).resolve().parents[2] / "pssr" / "data"
    argv = ["-q", "evaluate", str(root / "isbi_em_hr.tif"), "--lr", str(root / "isbi_em_lr.tif"), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bilinear"]["psnr"] == pytest.approx(17.3992, abs=1e-3)
    assert res["bicubic"]["psnr"] == pytest.approx(17.1490, abs=1e-3)
    assert res["bilinear"]["ssim"] == pytest.approx(0.40386, abs=1e-4)
    assert res["model"]["psnr"] == pytest.approx(17.82, abs=0.05)  # the built-in em (float32 CPU)
