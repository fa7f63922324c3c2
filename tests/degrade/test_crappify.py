import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from pssr.degrade import crappify as cr
from pssr.quality.metrics import bilinear, psnr

DTYPES = [np.uint8, np.uint16, np.float32]


def _img(dtype, shape=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    if np.dtype(dtype).kind == "u":
        return (x * np.iinfo(dtype).max * 0.8).astype(dtype)
    return x.astype(dtype)


@pytest.mark.parametrize("preset", ["em", "fluo", "pssr-em", "pssr-fluo"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (3, 64, 64), (2, 3, 64, 64)], ids=["2d", "3d", "tzyx"])
@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_shape_dtype_contract(preset, dtype, shape, scale):
    img = _img(dtype, shape)
    lr = cr.crappify(img, preset, scale=scale, rng=1)
    assert lr.dtype == np.float32
    assert lr.shape == shape[:-2] + (shape[-2] // scale, shape[-1] // scale)
    assert np.all(np.isfinite(lr))
    # Same intensity units as the input: the mean is preserved within noise.
    assert abs(lr.mean() - img.astype(np.float64).mean()) < 0.1 * img.astype(np.float64).mean()


def test_non_multiple_shape_drops_trailing_pixels():
    lr = cr.crappify(_img(np.uint8, (67, 70)), "em", scale=4, rng=0)
    assert lr.shape == (16, 17)


@pytest.mark.parametrize("preset", ["em", "fluo", "pssr-em", "pssr-fluo"])
def test_seeded_reproducibility(preset):
    img = _img(np.uint16, (2, 64, 64))
    a = cr.crappify(img, preset, rng=7)
    b = cr.crappify(img, preset, rng=7)
    c = cr.crappify(img, preset, rng=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Generators are accepted and consumed, not reset.
    g = np.random.default_rng(3)
    assert not np.array_equal(cr.crappify(img, preset, rng=g), cr.crappify(img, preset, rng=g))


def test_independent_noise_per_frame():
    frames = np.repeat(_img(np.uint8, (64, 64))[None], 5, axis=0)
    lr = cr.crappify(frames, "em", rng=0)
    for i in range(1, 5):
        assert not np.array_equal(lr[0], lr[i])


def test_no_overflow_uint8_bright():
    img = np.full((64, 64), 250, np.uint8)
    lr = cr.crappify(img, "em", rng=0, dose=5.0)
    assert lr.max() > 255  # noise above full scale is kept, not wrapped or clipped
    assert lr.dtype == np.float32


def test_poisson_variance_matches_mean():
    img = np.full((512, 512), 0.5, np.float32)
    dose = 50.0
    lr = cr.em_point_scan(img, 2, dose=dose, read_sigma=0, probe_sigma=0, full_scale=1.0, rng=0)
    # var = mean * fs / dose in intensity units
    assert lr.var() == pytest.approx(0.5 / dose, rel=0.05)
    assert lr.mean() == pytest.approx(0.5, rel=0.01)


def test_gaussian_read_noise_std():
    img = np.full((512, 512), 0.5, np.float32)
    lr = cr.em_point_scan(img, 2, dose=float("inf"), read_sigma=0.03, probe_sigma=0, full_scale=1.0, rng=0)
    assert lr.std() == pytest.approx(0.03, rel=0.05)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_binning_divides_white_noise_std_point_sampling_does_not(scale):
    noise = np.random.default_rng(0).normal(size=(960, 960)).astype(np.float32)
    assert cr.bin_downsample(noise, scale).std() == pytest.approx(1 / scale, rel=0.05)
    ps = cr.point_sample(noise, scale)
    # A point probe picks one pixel (odd scale) or the bilinear value at the centre
    # between four pixels (even scale: std 1/2 whatever the scale).
    expected = 1.0 if scale % 2 else 0.5
    assert ps.std() == pytest.approx(expected, rel=0.05)


def test_geometry_centre_of_lr_pixel():
    # A linear ramp sampled at LR pixel centres gives i*s + (s-1)/2 for every mode.
    s = 4
    ramp = np.tile(np.arange(64, dtype=np.float32), (64, 1))
    want = np.arange(16) * s + (s - 1) / 2
    for mode in ("point", "bin", "linear"):
        np.testing.assert_allclose(cr.undersample(ramp, s, mode=mode)[0], want, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": 1}, "scale=1 is below 2"),
        ({"scale": 2.5}, "must be an integer"),
        ({"dose": -1}, "dose=-1 must be > 0"),
        ({"read_sigma": -0.1}, "read_sigma=-0.1 must be a finite number >= 0"),
        ({"probe_sigma": float("nan")}, "blur_sigma=nan"),
        ({"mode": "nearest"}, "mode='nearest' is not a known undersampling mode"),
    ],
)
def test_em_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cr.em_point_scan(np.zeros((32, 32), np.uint8), **kwargs)


def test_errors_image_and_preset():
    with pytest.raises(ValueError, match="smaller than the scale 4"):
        cr.crappify(np.zeros((3, 40), np.uint8), "em", scale=4)
    with pytest.raises(ValueError, match="at least 2"):
        cr.crappify(np.zeros(40, np.uint8), "em")
    with pytest.raises(ValueError, match="NaN or infinite"):
        cr.crappify(np.full((16, 16), np.nan, np.float32), "em")
    with pytest.raises(ValueError, match="preset='xx' is unknown"):
        cr.crappify(np.zeros((16, 16)), "xx")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['photons'\]"):
        cr.get_preset("em", photons=3)
    with pytest.raises(ValueError, match="salt_pepper=0.7"):
        cr.get_preset("fluo", salt_pepper=0.7)


def test_config_roundtrip_and_jitter():
    cfg = cr.CrappifierConfig("em", 4, {"dose": 30.0}, {"dose": (0.5, 2.0)})
    cfg2 = cr.CrappifierConfig.from_dict(cfg.to_dict())
    assert cfg2 == cfg
    img = np.full((256, 256), 0.5, np.float32)
    stds = {float(cfg(img, rng=i, full_scale=1.0).std()) for i in range(6)}
    assert max(stds) / min(stds) > 1.2  # the noise strength really varies


@pytest.mark.parametrize(("dose", "sigma"), [(40.0, 0.02), (15.0, 0.04), (100.0, 0.01)])
def test_estimate_noise_recovers_known_parameters(dose, sigma):
    yy, xx = np.mgrid[0:1024, 0:1024]
    clean = 0.1 + 0.8 * (0.5 + 0.5 * np.sin(xx / 90.0) * np.cos(yy / 130.0))
    rng = np.random.default_rng(0)
    noisy = rng.poisson(clean * dose) / dose + rng.normal(0, sigma, clean.shape)
    fit = cr.estimate_noise(noisy.astype(np.float32), full_scale=1.0)
    assert fit["dose"] == pytest.approx(dose, rel=0.1)
    assert fit["read_sigma"] == pytest.approx(sigma, rel=0.1)


def test_estimate_noise_on_crappified_real_em(isbi):
    # The fit recovers the em crappifier's shot noise from a real crappified slice.
    lr = cr.em_point_scan(isbi[0], 2, dose=20.0, read_sigma=0.0, probe_sigma=1.0, rng=0)
    fit = cr.estimate_noise(lr, full_scale=255.0)
    assert fit["dose"] == pytest.approx(20.0, rel=0.25)


def test_estimate_noise_on_a_small_image_uses_fewer_bins(isbi):
    # 96 x 170 px (a held-out fluorescence column block at 4x): too few tiles for 16 intensity
    # bins; the fit falls back to fewer bins instead of failing, and is unchanged where 16 work.
    lr = cr.em_point_scan(isbi[0], 2, dose=20.0, read_sigma=0.0, probe_sigma=1.0, rng=0)
    small = lr[:96, :170]
    fit = cr.estimate_noise(small, full_scale=255.0)
    assert fit["dose"] == pytest.approx(20.0, rel=0.35)
    assert cr.estimate_noise(lr, full_scale=255.0) == cr.estimate_noise(lr, full_scale=255.0, n_bins=16)
    with pytest.raises(ValueError, match=r"enough flat regions in an image of \(40, 40\) px"):
        cr.estimate_noise(
            np.full((40, 40), 0.5, np.float32) + np.linspace(0, 1, 40)[:, None] ** 8, full_scale=1.0
        )


def test_estimate_noise_errors():
    with pytest.raises(ValueError, match="one 2D image"):
        cr.estimate_noise(np.zeros((2, 64, 64)))
    with pytest.raises(ValueError, match="too small"):
        cr.estimate_noise(np.zeros((16, 16)))


def test_real_isbi_bilinear_psnr_in_plausible_band(isbi):
    hr = isbi[:4]
    for preset, band in [("pssr-em", (14, 26)), ("em", (12, 26))]:
        lr = cr.crappify(hr, preset, scale=4, rng=0)
        p = psnr(bilinear(lr, 4), hr[..., : lr.shape[-2] * 4, : lr.shape[-1] * 4])
        assert band[0] < p < band[1], (preset, p)
    # Less noise gives a better bilinear PSNR.
    lo = cr.crappify(hr, "em", rng=0, dose=5.0)
    hi = cr.crappify(hr, "em", rng=0, dose=500.0)
    assert psnr(bilinear(hi, 4), hr) > psnr(bilinear(lo, 4), hr) + 1


def test_noise_params_map_a_fit_to_the_physical_presets():
    fit = {"dose": 12.5, "read_sigma": 0.03, "gain": 0.08, "sigma": 0.03}
    assert cr.noise_params("em", fit) == {"dose": 12.5, "read_sigma": 0.03}
    assert cr.noise_params("fluo", fit) == {"photons": 12.5, "read_sigma": 0.03}
    assert cr.noise_params("em", {**fit, "full_scale": 4095.0})["full_scale"] == 4095.0
    with pytest.raises(ValueError, match="preset='nope' is unknown"):
        cr.noise_params("nope", fit)


def test_noise_params_fold_read_noise_into_the_pssr_presets_at_the_mean():
    # var = gain*m + sigma^2 matched at m = mean by r * var_factor * m (r = 1/4 at even scales)
    fit = {"gain": 0.01, "sigma": 0.1, "dose": 100.0, "read_sigma": 0.1, "full_scale": 255.0, "mean": 0.5}
    assert cr.noise_params("pssr-em", fit, 4) == pytest.approx({"var_factor": 0.12, "full_scale": 255.0})
    assert cr.noise_params("pssr-fluo", fit, 3) == pytest.approx({"var_factor": 0.03, "full_scale": 255.0})
    for bad in ({k: v for k, v in fit.items() if k != "mean"}, {**fit, "mean": 0.0}):
        with pytest.raises(ValueError, match="no positive mean intensity"):
            cr.noise_params("pssr-em", bad, 4)


@pytest.mark.parametrize("scale", [3, 4])
@pytest.mark.parametrize("var_factor", [0.02, 0.05, 0.15])
def test_noise_fit_refits_the_pssr_em_noise_level_on_its_own_scale(isbi, scale, var_factor):
    # The built-in em's degradation (pssr-em, local-variance noise added at HR, then a linear zoom)
    # on a real section (smoothed, so that the LR holds little aliased structure for the fit to
    # mistake for noise): fitting the LR noise and mapping it back gives the var_factor it was made with.
    hr = gaussian_filter(isbi[27].astype(np.float32), 4)
    lr = cr.get_preset("pssr-em", scale, var_factor=var_factor)(hr, rng=0)
    fit = cr.estimate_noise(lr, full_scale=255.0)
    back = cr.noise_params("pssr-em", fit, scale)
    assert 0.75 * var_factor < back["var_factor"] < 1.25 * var_factor, (scale, var_factor, back, fit)
    assert back["full_scale"] == 255.0
    # and the refitted degradation predicts the LR noise variance the image has (paper units)
    again = cr.get_preset("pssr-em", scale, **back)
    pred = cr.lr_noise_variance(again, np.float32(fit["mean"] * 255.0), 255.0)
    measured = (fit["gain"] * fit["mean"] + fit["sigma"] ** 2) * 255.0**2
    assert pred == pytest.approx(measured, rel=1e-5)


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", ["point", "bin", "linear"])
def test_geometry_at_every_scale_and_axis(scale, mode):
    """LR pixel i lies at HR coordinate i*s + (s-1)/2 along Y and X, at even and odd scales alike."""
    n = 8 * scale
    ramp = np.tile(np.arange(n, dtype=np.float32), (n, 1))
    want = np.arange(n // scale) * scale + (scale - 1) / 2
    lr_x = cr.undersample(ramp, scale, mode=mode)
    lr_y = cr.undersample(np.ascontiguousarray(ramp.T), scale, mode=mode)
    for row in (0, n // scale - 1):
        np.testing.assert_allclose(lr_x[row], want, atol=1e-4)
        np.testing.assert_allclose(lr_y[:, row], want, atol=1e-4)


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_point_probe_samples_the_centre_pixel(scale):
    """Without blur, an odd scale takes exactly the centre HR pixel, an even one the mean of the 4 central."""
    rng = np.random.default_rng(scale)
    hr = rng.random((4 * scale, 4 * scale)).astype(np.float32)
    lr = cr.point_sample(hr, scale)
    c = (scale - 1) / 2
    for i in range(4):
        for j in range(4):
            ys = sorted({int(np.floor(i * scale + c)), int(np.ceil(i * scale + c))})
            xs = sorted({int(np.floor(j * scale + c)), int(np.ceil(j * scale + c))})
            assert lr[i, j] == pytest.approx(hr[np.ix_(ys, xs)].mean(), abs=1e-6)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_em_preset_mean_is_the_mean_of_the_sampled_pixels(scale):
    """Noise is unbiased: over many seeds the crappified mean equals the undersampled clean image."""
    hr = np.tile(np.linspace(40, 200, 16 * scale, dtype=np.float32), (16 * scale, 1))
    cfg = cr.get_preset("em", scale)
    mean = np.mean([cfg(hr, rng=s) for s in range(40)], axis=0)
    clean = cr.undersample(hr, scale, mode="point")
    assert np.abs(mean - clean).mean() < 0.03 * (hr.max() - hr.min())
