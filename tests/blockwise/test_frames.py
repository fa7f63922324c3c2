"""--frames auto: neighbour registration, agreement, and the single-frame fallback (issue 27)."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift

from pssr.blockwise import frames as fr
from pssr.blockwise.predict import PredictError, restore
from pssr.errors import PssrError


def _scene(seed: int = 0, size: int = 48) -> np.ndarray:
    """Smooth blobs in [0, 1] (what a registration can lock on to)."""
    a = gaussian_filter(np.random.default_rng(seed).random((size, size)), 3)
    return ((a - a.min()) / np.ptp(a)).astype(np.float32)


def _shifted_window(shifts) -> np.ndarray:
    base = _scene()
    return np.stack([shift(base, s, order=3, mode="nearest") for s in shifts]).astype(np.float32)


SHIFTS = [(2.0, -1.0), (1.0, 0.5), (0.0, 0.0), (-1.0, 1.0), (-2.0, 1.5)]


@pytest.mark.parametrize("method", fr.REGISTRATION)
def test_register_window_moves_neighbours_onto_the_centre(method):
    win = _shifted_window(SHIFTS)
    reg = fr.register_window(win, method)
    np.testing.assert_array_equal(reg[2], win[2])  # the centre is never touched
    inner = (slice(6, -6), slice(6, -6))  # away from the edge pixels a shift brings in
    before = np.abs(win[[0, 1, 3, 4]] - win[2])[(slice(None), *inner)].mean()
    after = np.abs(reg[[0, 1, 3, 4]] - reg[2])[(slice(None), *inner)].mean()
    assert after < 0.25 * before, (method, before, after)
    assert fr.disagreement(reg) < 0.5 * fr.disagreement(win)


def test_disagreement_zero_when_still_grows_with_motion_and_ignores_brightness():
    still = np.repeat(_scene()[None], 5, 0)
    assert fr.disagreement(still) == 0.0
    small = _shifted_window([(0.5, 0), (0.25, 0), (0, 0), (-0.25, 0), (-0.5, 0)])
    large = _shifted_window([(2, 0), (1, 0), (0, 0), (-1, 0), (-2, 0)])
    assert 0 < fr.disagreement(small) < fr.disagreement(large)
    assert fr.disagreement(3 * large) == pytest.approx(fr.disagreement(large), rel=1e-5)
    other = np.stack([_scene(s) for s in range(5)])  # different content in every frame
    assert fr.disagreement(other) > 1.5 * fr.disagreement(large)
    assert fr.disagreement(still[:1]) == 0.0  # a single frame has nothing to disagree with


def test_agreement_weights_trust_only_matching_pixels():
    c = _scene()
    n = c.copy()
    n[:, 24:] += 1.0  # the right half of the neighbour differs by the whole range
    win = np.stack([n, c, n])
    w = fr.agreement_weights(win, tolerance=0.1)
    np.testing.assert_array_equal(w[1], 1.0)
    assert w[0][:, :20].min() > 0.99 and w[0][:, 28:].max() < 1e-6
    blended = fr.agreement_window(win, tolerance=0.1)
    np.testing.assert_allclose(blended[0][:, 28:], c[:, 28:], atol=1e-6)  # replaced by the centre
    np.testing.assert_allclose(blended[0][:, :20], n[:, :20], atol=2e-2)  # kept


def test_prepare_falls_back_only_beyond_the_threshold():
    moving = _shifted_window(SHIFTS)
    other = np.stack([_scene(s) for s in range(5)])
    reg, single, d = fr.prepare(moving, "phase", threshold=0.1)
    assert not single and d < 0.1
    _, single, d = fr.prepare(other, "phase", threshold=0.1)
    assert single and d > 0.1


def test_bad_windows_and_methods_are_refused():
    with pytest.raises(PssrError, match="odd number of frames"):
        fr.disagreement(np.zeros((4, 8, 8)))
    with pytest.raises(PssrError, match="odd number of frames"):
        fr.register_window(np.zeros((8, 8)))
    with pytest.raises(PssrError, match="registration 'sift'"):
        fr.register_window(np.zeros((3, 8, 8)), "sift")


# ------------------------------------------------------------------- restore(frames="auto")
def _spots(seed: int, size: int = 24) -> np.ndarray:
    """Six blurred 3x3 spots at random places (nuclei): no flow maps one such frame onto another."""
    rng = np.random.default_rng(seed)
    a = np.zeros((size, size), np.float32)
    for y, x in rng.integers(2, size - 3, (6, 2)):
        a[y - 1 : y + 2, x - 1 : x + 2] = 1
    return gaussian_filter(a, 0.7)


def _movie(content: str) -> np.ndarray:
    """A tiny 3-frame movie (uint8): the same spots in every frame, or different spots in each."""
    seeds = [0] * 3 if content == "still" else range(3)
    return np.stack([(_spots(s) * 200 + 20).astype(np.uint8) for s in seeds])


def test_auto_on_a_still_movie_is_the_multi_frame_model():
    m = _movie("still")
    kw = dict(model="fluo-mf", axes="TYX", dtype="float32", progress=False, backend="torch")
    auto = restore(m, frames="auto", **kw)
    plain = restore(m, **kw)
    assert auto.summary["single_frame_blocks"] == 0
    np.testing.assert_allclose(auto.output, plain.output, rtol=0, atol=1e-4 * np.ptp(plain.output))


def test_auto_where_every_frame_differs_is_the_single_frame_fallback():
    m = _movie("changing")
    kw = dict(axes="TYX", dtype="float32", progress=False, backend="torch")
    auto = restore(m, model="fluo-mf", frames="auto", **kw)
    single = restore(m, model="fluo", **kw)
    multi = restore(m, model="fluo-mf", **kw)
    assert auto.summary["single_frame_blocks"] == auto.summary["blocks"] == 3
    np.testing.assert_allclose(auto.output, single.output, rtol=0, atol=1e-4 * np.ptp(single.output))
    assert np.abs(auto.output - multi.output).max() > 0.05 * np.ptp(multi.output)


def test_auto_is_refused_for_a_single_frame_model_and_unknown_values():
    m = _movie("still")
    with pytest.raises(PredictError, match="needs a multi-frame model"):
        restore(m, model="fluo", axes="TYX", frames="auto", progress=False)
    with pytest.raises(PredictError, match="frames='all' must be 'model'"):
        restore(m, model="fluo-mf", axes="TYX", frames="all", progress=False)


def test_cli_predict_frames_auto_reports_the_fallback(tmp_path, capsys):
    import tifffile

    from pssr.cli.app import main

    src = tmp_path / "movie.tif"
    tifffile.imwrite(src, _movie("changing"), imagej=True, metadata={"axes": "TYX"})
    out = tmp_path / "out.tif"
    assert (
        main(["predict", str(src), str(out), "--model", "fluo-mf", "--frames", "auto", "--backend", "torch"])
        == 0
    )
    assert "--frames auto: 3 of 3 blocks restored from their centre frame alone" in capsys.readouterr().out
    assert tifffile.imread(out).shape == (3, 96, 96)


def test_auto_mixes_multi_and_single_frame_blocks_in_one_batch_in_order():
    """Frames 0-2 still, 3-5 each different: one batch holds blocks of both kinds, each must get
    its own model's output (a mix-up of the batch order would swap frames)."""
    m = np.concatenate(
        [_movie("still"), np.stack([(_spots(s) * 200 + 20).astype(np.uint8) for s in (7, 8, 9)])]
    )
    kw = dict(axes="TYX", dtype="float32", progress=False, backend="torch", batch=6)
    auto = restore(m, model="fluo-mf", frames="auto", **kw)
    multi = restore(m, model="fluo-mf", **kw).output
    single = restore(m, model="fluo", **kw).output
    tol = 1e-4 * np.ptp(multi)
    assert 0 < auto.summary["single_frame_blocks"] < 6
    np.testing.assert_allclose(auto.output[0], multi[0], rtol=0, atol=tol)  # window of identical frames
    np.testing.assert_allclose(auto.output[5], single[5], rtol=0, atol=tol)  # neighbours all differ
    assert np.abs(auto.output[5] - multi[5]).max() > 0.05 * np.ptp(multi)
