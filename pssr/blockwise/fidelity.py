"""Fidelity: how consistent a restoration is with the low-resolution image it came from.

Each restored block is degraded again with the deterministic part of the model's acquisition
model (blur and undersampling) and compared with the measured input, in units of the noise
sigma expected at that intensity.  A faithful restoration gives a standard-normal map (about
0.27 % of pixels beyond 3 sigma); invented structure shows up as larger values.  The noise model
is the model's crappifier, or a fit on the input (:func:`pssr.degrade.crappify.estimate_noise`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pssr.degrade.crappify import CrappifierConfig, estimate_noise, lr_noise_variance, undersample
from pssr.errors import PredictError

logger = logging.getLogger(__name__)

__all__ = ["FIDELITY_WINDOW", "degrade", "fidelity_map", "fidelity_z", "noise_spec"]

FIDELITY_WINDOW = 3
FIT_MAX_PX = 2048 * 2048  # the noise fit reads at most this many pixels of the first plane


def degrade(y_hr: np.ndarray, cfg: CrappifierConfig) -> np.ndarray:
    """The deterministic part of the acquisition model (blur + undersampling)."""
    p = cfg.full_params()
    if cfg.kind == "em":
        return undersample(y_hr, cfg.scale, mode=p["mode"], blur_sigma=p["probe_sigma"])
    if cfg.kind == "fluo":
        return undersample(y_hr, cfg.scale, mode=p["mode"], blur_sigma=p["psf_sigma"])
    return undersample(y_hr, cfg.scale, mode="linear")


def fidelity_map(
    restored: np.ndarray,
    lr: np.ndarray,
    crappifier: CrappifierConfig,
    *,
    full_scale: float,
    noise: dict[str, float] | None = None,
) -> np.ndarray:
    """Fidelity z-map of an existing 2D restoration against its measured input.

    ``noise`` = ``{"gain": g, "sigma": s}`` (fractions of ``full_scale``); by default the
    crappifier's own noise model.  See :func:`fidelity_z`.
    """
    return fidelity_z(
        np.asarray(restored, np.float32),
        np.asarray(lr, np.float32),
        {"crappifier": crappifier.to_dict(), **(noise or {})},
        float(full_scale),
    )


def fidelity_z(y_hr: np.ndarray, lr: np.ndarray, noise: dict[str, Any], full_scale: float) -> np.ndarray:
    """z-score of the measured LR against the re-degraded restoration.

    ``(lr - D(y)) / sigma(D(y))`` with ``D`` the blur + undersampling of the acquisition
    model and ``sigma`` the expected noise at that intensity, averaged over
    ``FIDELITY_WINDOW``-pixel squares and rescaled so that a faithful restoration gives
    a standard normal map (about 0.27 % of pixels beyond 3).  ``noise`` holds the
    ``crappifier`` dict and optionally a fitted ``gain``/``sigma`` (fractions of ``full_scale``).
    """
    cfg = CrappifierConfig.from_dict(noise["crappifier"])
    d = degrade(y_hr, cfg)[: lr.shape[0], : lr.shape[1]]
    if "gain" in noise:
        m = np.clip(d / full_scale, 0, None)
        var = (noise["gain"] * m + noise["sigma"] ** 2) * full_scale**2
    else:
        var = lr_noise_variance(cfg, d, full_scale)
    var = np.maximum(var, (1e-3 * full_scale) ** 2)
    z = (lr[: d.shape[0], : d.shape[1]] - d) / np.sqrt(var)
    # Pool over 3x3 input pixels and rescale to unit variance: invented structure spans
    # several pixels, pixel noise does not, so this is 3x more sensitive than single
    # pixels while a faithful restoration still gives z ~ N(0, 1).
    k = FIDELITY_WINDOW
    from scipy import ndimage  # loaded when a fidelity map is made, not with every restore

    return (ndimage.uniform_filter(z, k, mode="reflect") * k).astype(np.float32)


def noise_spec(noise: Any, crappifier: CrappifierConfig | None, arr: Any) -> dict[str, Any]:
    """The noise model of a fidelity map.

    ``noise`` is "fit" (on the first plane of ``arr``; its central 2048^2 pixels when larger),
    "model" (the crappifier's own) or ``{"gain": g, "sigma": s}`` in fractions of full scale.
    """
    if crappifier is None:
        raise PredictError(
            "fidelity needs the model's acquisition model (crappifier), and this model has none "
            "(it was trained on real pairs). Retrain with --preset, or pass noise={'gain': g, "
            "'sigma': s} together with a model that records its degradation."
        )
    spec: dict[str, Any] = {"crappifier": crappifier.to_dict()}
    if isinstance(noise, dict):
        spec.update({"gain": float(noise["gain"]), "sigma": float(noise["sigma"])})
    elif noise == "fit":
        lead = (0,) * (len(arr.shape) - 2)
        h, w = (int(n) for n in arr.shape[-2:])
        if h * w <= FIT_MAX_PX:  # the whole first plane, as always
            plane = np.asarray(arr[lead], np.float32)
        else:  # its central 2048^2 pixels: memory of a block, never of a section
            side = int(FIT_MAX_PX**0.5)
            y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
            plane = np.asarray(arr[(*lead, slice(y0, y0 + side), slice(x0, x0 + side))], np.float32)
        kind = np.dtype(arr.dtype).kind
        try:
            fit = estimate_noise(plane, full_scale=float(np.iinfo(arr.dtype).max) if kind in "ui" else None)
            spec.update({"gain": fit["gain"], "sigma": fit["sigma"], "source": "fit"})
        except ValueError as e:
            logger.warning("noise fit failed (%s); using the model's crappifier noise", e)
            spec["source"] = "model"
    elif noise == "model":
        spec["source"] = "model"
    else:
        raise PredictError(f"noise={noise!r} must be 'fit', 'model' or a dict with gain and sigma.")
    return spec
