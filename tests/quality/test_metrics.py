import numpy as np
import pytest

from pssr.degrade.crappify import crappify
from pssr.quality import metrics as m


def test_affine_invariance_and_perfect_score():
    gt = np.random.default_rng(0).random((64, 64))
    assert m.psnr(gt, gt) > 200
    assert m.ssim(3 * gt + 10, gt) == pytest.approx(1.0)
    assert m.nrmse(-2 * gt + 1, gt) == pytest.approx(0.0, abs=1e-9)


def test_known_psnr_value():
    gt = np.zeros((100, 100))
    gt[:, 50:] = 1.0  # percentiles map exactly to 0..1
    noise = np.random.default_rng(0).choice([-0.1, 0.1], size=gt.shape)
    # The LS fit scales the prediction by var(gt)/(var(gt)+var(noise)) = 0.25/0.26, which
    # leaves a residual variance of 0.25*0.01/0.26: PSNR = 10*log10(104) = 20.17 dB.
    assert m.psnr(gt + noise, gt) == pytest.approx(10 * np.log10(104), abs=0.05)


def test_3d_is_mean_of_slices():
    rng = np.random.default_rng(1)
    gt = rng.random((3, 32, 32))
    pred = gt + rng.normal(0, 0.1, gt.shape)
    assert m.psnr(pred, gt) == pytest.approx(np.mean([m.psnr(p, g) for p, g in zip(pred, gt)]))
    assert m.ssim(pred, gt) == pytest.approx(np.mean([m.ssim(p, g) for p, g in zip(pred, gt)]))


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differs from ground truth shape"):
        m.psnr(np.zeros((4, 4)), np.zeros((4, 5)))


def test_upsample_geometry_and_baselines(isbi):
    assert m.bilinear(np.zeros((2, 5, 6)), 4).shape == (2, 20, 24)
    hr = isbi[0]
    lr = crappify(hr, "pssr-em", rng=0)
    res = m.evaluate_pair(hr, lr, 4)
    assert set(res) == {"bilinear", "bicubic"}
    assert 0 < res["bilinear"]["ssim"] < 1
    # A ramp is reproduced exactly away from the borders by bilinear upsampling
    ramp = np.tile(np.arange(64, dtype=np.float32), (64, 1))
    lr = ramp[:, 1::4][::4] * 0 + (np.arange(16) * 4 + 1.5)[None, :]
    up = m.bilinear(lr, 4)
    np.testing.assert_allclose(up[:, 4:-4], ramp[:, 4:-4], atol=1e-4)
