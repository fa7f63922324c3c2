"""Image-quality metrics as the PSSR paper evaluates them, and interpolation baselines.

Paper-style evaluation (Fang et al. 2021, following CSBDeep): the ground truth is
percentile-normalised (0.1 to 99.9 percentile -> 0 to 1), the prediction is affinely
fitted to it by least squares (so a global gain/offset is not penalised), and PSNR /
SSIM / NRMSE are computed with a data range of 1.  3D inputs are scored per 2D slice
(the leading axes) and averaged, as the paper scored images.
"""

from __future__ import annotations

import numpy as np

from pssr.errors import PssrError

__all__ = ["bicubic", "bilinear", "evaluate_pair", "normalize_gt", "nrmse", "psnr", "ssim", "upsample"]


def normalize_gt(gt: np.ndarray, pmin: float = 0.1, pmax: float = 99.9) -> np.ndarray:
    """Percentile-normalise the ground truth to roughly [0, 1] (float64)."""
    gt = np.asarray(gt, dtype=np.float64)
    lo, hi = np.percentile(gt, [pmin, pmax])
    return (gt - lo) / max(hi - lo, 1e-12)


def _fit(pred: np.ndarray, gt_n: np.ndarray) -> np.ndarray:
    """Affine least-squares fit ``a*pred + b`` to ``gt_n``."""
    p = np.asarray(pred, dtype=np.float64).ravel()
    g = gt_n.ravel()
    pc = p - p.mean()
    denom = float(pc @ pc)
    a = float(pc @ (g - g.mean())) / denom if denom > 0 else 0.0
    b = g.mean() - a * p.mean()
    return a * np.asarray(pred, dtype=np.float64) + b


def _check(pred: np.ndarray, gt: np.ndarray) -> None:
    if np.shape(pred) != np.shape(gt):
        raise PssrError(
            f"prediction shape {np.shape(pred)} differs from ground truth shape {np.shape(gt)}; "
            "crop the ground truth to scale x the low-resolution shape."
        )
    if np.ndim(gt) < 2:
        raise PssrError(f"metrics need at least 2D images; got shape {np.shape(gt)}.")


def _slices(pred: np.ndarray, gt: np.ndarray):
    p = np.asarray(pred).reshape((-1,) + np.shape(pred)[-2:])
    g = np.asarray(gt).reshape((-1,) + np.shape(gt)[-2:])
    return zip(p, g, strict=True)


def check_ground_truth(gt: np.ndarray) -> None:
    """Refuse a ground-truth plane whose 0.1 and 99.9 percentiles are equal: nothing to normalise by."""
    g3 = np.asarray(gt).reshape((-1,) + np.shape(gt)[-2:])
    for i, g in enumerate(g3):
        lo, hi = np.percentile(g, [0.1, 99.9])
        if not hi > lo:
            raise PssrError(
                f"ground-truth plane {i} has the value {lo:g} in more than 99.8 % of its pixels: PSNR and "
                "SSIM (normalised by the 0.1-99.9 percentile range) are undefined on it; leave out blank "
                "planes or crop to the part with structure."
            )


def _per_slice(fn, pred: np.ndarray, gt: np.ndarray) -> float:
    _check(pred, gt)
    check_ground_truth(gt)
    vals = []
    for p, g in _slices(pred, gt):
        gn = normalize_gt(g)
        vals.append(fn(_fit(p, gn), gn))
    return float(np.mean(vals))


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """Paper-style PSNR in dB (data range 1 after normalisation and affine fit).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> gt = rng.random((32, 32))
    >>> noisy, noisier = gt + 0.01 * rng.standard_normal(gt.shape), gt + 0.1 * rng.standard_normal(gt.shape)
    >>> psnr(noisy, gt) > psnr(noisier, gt) > 10
    True
    """

    def f(p: np.ndarray, g: np.ndarray) -> float:
        mse = float(np.mean((p - g) ** 2))
        return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)

    return _per_slice(f, pred, gt)


def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """Paper-style SSIM (scikit-image, 7x7 window, data range 1).

    Examples
    --------
    >>> import numpy as np
    >>> gt = np.random.default_rng(0).random((32, 32))
    >>> round(ssim(gt, gt), 3), ssim(np.flipud(gt), gt) < 0.1
    (1.0, True)
    """
    from skimage.metrics import structural_similarity  # loaded when used, not with pssr

    return _per_slice(lambda p, g: structural_similarity(p, g, data_range=1.0), pred, gt)


def nrmse(pred: np.ndarray, gt: np.ndarray) -> float:
    """Paper-style NRMSE: RMSE after normalisation and fit (data range 1).

    Examples
    --------
    >>> import numpy as np
    >>> gt = np.random.default_rng(0).random((32, 32))
    >>> round(nrmse(2 * gt + 1, gt), 6)  # an affine change of intensities is fitted away
    0.0
    """
    return _per_slice(lambda p, g: float(np.sqrt(np.mean((p - g) ** 2))), pred, gt)


def upsample(lr: np.ndarray, scale: int, order: int) -> np.ndarray:
    """Pixel-centre-aligned spline upsampling of the last two axes by ``scale``.

    ``order=1`` is bilinear, ``order=3`` bicubic (cubic spline); LR pixel ``i`` maps
    to HR coordinate ``i*s + (s-1)/2``, the package's shared geometry.
    """
    from skimage.transform import resize  # loaded when used, not with pssr

    lr = np.asarray(lr, dtype=np.float32)
    out_shape = lr.shape[:-2] + (lr.shape[-2] * scale, lr.shape[-1] * scale)
    return (
        resize(lr, out_shape, order=order, mode="edge", anti_aliasing=False, preserve_range=True).astype(
            np.float32
        )
        if lr.ndim == 2
        else np.stack([upsample(s, scale, order) for s in lr])
    )


def bilinear(lr: np.ndarray, scale: int) -> np.ndarray:
    """Bilinear upsampling baseline."""
    return upsample(lr, scale, 1)


def bicubic(lr: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic (cubic-spline) upsampling baseline."""
    return upsample(lr, scale, 3)


def crop_to_scale(hr: np.ndarray, lr_shape: tuple[int, ...], scale: int) -> np.ndarray:
    """Crop an HR image to ``scale`` x the LR image's last two dimensions."""
    h, w = lr_shape[-2] * scale, lr_shape[-1] * scale
    if hr.shape[-2] < h or hr.shape[-1] < w:
        raise PssrError(
            f"high-resolution shape {hr.shape[-2:]} is smaller than scale {scale} x "
            f"low-resolution shape {tuple(lr_shape[-2:])}; the pair does not match the scale."
        )
    if hr.shape[-2] >= h + scale or hr.shape[-1] >= w + scale:  # more than the LR's last pixel covers
        raise PssrError(
            f"high-resolution shape {hr.shape[-2:]} is larger than scale {scale} x low-resolution shape "
            f"{tuple(lr_shape[-2:])} = {(h, w)} by {scale} px or more: the two do not show the same field "
            "(scored as they are, only the top-left corner would be compared); crop both to the same field."
        )
    return hr[..., :h, :w]


def evaluate_pair(
    hr: np.ndarray, lr: np.ndarray, scale: int, predictions: dict[str, np.ndarray] | None = None
) -> dict[str, dict[str, float]]:
    """PSNR/SSIM/NRMSE of each prediction and of bilinear and bicubic baselines.

    Returns ``{name: {"psnr": ..., "ssim": ..., "nrmse": ...}}``.

    Examples
    --------
    >>> import numpy as np
    >>> hr = np.random.default_rng(0).random((64, 64))
    >>> scores = evaluate_pair(hr, hr[::4, ::4], 4, {"mine": hr})
    >>> sorted(scores), sorted(scores["mine"])
    (['bicubic', 'bilinear', 'mine'], ['nrmse', 'psnr', 'ssim'])
    >>> scores["mine"]["psnr"] > scores["bilinear"]["psnr"]
    True
    """
    hr = crop_to_scale(np.asarray(hr), np.shape(lr), scale)
    cands = dict(predictions or {})
    cands["bilinear"] = bilinear(lr, scale)
    cands["bicubic"] = bicubic(lr, scale)
    return {k: {"psnr": psnr(v, hr), "ssim": ssim(v, hr), "nrmse": nrmse(v, hr)} for k, v in cands.items()}
