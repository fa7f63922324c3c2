"""Degradation models ("crappifiers") for point-scanning microscopy.

A crappifier turns a high-resolution (HR) image into a realistic low-resolution (LR)
acquisition of the same field: undersampling by an integer factor plus the noise of a
faster / lower-dose scan.  Training pairs are made with these functions, and the
restoration's fidelity check uses their deterministic part and noise variance.

Geometry (shared by every mode, so one LR->HR mapping holds for all models): LR pixel
``i`` covers HR pixels ``[i*s, (i+1)*s)`` and its centre lies at HR coordinate
``i*s + (s-1)/2``.  The LR image has ``floor(n/s)`` pixels along each of the last two
axes; trailing HR pixels that do not fill a whole LR pixel are dropped.

Intensity units: every crappifier returns ``float32`` in the *input's* units (a uint8
image gives values around 0..255, a uint16 one around 0..65535), never clipped or
rounded, because noise can legitimately leave the input's range.  Noise strengths are
given relative to ``full_scale`` (the dtype maximum for integer input, the 99.9th
percentile for float input unless given), so the same parameters mean the same
signal-to-noise ratio for uint8, uint16 and float data.

Leading axes (z slices, time frames) are processed slice by slice with independent
noise per slice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pssr.errors import PssrError, PssrTypeError


def _gaussian_filter(*args, **kwargs):
    # scipy.ndimage loads here, not when pssr is imported (~0.35 s of every `pssr` command).
    from scipy import ndimage

    return ndimage.gaussian_filter(*args, **kwargs)


logger = logging.getLogger(__name__)

__all__ = [
    "CrappifierConfig",
    "PRESETS",
    "noise_params",
    "bin_downsample",
    "crappify",
    "em_point_scan",
    "estimate_noise",
    "fluo_point_scan",
    "get_preset",
    "lr_noise_variance",
    "range_warning",
    "point_sample",
    "pssr_em",
    "pssr_fluo",
    "undersample",
]

SCALES = (2, 3, 4, 8)
Mode = Literal["point", "bin", "linear"]
_MODES = ("point", "bin", "linear")
_KINDS = ("em", "fluo", "pssr-em", "pssr-fluo")


# ----------------------------------------------------------------------------- helpers
def _rng(rng: None | int | np.random.Generator) -> np.random.Generator:
    return np.random.default_rng(rng)


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer):
        raise PssrTypeError(f"scale={scale!r} must be an integer (one of {SCALES}).")
    if scale < 2:
        raise PssrError(
            f"scale={scale} is below 2: super-resolution needs an integer factor >= 2 (supported: {SCALES})."
        )
    return int(scale)


def _check_nonneg(name: str, value: float) -> float:
    if not np.isfinite(value) or value < 0:
        raise PssrError(f"{name}={value} must be a finite number >= 0.")
    return float(value)


def _check_image(image: np.ndarray, scale: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim < 2:
        raise PssrError(
            f"image has {image.ndim} dimension(s); a crappifier needs at least 2 (Y, X), "
            "e.g. a 2D image, a ZYX stack or a TYX timelapse."
        )
    if image.dtype.kind not in "uif" and image.dtype != bool:
        raise PssrTypeError(f"image dtype {image.dtype} is not numeric; use uint8, uint16 or float.")
    h, w = image.shape[-2:]
    if h < scale or w < scale:
        raise PssrError(
            f"image of size {h}x{w} (Y x X) is smaller than the scale {scale}: "
            f"each side needs at least {scale} pixels to give one low-resolution pixel."
        )
    if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
        raise PssrError("image contains NaN or infinite values; replace them (e.g. np.nan_to_num) first.")
    return image


def full_scale_of(image: np.ndarray) -> float:
    """Intensity that noise parameters are relative to.

    The dtype maximum for integer images (255 for uint8, 65535 for uint16); for float
    images the 99.9th percentile of the absolute values (1.0 for an all-zero image).
    """
    image = np.asarray(image)
    if image.dtype.kind in "ui":
        return float(np.iinfo(image.dtype).max)
    if image.dtype == bool:
        return 1.0
    sample = np.abs(image[..., ::4, ::4]) if image.size > 1_000_000 else np.abs(image)
    fs = float(np.percentile(sample, 99.9))
    return fs if fs > 0 else 1.0


def range_warning(image: np.ndarray, cfg: CrappifierConfig) -> str | None:
    """A warning when an integer image uses a small part of its range for a degradation at full scale.

    Noise parameters are relative to the dtype maximum of integer images: a uint16 image that
    reaches only 5000 gets 13x the relative noise it would get as float (its own range).
    """
    image = np.asarray(image)
    if image.dtype.kind not in "ui" or cfg.params.get("full_scale") or image.size == 0:
        return None
    top, peak = float(np.iinfo(image.dtype).max), float(np.max(image))
    if peak >= top / 8 or peak <= 0:  # well used, or blank
        return None
    return (
        f"the image reaches only {peak:g} of its {image.dtype} range {top:g}, and the degradation's noise "
        f"is relative to {top:g}: it is degraded as a very dim acquisition. If that is not meant, give "
        f"the intensity its noise refers to (--params '{{\"full_scale\": {peak:g}}}') or save it as float32."
    )


def _per_slice(fn, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply ``fn(slice2d, rng)`` to every 2D slice with independent random streams."""
    if image.ndim == 2:
        return fn(image, rng)
    lead = image.shape[:-2]
    flat = image.reshape((-1,) + image.shape[-2:])
    # Child streams seeded from the parent's draws (not Generator.spawn, whose counter is
    # not part of bit_generator.state), so a saved generator state replays exactly.
    children = [np.random.default_rng(s) for s in rng.integers(0, 2**63, size=flat.shape[0])]
    out = [fn(s, r) for s, r in zip(flat, children, strict=True)]
    return np.stack(out).reshape(lead + out[0].shape)


# ------------------------------------------------------------------------ undersampling
def point_sample(image: np.ndarray, scale: int, *, blur_sigma: float = 0.0) -> np.ndarray:
    """Point-scan undersampling: sample the (optionally probe-blurred) image at LR pixel centres.

    For odd ``scale`` the centre is an HR pixel; for even ``scale`` it falls between four
    HR pixels and their mean (bilinear value at the centre) is taken.

    Parameters
    ----------
    image : ndarray
        HR image, ``(..., Y, X)``.
    scale : int
        Integer undersampling factor >= 2.
    blur_sigma : float
        Gaussian probe / PSF sigma in HR pixels (0: an ideal point probe).

    Returns
    -------
    ndarray
        float32 ``(..., Y // scale, X // scale)``.
    """
    scale = _check_scale(scale)
    blur_sigma = _check_nonneg("blur_sigma", blur_sigma)
    image = _check_image(image, scale)
    x = image.astype(np.float32, copy=False)
    if blur_sigma > 0:
        sig = (0,) * (x.ndim - 2) + (blur_sigma, blur_sigma)
        x = _gaussian_filter(x, sig, mode="reflect")
    h, w = x.shape[-2:]
    hh, ww = (h // scale) * scale, (w // scale) * scale
    x = x[..., :hh, :ww]
    c = scale // 2
    if scale % 2:
        return np.ascontiguousarray(x[..., c::scale, c::scale], dtype=np.float32)
    a = x[..., c - 1 :: scale, c - 1 :: scale] + x[..., c - 1 :: scale, c::scale]
    b = x[..., c::scale, c - 1 :: scale] + x[..., c::scale, c::scale]
    return ((a + b) * 0.25).astype(np.float32)


def bin_downsample(image: np.ndarray, scale: int) -> np.ndarray:
    """Camera-style binning: the mean of each ``scale x scale`` block, as float32."""
    scale = _check_scale(scale)
    image = _check_image(image, scale)
    h, w = image.shape[-2:]
    hh, ww = (h // scale) * scale, (w // scale) * scale
    x = image[..., :hh, :ww].astype(np.float32, copy=False)
    x = x.reshape(x.shape[:-2] + (hh // scale, scale, ww // scale, scale))
    return x.mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)


def linear_downsample(image: np.ndarray, scale: int) -> np.ndarray:
    """Linear zoom by ``1/scale`` without anti-aliasing (the original PSSR's last step).

    Pixel-centre aligned (the shared geometry): the value at HR coordinate
    ``i*s + (s-1)/2`` by linear interpolation, so identical to :func:`point_sample`
    without blur.
    """
    return point_sample(image, scale, blur_sigma=0.0)


def undersample(
    image: np.ndarray, scale: int, *, mode: Mode = "point", blur_sigma: float = 0.0
) -> np.ndarray:
    """Undersample with ``mode`` in ``{"point", "bin", "linear"}`` (see the functions above)."""
    if mode not in _MODES:
        raise PssrError(f"mode={mode!r} is not a known undersampling mode; use one of {_MODES}.")
    if mode == "bin":
        if blur_sigma:
            image = _gaussian_filter(
                np.asarray(image, np.float32),
                (0,) * (np.ndim(image) - 2) + (blur_sigma, blur_sigma),
            )
        return bin_downsample(image, scale)
    if mode == "linear":
        return (
            linear_downsample(image, scale)
            if not blur_sigma
            else point_sample(image, scale, blur_sigma=blur_sigma)
        )
    return point_sample(image, scale, blur_sigma=blur_sigma)


# ---------------------------------------------------------------------------- noise
def _shot_and_read(
    x: np.ndarray, rng: np.random.Generator, dose: float, read_sigma: float, fs: float
) -> np.ndarray:
    """Poisson counts at ``dose`` per full-scale pixel plus Gaussian read noise, in x's units."""
    out = x
    if np.isfinite(dose) and dose > 0:
        lam = np.clip(x / fs, 0, None) * dose
        out = rng.poisson(lam).astype(np.float32) * np.float32(fs / dose)
        # Negative input (offset-subtracted data) keeps its sign without shot noise.
        out = np.where(x < 0, x, out)
    if read_sigma > 0:
        out = out + rng.normal(0.0, read_sigma * fs, size=x.shape).astype(np.float32)
    return out.astype(np.float32, copy=False)


def em_point_scan(
    image: np.ndarray,
    scale: int = 4,
    *,
    dose: float = 40.0,
    read_sigma: float = 0.02,
    probe_sigma: float = 1.0,
    mode: Mode = "point",
    full_scale: float | None = None,
    rng: None | int | np.random.Generator = None,
) -> np.ndarray:
    """Simulate a point-scanning EM acquisition at ``scale`` times the HR pixel size.

    Parameters
    ----------
    image : ndarray
        HR image ``(..., Y, X)``, uint8 / uint16 / float.
    scale : int
        Pixel-size factor (2, 3, 4, 8...).
    dose : float
        Detected electrons per pixel at full-scale intensity (Poisson-like
        signal-dependent noise); ``inf`` disables shot noise.  Lower is noisier.
    read_sigma : float
        Gaussian detector noise sigma as a fraction of full scale.
    probe_sigma : float
        Gaussian probe sigma in HR pixels.
    mode : {"point", "bin", "linear"}
        How pixels are undersampled (a scanner samples points).
    full_scale : float, optional
        Intensity that ``dose`` and ``read_sigma`` refer to (see :func:`full_scale_of`).
    rng : None, int or numpy.random.Generator
        Seed or generator; leading axes get independent noise.

    Returns
    -------
    ndarray
        float32 ``(..., Y // scale, X // scale)`` in the input's intensity units.
    """
    if not dose > 0:
        raise PssrError(f"dose={dose} must be > 0 electrons per full-scale pixel (inf: no shot noise).")
    _check_nonneg("read_sigma", read_sigma)
    image = _check_image(image, _check_scale(scale))
    fs = float(full_scale) if full_scale else full_scale_of(image)
    lr = undersample(image, scale, mode=mode, blur_sigma=probe_sigma)
    return _per_slice(lambda s, r: _shot_and_read(s, r, dose, read_sigma, fs), lr, _rng(rng))


def fluo_point_scan(
    image: np.ndarray,
    scale: int = 4,
    *,
    photons: float = 30.0,
    read_sigma: float = 0.01,
    psf_sigma: float = 1.5,
    salt_pepper: float = 0.0,
    mode: Mode = "point",
    full_scale: float | None = None,
    rng: None | int | np.random.Generator = None,
) -> np.ndarray:
    """Simulate a confocal (point-scanning fluorescence) acquisition with less light.

    Parameters
    ----------
    image : ndarray
        HR image ``(..., Y, X)``.
    scale : int
        Pixel-size factor.
    photons : float
        Detected photons per pixel at full-scale intensity (Poisson shot noise).
    read_sigma : float
        Gaussian read noise sigma, fraction of full scale.
    psf_sigma : float
        Gaussian PSF sigma in HR pixels (0: none).
    salt_pepper : float
        Fraction of pixels set to 0 plus the same fraction set to full scale (hot pixels).
    mode : {"point", "bin", "linear"}
        Undersampling mode.
    full_scale : float, optional
        Intensity the noise parameters refer to.
    rng : None, int or numpy.random.Generator
        Seed or generator.

    Returns
    -------
    ndarray
        float32 ``(..., Y // scale, X // scale)`` in the input's units.
    """
    if not photons > 0:
        raise PssrError(f"photons={photons} must be > 0 photons per full-scale pixel.")
    _check_nonneg("read_sigma", read_sigma)
    if not 0 <= salt_pepper < 0.5:
        raise PssrError(f"salt_pepper={salt_pepper} must be in [0, 0.5).")
    image = _check_image(image, _check_scale(scale))
    fs = float(full_scale) if full_scale else full_scale_of(image)
    lr = undersample(image, scale, mode=mode, blur_sigma=psf_sigma)

    def one(s: np.ndarray, r: np.random.Generator) -> np.ndarray:
        out = _shot_and_read(s, r, photons, read_sigma, fs)
        if salt_pepper > 0:
            u = r.random(s.shape)
            out[u < salt_pepper] = 0.0
            out[u > 1 - salt_pepper] = fs
        return out

    return _per_slice(one, lr, _rng(rng))


def _localvar_noise(
    x: np.ndarray, factor: float, sigma: float, fs: float, rng: np.random.Generator
) -> np.ndarray:
    """Gaussian noise with variance ``factor * gaussian(x/fs, sigma)`` (in full-scale units)."""
    xn = x / fs
    var = factor * np.clip(_gaussian_filter(xn, sigma, mode="nearest"), 0, None)
    return ((xn + rng.normal(size=x.shape) * np.sqrt(var)) * fs).astype(np.float32)


def pssr_em(
    image: np.ndarray,
    scale: int = 4,
    *,
    var_factor: float = 0.05,
    full_scale: float | None = None,
    rng: None | int | np.random.Generator = None,
) -> np.ndarray:
    """The original PSSR EM degradation (Fang et al. 2021).

    Local-variance Gaussian noise with variance ``var_factor * gaussian(img, sigma=3)``
    (image scaled to [0, 1] by full scale) added at high resolution, then linear zoom
    by ``1/scale``.  One deliberate difference: the zoom is pixel-centre aligned (the
    package's shared geometry) instead of scipy ``zoom``'s corner alignment, and the
    result is not clipped to [0, 1] (PSSR's ``random_noise`` clipped).
    """
    _check_nonneg("var_factor", var_factor)
    image = _check_image(image, _check_scale(scale))
    fs = float(full_scale) if full_scale else full_scale_of(image)

    def one(s: np.ndarray, r: np.random.Generator) -> np.ndarray:
        noisy = _localvar_noise(s.astype(np.float32), var_factor, 3.0, fs, r)
        return linear_downsample(noisy, scale)

    return _per_slice(one, image, _rng(rng))


def pssr_fluo(
    image: np.ndarray,
    scale: int = 4,
    *,
    salt_pepper: float = 0.005,
    var_factor: float = 0.5,
    full_scale: float | None = None,
    rng: None | int | np.random.Generator = None,
) -> np.ndarray:
    """The original PSSR fluorescence degradation.

    Salt and pepper (``salt_pepper`` of the pixels each), then local-variance Gaussian
    noise with variance ``var_factor * gaussian(img, sigma=5)``, then linear zoom by
    ``1/scale`` (pixel-centre aligned, unclipped; see :func:`pssr_em`).
    """
    _check_nonneg("var_factor", var_factor)
    if not 0 <= salt_pepper < 0.5:
        raise PssrError(f"salt_pepper={salt_pepper} must be in [0, 0.5).")
    image = _check_image(image, _check_scale(scale))
    fs = float(full_scale) if full_scale else full_scale_of(image)

    def one(s: np.ndarray, r: np.random.Generator) -> np.ndarray:
        x = s.astype(np.float32, copy=True)
        u = r.random(x.shape)
        x[u < salt_pepper] = 0.0
        x[u > 1 - salt_pepper] = fs
        noisy = _localvar_noise(x, var_factor, 5.0, fs, r)
        return linear_downsample(noisy, scale)

    return _per_slice(one, image, _rng(rng))


# ------------------------------------------------------------------------ configs/presets
@dataclass(frozen=True)
class CrappifierConfig:
    """A named degradation with its parameters; saved with every model.

    ``kind`` picks the function (``em``: :func:`em_point_scan`, ``fluo``:
    :func:`fluo_point_scan`, ``pssr-em``: :func:`pssr_em`, ``pssr-fluo``:
    :func:`pssr_fluo`).  ``params`` are its keyword arguments.  ``jitter`` maps a
    noise parameter name to a ``(low, high)`` range of multipliers drawn log-uniformly
    per call, so training sees a range of noise strengths as real low-dose scans vary.

    Examples
    --------
    >>> import numpy as np
    >>> cfg = CrappifierConfig("em", scale=4, params={"dose": 50.0})
    >>> hr = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    >>> crappify(hr, cfg, rng=0).shape
    (16, 16)
    """

    kind: str
    scale: int = 4
    params: dict[str, Any] = field(default_factory=dict)
    jitter: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise PssrError(f"crappifier kind={self.kind!r} is unknown; use one of {_KINDS}.")
        _check_scale(self.scale)
        fn = _FUNCS[self.kind]
        allowed = set(_defaults(self.kind)) | {"full_scale"}
        bad = set(self.params) - allowed
        if bad:
            raise PssrError(
                f"unknown parameter(s) {sorted(bad)} for crappifier {self.kind!r}; "
                f"allowed: {sorted(allowed)}."
            )
        for name, (lo, hi) in self.jitter.items():
            if name not in allowed:
                raise PssrError(f"jitter names {name!r}, not a parameter of {self.kind!r}.")
            if not 0 < lo <= hi:
                raise PssrError(f"jitter[{name!r}]=({lo}, {hi}) must satisfy 0 < low <= high.")
        # Validate parameter values eagerly on a tiny image.
        fn(np.zeros((self.scale, self.scale), np.float32), self.scale, rng=0, **self.params)

    def __call__(
        self, image: np.ndarray, *, rng: None | int | np.random.Generator = None, **override: Any
    ) -> np.ndarray:
        """Crappify ``image`` (see the module docstring for units and geometry)."""
        rng = _rng(rng)
        params = {**self.params, **override}
        for name, (lo, hi) in self.jitter.items():
            base = params.get(name, _defaults(self.kind)[name])
            params[name] = base * float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        return _FUNCS[self.kind](image, self.scale, rng=rng, **params)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in model metadata)."""
        d = dataclasses.asdict(self)
        d["jitter"] = {k: list(v) for k, v in self.jitter.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CrappifierConfig:
        """Inverse of :meth:`to_dict`."""
        extra = set(d) - {"kind", "scale", "params", "jitter"}
        if extra:
            raise PssrError(f"unknown crappifier config key(s) {sorted(extra)}.")
        jit = {k: tuple(v) for k, v in d.get("jitter", {}).items()}
        return cls(d["kind"], int(d.get("scale", 4)), dict(d.get("params", {})), jit)

    def full_params(self) -> dict[str, Any]:
        """Parameters with the function defaults filled in."""
        return {**_defaults(self.kind), **self.params}

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


_FUNCS = {"em": em_point_scan, "fluo": fluo_point_scan, "pssr-em": pssr_em, "pssr-fluo": pssr_fluo}


def _defaults(kind: str) -> dict[str, Any]:
    fn = _FUNCS[kind]
    return {k: v for k, v in (fn.__kwdefaults__ or {}).items() if k not in ("rng", "full_scale")}


PRESETS: dict[str, dict[str, Any]] = {
    "em": {"kind": "em", "params": {}},
    "fluo": {"kind": "fluo", "params": {}},
    "pssr-em": {"kind": "pssr-em", "params": {}},
    "pssr-fluo": {"kind": "pssr-fluo", "params": {}},
}


def noise_params(preset: str, fit: dict[str, float], scale: int = 4) -> dict[str, float]:
    """Crappifier parameters of a preset that reproduce a noise fit (:func:`estimate_noise`).

    ``em`` takes the fitted ``dose``, ``fluo`` the same number as ``photons``; both take ``read_sigma``,
    and ``full_scale``: the fit's parameters are fractions of the intensity it was made at, so the
    degradation adds the same noise in intensity units (the fitted image's detector units) to any
    image, whatever its dtype.

    The original PSSR presets (``pssr-em``, ``pssr-fluo``, the built-in ``em`` model's degradation)
    keep their blur and sampling and get only their noise level refitted: their local-variance noise
    has LR variance ``r * var_factor * mean`` (``r`` = 1/4 for an even ``scale``, whose linear zoom
    averages 2x2 HR pixels, 1 for an odd one; see :func:`lr_noise_variance`), with no constant term,
    so the fitted ``gain * mean + sigma**2`` is matched at the fitted image's mean intensity
    (``fit["mean"]``): ``var_factor = (gain + sigma**2 / mean) / r``. Exact for pure shot noise; with
    read noise, dark pixels get less and bright ones more than the fit says.

    Examples
    --------
    >>> fit = {"gain": 0.01, "sigma": 0.0, "dose": 100.0, "read_sigma": 0.0, "full_scale": 255.0, "mean": 0.4}
    >>> noise_params("em", fit)
    {'dose': 100.0, 'read_sigma': 0.0, 'full_scale': 255.0}
    >>> noise_params("pssr-em", fit, scale=4)
    {'var_factor': 0.04, 'full_scale': 255.0}
    """
    if preset in ("pssr-em", "pssr-fluo"):
        mean = fit.get("mean")
        if mean is None or not np.isfinite(mean) or mean <= 0:
            raise PssrError(
                f"the noise fit {fit} has no positive mean intensity ('mean', a fraction of full scale), "
                f"which the {preset!r} degradation's signal-dependent noise is matched at; fit it with "
                "estimate_noise (pssr fit-noise) on an image that is not blank."
            )
        r = 0.25 if _check_scale(scale) % 2 == 0 else 1.0
        out = {"var_factor": (float(fit["gain"]) + float(fit["sigma"]) ** 2 / float(mean)) / r}
    elif preset in ("em", "fluo"):
        key = {"em": "dose", "fluo": "photons"}[preset]
        out = {key: float(fit["dose"]), "read_sigma": float(fit["read_sigma"])}
    else:
        raise PssrError(f"preset={preset!r} is unknown; a noise fit maps onto one of {sorted(PRESETS)}.")
    if fit.get("full_scale"):  # estimate_noise's fits always say the intensity they are relative to
        out["full_scale"] = float(fit["full_scale"])
    return out


def get_preset(name: str, scale: int = 4, **params: Any) -> CrappifierConfig:
    """A :class:`CrappifierConfig` for preset ``name`` (``em``, ``fluo``, ``pssr-em``, ``pssr-fluo``).

    Examples
    --------
    >>> cfg = get_preset("fluo", scale=2)
    >>> cfg.kind, cfg.scale
    ('fluo', 2)
    """
    if name not in PRESETS:
        raise PssrError(f"preset={name!r} is unknown; use one of {sorted(PRESETS)}.")
    p = PRESETS[name]
    return CrappifierConfig(p["kind"], scale, {**p["params"], **params})


def crappify(
    image: np.ndarray,
    preset: str | CrappifierConfig = "em",
    *,
    scale: int = 4,
    rng: None | int | np.random.Generator = None,
    **params: Any,
) -> np.ndarray:
    """Degrade ``image`` with a preset (or a config); float32 LR in the input's units."""
    cfg = preset if isinstance(preset, CrappifierConfig) else get_preset(preset, scale, **params)
    return cfg(image, rng=rng)


# -------------------------------------------------------------------- noise variance model
def lr_noise_variance(cfg: CrappifierConfig, mean: np.ndarray, full_scale: float) -> np.ndarray:
    """Expected noise variance of an LR pixel whose noise-free value is ``mean``.

    Used by the fidelity check.  Exact for the ``em``/``fluo`` kinds (Poisson +
    Gaussian, salt-and-pepper ignored); for the PSSR presets the local-variance noise
    is added at HR and averaged by the linear zoom (variance divided by 4 for even
    scales, unchanged for odd ones).
    """
    p = cfg.full_params()
    full_scale = float(p.get("full_scale") or full_scale)  # a fitted noise keeps the intensity it was fit at
    m = np.clip(np.asarray(mean, np.float32) / full_scale, 0, None)
    if cfg.kind in ("em", "fluo"):
        dose = p["dose"] if cfg.kind == "em" else p["photons"]
        var = m / dose + p["read_sigma"] ** 2
    else:
        red = 0.25 if cfg.scale % 2 == 0 else 1.0
        var = red * p["var_factor"] * m
    return (var * full_scale**2).astype(np.float32)


# ------------------------------------------------------------------------- noise fitting
def estimate_noise(
    image: np.ndarray,
    *,
    full_scale: float | None = None,
    block: int = 8,
    n_bins: int = 16,
) -> dict[str, float]:
    """Estimate Poisson gain and Gaussian sigma of a real (low-resolution) image.

    Fits the noise model ``var = gain * mean + sigma**2`` (in units of full scale) by
    weighted least squares over flat regions: the diagonal Haar detail of each 2x2
    cell has the noise variance and almost no smooth signal; cells are grouped in
    ``block x block`` tiles; per intensity bin the flattest half of the tiles (least
    horizontal/vertical detail) give the bin's variance.

    Returns
    -------
    dict
        ``gain``, ``sigma`` (fractions of full scale), ``dose`` (= 1/gain, the ``em``
        crappifier's parameter, ``inf`` when no shot noise is found), ``read_sigma``
        (= sigma), ``full_scale`` and ``mean`` (the image's mean intensity, a fraction of
        full scale: where :func:`noise_params` matches the PSSR presets' noise).

    Examples
    --------
    Photon counts (Poisson, no read noise) on a 0..1000 scale: a dose near 1000 counts at full scale.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> counts = rng.poisson(np.linspace(50, 500, 128) * np.ones((128, 1))).astype(np.uint16)
    >>> noise = estimate_noise(counts, full_scale=1000)
    >>> 800 < noise["dose"] < 1200, noise["read_sigma"] < 1e-3
    (True, True)
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise PssrError(
            f"estimate_noise takes one 2D image; got {image.ndim} dimensions "
            f"(shape {image.shape}). Pass a single slice or frame."
        )
    if min(image.shape) < 4 * block:
        raise PssrError(
            f"image {image.shape} is too small to fit noise; need at least {4 * block} px per side."
        )
    _check_image(image, 2)
    fs = float(full_scale) if full_scale else full_scale_of(image)
    x = image.astype(np.float32) / fs
    h, w = x.shape
    h, w = h - h % 2, w - w % 2
    a, b = x[0:h:2, 0:w:2], x[0:h:2, 1:w:2]
    c, d = x[1:h:2, 0:w:2], x[1:h:2, 1:w:2]
    mean = (a + b + c + d) * 0.25
    hh = (a - b - c + d) * 0.5  # variance sigma^2 for white noise
    grad = np.abs(a + b - c - d) + np.abs(a - b + c - d)  # signal structure (plus noise)
    bh, bw = (mean.shape[0] // block) * block, (mean.shape[1] // block) * block

    def tiles(v: np.ndarray) -> np.ndarray:
        return (
            v[:bh, :bw]
            .reshape(bh // block, block, bw // block, block)
            .swapaxes(1, 2)
            .reshape(-1, block * block)
        )

    tm = tiles(mean).mean(1)
    tv = tiles(hh).var(1, ddof=1)
    tg = tiles(grad).mean(1)
    edges = np.quantile(tm, np.linspace(0, 1, n_bins + 1))
    ms, vs, ws = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (tm >= lo) & (tm <= hi)
        if sel.sum() < 8:
            continue
        flat = sel & (tg <= np.median(tg[sel]))
        if flat.sum() < 4:
            continue
        ms.append(np.median(tm[flat]))
        vs.append(np.median(tv[flat]) / _median_chi2_ratio(block * block))
        ws.append(flat.sum())
    if len(ms) < 2:
        if n_bins > 2:  # a small image: fewer, fuller intensity bins (unchanged where 16 suffice)
            return estimate_noise(image, full_scale=fs, block=block, n_bins=max(2, n_bins // 2))
        raise PssrError(
            f"could not find enough flat regions in an image of {image.shape} px to fit the noise "
            f"(at least two intensity levels with 8 tiles of {2 * block}x{2 * block} px each, 4 of them "
            "flat); use a larger image, or give the noise explicitly."
        )
    ms_a, vs_a, ws_a = np.array(ms), np.array(vs), np.sqrt(np.array(ws, float))
    A = np.stack([ms_a, np.ones_like(ms_a)], 1) * ws_a[:, None]
    gain, off = np.linalg.lstsq(A, vs_a * ws_a, rcond=None)[0]
    if gain < 0:  # no signal dependence: pure Gaussian
        gain, off = 0.0, float(np.average(vs_a, weights=ws_a))
    if off < 0:  # no measurable read noise: refit through the origin
        off = 0.0
        gain = float(np.sum(ws_a**2 * ms_a * vs_a) / np.sum(ws_a**2 * ms_a**2))
    sigma = float(np.sqrt(off))
    return {
        "gain": float(gain),
        "sigma": sigma,
        "dose": float(1.0 / gain) if gain > 0 else float("inf"),
        "read_sigma": sigma,
        "full_scale": fs,
        "mean": float(np.mean(x, dtype=np.float64)),
    }


@functools.lru_cache
def _median_chi2_ratio(n: int) -> float:
    """Median of the sample variance of n Gaussian draws, as a fraction of the true variance."""
    from scipy.stats import chi2

    return float(chi2.median(n - 1) / (n - 1))
