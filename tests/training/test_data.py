"""Patch sampler: noise-level maps, motion augmentation, section context (tiny real crops)."""

import numpy as np
import pytest

from pssr.degrade.crappify import CrappifierConfig, get_preset, lr_noise_variance
from pssr.training.data import (
    PairSampler,
    Source,
    add_noise_map,
    noise_level,
    noise_map_spec,
    noise_std,
)


@pytest.fixture(scope="module")
def crop(isbi) -> np.ndarray:
    return np.ascontiguousarray(isbi[:6, :128, :128])


@pytest.mark.parametrize("kind", ["em", "fluo", "pssr-em", "pssr-fluo"])
@pytest.mark.parametrize("scale", [3, 4])
def test_noise_level_matches_the_crappifier_variance_model(kind, scale):
    cfg = get_preset(kind, scale)
    gain, sigma = noise_level(cfg)
    mean = np.linspace(0, 200, 11, dtype=np.float32)
    expected = np.sqrt(lr_noise_variance(cfg, mean, 255.0))
    np.testing.assert_allclose(noise_std(mean, gain, sigma, 255.0), expected, rtol=1e-5)


def test_noise_std_is_the_empirical_std_of_the_crappifier():
    # A flat image: every LR pixel has the same noise-free value, so the empirical std over
    # pixels is the noise std, which the map must predict.
    flat = np.full((256, 256), 100, np.uint8)
    for cfg in (get_preset("em", 4, dose=10.0, read_sigma=0.03), get_preset("fluo", 4, photons=5.0)):
        lr = cfg(flat, rng=3)
        gain, sigma = noise_level(cfg)
        predicted = float(noise_std(np.float32(100.0), gain, sigma, 255.0))
        assert lr.std() == pytest.approx(predicted, rel=0.08)


def test_sampler_noise_map_is_the_drawn_noise_std_and_lr_is_unchanged(crop):
    jit = CrappifierConfig("em", 4, {"full_scale": 255.0}, {"dose": (0.1, 10.0)})
    kw = {"crappifier": jit, "patch": 24, "augment": False, "min_std": 0.0}
    blind = PairSampler([Source(crop)], 4, rng=5, **kw)
    cond = PairSampler([Source(crop)], 4, rng=5, noise_map=True, **kw)
    lr_b, hr_b = blind.sample(6)
    lr_c, hr_c = cond.sample(6)
    assert lr_c.shape == (6, 2, 24, 24)
    # Same draws: the frames and targets are bit-identical to the blind sampler's.
    np.testing.assert_array_equal(lr_c[:, 1:], lr_b)
    np.testing.assert_array_equal(hr_c, hr_b)
    lo, hi = cond.lohi[0]
    maps = lr_c[:, 0] * (hi - lo)  # raw units
    raw = lr_c[:, 1] * (hi - lo) + lo
    # The map is a pointwise std for ONE dose per sample: invert it for the dose and check it
    # is constant within each sample, inside the jitter range and different across samples.
    fs = np.full(6, 255.0)
    doses = []
    for i in range(6):
        m = np.clip(raw[i] / fs[i], 0, None)
        var = (maps[i] / fs[i]) ** 2 - 0.02**2
        ok = m > 0.2
        d = m[ok] / var[ok]
        assert d.std() / d.mean() < 1e-3
        doses.append(d.mean())
    assert all(4.0 * 0.99 < d < 400 * 1.01 for d in doses), doses
    assert np.ptp(doses) > 1.0


def test_sampler_noise_map_scales_with_brightness_augmentation(crop):
    crap = get_preset("pssr-em", 4)
    s = PairSampler([Source(crop)], 4, crappifier=crap, patch=24, rng=1, noise_map=True, min_std=0.0)
    lr, _ = s.sample(4)
    assert lr.shape == (4, 2, 24, 24)
    assert (lr[:, 0] >= 0).all() and np.isfinite(lr).all()


def test_noise_map_needs_synthetic_pairs(crop):
    lr = Source(crop[:, ::4, ::4].copy())
    with pytest.raises(ValueError, match="noise_map=True needs synthetic pairs"):
        PairSampler([Source(crop)], 4, lr=[lr], patch=24, noise_map=True, check_registration=False)


def test_add_noise_map_matches_the_training_formula():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 255, (3, 10, 12)).astype(np.float32)
    lo, hi = 10.0, 240.0
    x = (raw - lo) / (hi - lo)
    spec = {"gain": 0.02, "sigma": 0.01, "full_scale": 255.0}
    y = add_noise_map(x, spec, lo=lo, hi=hi)
    assert y.shape == (4, 10, 12)
    np.testing.assert_array_equal(y[1:], x)
    np.testing.assert_allclose(y[0] * (hi - lo), noise_std(raw[1], 0.02, 0.01, 255.0), rtol=1e-5)
    # batched form: the same per item, and tiles of the map are the map of tiles (pointwise)
    yb = add_noise_map(np.stack([x, x]), spec, lo=lo, hi=hi)
    np.testing.assert_array_equal(yb[1], y)
    np.testing.assert_array_equal(add_noise_map(x[:, 2:7, 3:9], spec, lo=lo, hi=hi), y[:, 2:7, 3:9])
    with pytest.raises(ValueError, match=r"\(frames, h, w\) or \(B, frames, h, w\)"):
        add_noise_map(x[0], spec, lo=lo, hi=hi)


def test_noise_spec_modes_and_errors(isbi):
    cfg = get_preset("em", 2)
    lr = cfg(isbi[0], rng=0)
    fit = noise_map_spec("fit", plane=lr, full_scale=255.0)
    assert fit["gain"] > 0 and fit["full_scale"] == 255.0
    model = noise_map_spec("model", crappifier=cfg, full_scale=255.0)
    assert (model["gain"], model["sigma"]) == pytest.approx(noise_level(cfg))
    twice = noise_map_spec({"gain": 0.01, "sigma": 0.02}, full_scale=255.0, factor=2.0)
    assert (twice["gain"], twice["sigma"]) == pytest.approx((0.04, 0.04))
    with pytest.raises(ValueError, match="needs keys 'gain' and 'sigma'"):
        noise_map_spec({"gain": 0.01}, full_scale=255.0)
    with pytest.raises(ValueError, match="must be 'fit', 'model' or a dict"):
        noise_map_spec("guess", full_scale=255.0)
    with pytest.raises(ValueError, match="noise='model' needs the model's crappifier"):
        noise_map_spec("model", full_scale=255.0)


def test_motion_moves_neighbours_only(crop):
    crap = get_preset("em", 4, dose=float("inf"), read_sigma=0.0)
    kw = {"crappifier": crap, "patch": 16, "frames": 3, "augment": False, "min_std": 0.0}
    for seed in range(3):  # the first sample of each: same draws up to the motion
        a, ha = PairSampler([Source(crop)], 4, rng=seed, **kw).sample(1)
        b, hb = PairSampler([Source(crop)], 4, rng=seed, motion=(2.0, 5.0), **kw).sample(1)
        np.testing.assert_array_equal(ha, hb)  # same target
        np.testing.assert_array_equal(a[:, 1], b[:, 1])  # noise-free centre frame untouched
        assert np.abs(a[:, [0, 2]] - b[:, [0, 2]]).mean() > 0.01  # neighbours moved
    with pytest.raises(ValueError, match="needs frames > 1"):
        PairSampler([Source(crop)], 4, crappifier=crap, patch=16, motion=(1.0, 0.0))


def test_section_context_never_mixes_sources():
    # Two sources told apart by orientation (horizontal vs vertical stripes, no dihedral
    # augmentation): every frame of a sample must have its target's orientation.
    a = np.full((4, 96, 96), 10, np.uint8)
    a[:, ::8] = 200
    b = np.full((5, 96, 96), 10, np.uint8)
    b[:, :, ::8] = 200
    crap = get_preset("em", 4, dose=float("inf"), read_sigma=0.0)
    s = PairSampler(
        [Source(a), Source(b)],
        4,
        crappifier=crap,
        patch=16,
        frames=5,
        augment=False,
        min_std=0.0,
        rng=0,
        val_fraction=0.0,
    )
    lr, hr = s.sample(40)
    assert lr.shape == (40, 5, 16, 16)

    def horizontal(img):
        return img.mean(1).std() > img.mean(0).std()

    kinds = [horizontal(h[0]) for h in hr]
    assert 0 < sum(kinds) < 40  # both sources drawn
    for frames, k in zip(lr, kinds, strict=True):
        assert all(horizontal(f) == k for f in frames)


def test_regions_are_named_and_split_is_checked(isbi):
    from pssr.degrade.crappify import get_preset
    from pssr.training.data import PairSampler, Region, Source, Split

    s = PairSampler([Source(isbi[:10, :128, :128])], 4, crappifier=get_preset("pssr-em", 4), patch=16)
    ((train, val),) = s.regions
    assert isinstance(train, Region) and train.plane1 == val.plane0 == 9 and train.area == 9 * 128
    lr, hr = s.sample(2, split=Split.VAL)
    assert lr.shape == (2, 1, 16, 16) and hr.shape == (2, 1, 64, 64)
    s.sample(1, split="val")  # plain strings work
    with pytest.raises(ValueError, match="split='validation' is unknown"):
        s.sample(1, split="validation")


def test_a_source_too_small_to_hold_out_says_so(isbi, caplog):
    from pssr.degrade.crappify import get_preset
    from pssr.training.data import PairSampler, Source

    with caplog.at_level("WARNING", logger="pssr.training.data"):
        s = PairSampler([Source(isbi[0, :64, :64])], 4, crappifier=get_preset("pssr-em", 4), patch=16)
    ((train, val),) = s.regions
    assert train == val and "not held out" in caplog.text


def test_lazy_2d_sources_read_like_arrays(tmp_path, isbi):
    import zarr

    from pssr.training.data import Source

    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(64, 80), chunks=(32, 32), dtype="uint8")
    z[...] = isbi[0, :64, :80]
    src = Source(z)
    assert (src.n, src.h, src.w) == (1, 64, 80)
    np.testing.assert_array_equal(
        src.read([0, 0], 8, 4, 16, 20), np.stack([isbi[0, 8:24, 4:24]] * 2).astype(np.float32)
    )


def test_multiframe_training_on_tzyx_is_refused(tmp_path, isbi):
    """TZYX files are folded into one plane axis for training: neighbours would cross timepoints."""
    import tifffile

    from pssr.training.data import load_sources

    path = tmp_path / "tzyx.tif"
    tifffile.imwrite(path, isbi[:6, :128, :128].reshape(2, 3, 128, 128), metadata={"axes": "TZYX"})
    (src,) = load_sources(path)
    assert src.n == 6 and "T" in src.axes and "Z" in src.axes
    crap = get_preset("pssr-em", 4)
    with pytest.raises(ValueError, match=r"frames=3 needs one axis of neighbours.*both T and Z.*--frames 1"):
        PairSampler([src], 4, crappifier=crap, patch=16, frames=3)
    PairSampler([src], 4, crappifier=crap, patch=16, frames=1)  # single-frame: every plane is a sample
