from pathlib import Path

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


# --- pinned values (issue 26 item 6): a wrong normalisation or fit moves these, silently otherwise
def _independent_psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """The paper's PSNR written out from its definition, separately from pssr.quality.metrics."""
    lo, hi = np.percentile(gt, [0.1, 99.9])
    gn = (gt - lo) / (hi - lo)
    a_mat = np.stack([pred.ravel(), np.ones(pred.size)], axis=1)
    coef, *_ = np.linalg.lstsq(a_mat, gn.ravel(), rcond=None)
    mse = np.mean((a_mat @ coef - gn.ravel()) ** 2)
    return float(10 * np.log10(1.0 / mse))


def test_golden_psnr_on_an_image_with_an_offset():
    """Ground truth far from 0..1 (offset 1000, range +-100) and a prediction with gain, offset, error."""
    from pssr.quality.metrics import psnr

    y, x = np.mgrid[0:64, 0:64]
    gt = 1000.0 + 100.0 * np.sin(x / 5.0) * np.cos(y / 7.0)
    pred = 3.0 * gt + 17 + 40.0 * np.cos(x * 1.3 + y * 0.7)
    assert psnr(pred, gt) == pytest.approx(_independent_psnr(pred, gt), abs=1e-9)
    assert psnr(pred, gt) == pytest.approx(26.6658, abs=1e-3)  # golden


def test_golden_bilinear_psnr_of_the_bundled_sample():
    """The published baseline: bilinear on the bundled ISBI pair is 17.399 dB (moves every README figure)."""
    import tifffile

    from pssr.quality.metrics import bilinear, psnr

    root = Path(__file__).resolve().parents[2] / "pssr" / "data"
    hr = tifffile.imread(root / "isbi_em_hr.tif")
    lr = tifffile.imread(root / "isbi_em_lr.tif").astype(np.float32)
    assert psnr(bilinear(lr, 4), hr) == pytest.approx(17.3992, abs=1e-3)
