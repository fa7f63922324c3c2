"""Training data: lazily sampled patches, synthetic (crappified) or real LR/HR pairs.

A *source* is one image, stack or timelapse seen as ``(N, Y, X)`` planes (N = 1 for a
2D image).  Patches are read by slicing, so a zarr volume is never loaded whole.
Multi-frame (PSSR-MF) samples take planes ``t-k .. t+k`` (edge-replicated at the ends)
as input channels, each crappified with its own noise, and plane ``t`` as the target;
for serial-section EM the same gives z-context.

Normalisation: per source, the ``pmin``/``pmax`` percentiles of the *low-resolution*
data map to 0/1 and the same affine is applied to the HR target, so that at prediction
time (where only LR exists) the input is normalised the same way and the output mapped
back to the input's intensity units.

Each source is split once into a training and a validation region (the last planes of a
stack, or the bottom rows of a single image), so validation scores held-out pixels.

Noise-level conditioning (``noise_map=True``, FFDNet-style): each LR sample gets one more
channel *before* its frames, the expected noise standard deviation of every pixel in
normalised units.  In training it comes from the crappifier's parameters as drawn for
that sample (jitter included); at prediction from a noise fit of the input
(:func:`noise_map_spec`, :func:`add_noise_map`).  Both use one pointwise formula
(:func:`noise_std`), so a map is the same function of the input in training and in use and
tiled prediction stays exact.

Motion augmentation (``motion``, multi-frame only): neighbour frames are shifted and
rotated by small random amounts relative to the target frame, so that a multi-frame model
learns to use neighbours that do not line up (moving cells, drift).
"""

from __future__ import annotations

import logging
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pssr.blockwise.tiling import frame_indices
from pssr.degrade.crappify import CrappifierConfig, full_scale_of
from pssr.errors import PssrError
from pssr.nn.normalization import Normalization, percentile_norm
from pssr.util import Planes, strided_sample

logger = logging.getLogger(__name__)

__all__ = [
    "PairSampler",
    "Source",
    "add_noise_map",
    "load_sources",
    "noise_level",
    "noise_map_spec",
    "noise_std",
]


class Region(NamedTuple):
    """Where patches of one source are drawn from: planes ``[plane0, plane1)``, HR rows ``[row0, row1)``."""

    plane0: int
    plane1: int
    row0: int
    row1: int

    @property
    def area(self) -> int:
        """Planes times rows (patch positions are weighted by it)."""
        return (self.plane1 - self.plane0) * (self.row1 - self.row0)


class Split(StrEnum):
    """Which region a patch comes from (plain strings "train" / "val" work too)."""

    TRAIN = "train"
    VAL = "val"


class Source:
    """One image / stack / timelapse as ``(N, Y, X)`` planes, read lazily."""

    def __init__(
        self, data: Any, name: str = "", axes: str | None = None, axes_known: bool | None = None
    ) -> None:
        if data.ndim == 2:
            data = data[None] if isinstance(data, np.ndarray) else Planes(data)
        if data.ndim != 3:
            raise PssrError(
                f"training source {name or ''} has shape {tuple(data.shape)}; expected a 2D image "
                "or a 3D stack/timelapse (N, Y, X). Split channels or positions first."
            )
        self.data = data
        self.name = name
        self.axes = axes
        # Whether ``axes`` came from metadata or the user (False: guessed from the dimensions).
        self.axes_known = axes is not None if axes_known is None else bool(axes_known and axes)
        self.n, self.h, self.w = (int(v) for v in data.shape)

    def read(self, planes: list[int], y: int, x: int, size_y: int, size_x: int) -> np.ndarray:
        """``(len(planes), size_y, size_x)`` float32 patch (planes may repeat)."""
        uniq = sorted(set(planes))
        lo, hi = uniq[0], uniq[-1] + 1
        block = np.asarray(self.data[lo:hi, y : y + size_y, x : x + size_x], np.float32)
        return block[[p - lo for p in planes]]


def load_sources(paths: list[str | Path] | str | Path, axes: str | None = None) -> list[Source]:
    """Open files and folders (TIFF, PNG, zarr, OME-Zarr) as training sources.

    A folder that is not a zarr store contributes every image file in it (sorted), each
    as its own source.
    """
    from pssr.io import formats as io

    if isinstance(paths, str | Path):
        paths = [paths]
    out: list[Source] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "zarr.json").exists() and not p.name.endswith(".zarr"):
            files = sorted(
                f
                for f in p.iterdir()
                if f.name.lower().endswith(io.TIFF_EXT + io.PNG_EXT + io.ZARR_EXT + tuple(io.VENDOR_EXT))
            )
            if not files:
                raise PssrError(f"folder {str(p)!r} holds no .tif/.png/.zarr/.nd2/.czi/.lif images.")
            out += load_sources(files, axes)
            continue
        img = io.read_image(p, axes=axes)
        if "C" in img.axes:
            raise PssrError(
                f"{str(p)!r} has a channel axis (axes {img.axes}); train on one channel at a time."
            )
        data = img.data
        if data.ndim == 4:  # TZYX: fold T and Z together (each plane is a sample)
            data = np.asarray(data).reshape((-1,) + data.shape[-2:])
        out.append(Source(data, str(p), img.axes, axes_known=axes is not None or not img.axes_guessed))
    return out


def _dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 dihedral transforms of the last two axes."""
    if k >= 4:
        x = x[..., ::-1]
    return np.rot90(x, k % 4, axes=(-2, -1))


class PairSampler:
    """Draw (LR, HR) training patches from sources, synthetic or real.

    Parameters
    ----------
    hr : list of Source
        High-resolution sources.
    scale : int
        Upsampling factor.
    crappifier : CrappifierConfig, optional
        Synthetic mode: LR made on the fly from HR.  Required unless ``lr`` is given.
    lr : list of Source, optional
        Real-pair mode: LR sources matching ``hr`` one to one (same planes, LR size =
        HR size // scale).
    patch : int
        LR patch size (HR patch = ``patch * scale``).
    frames : int
        Input planes (odd): planes ``t-k..t+k``.
    augment : bool
        Dihedral transforms and brightness/contrast jitter.
    extra_noise : float
        Std of extra Gaussian noise added to normalised LR inputs (0: off).
    val_fraction : float
        Fraction of each source held out for validation.
    min_std : float
        Reject patches whose normalised HR std is below this (empty background).
    rng : int or Generator
        Sampling randomness; its state is saved in checkpoints.
    noise_map : bool
        Prepend the expected noise std map as channel 0 of every LR sample (synthetic pairs
        only); the samples are then ``(B, 1 + frames, p, p)``.
    motion : (float, float)
        Multi-frame motion augmentation: neighbour frame ``t+d`` is shifted by up to
        ``motion[0] * |d|`` LR pixels and rotated by up to ``motion[1] * |d|`` degrees about
        the patch centre (uniform, per sample) before degradation.  ``(0, 0)``: off.
    """

    def __init__(
        self,
        hr: list[Source],
        scale: int,
        *,
        crappifier: CrappifierConfig | None = None,
        lr: list[Source] | None = None,
        patch: int = 48,
        frames: int = 1,
        augment: bool = True,
        extra_noise: float = 0.0,
        val_fraction: float = 0.1,
        min_std: float = 0.05,
        norm: Normalization | None = None,
        rng: None | int | np.random.Generator = 0,
        check_registration: bool = True,
        noise_map: bool = False,
        motion: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        if not hr:
            raise PssrError("no training sources given.")
        if frames < 1 or frames % 2 == 0:
            raise PssrError(f"frames={frames} must be odd (t-k..t+k around the target frame).")
        if crappifier is None and lr is None:
            raise PssrError("give a crappifier (synthetic pairs) or LR sources (real pairs).")
        if crappifier is not None and crappifier.scale != scale:
            raise PssrError(f"crappifier scale {crappifier.scale} differs from scale={scale}.")
        if noise_map and crappifier is None:
            raise PssrError(
                "noise_map=True needs synthetic pairs (a crappifier), whose noise level is known "
                "per sample; real LR/HR pairs carry no noise level. Drop noise_map or use a crappifier."
            )
        if len(motion) != 2 or min(motion) < 0 or not np.all(np.isfinite(motion)):
            raise PssrError(f"motion={motion!r} must be (max shift in LR px, max rotation in degrees) >= 0.")
        if any(motion) and (frames == 1 or crappifier is None):
            raise PssrError(
                f"motion={tuple(motion)} moves neighbour frames: it needs frames > 1 (got {frames}) "
                "and synthetic pairs (a crappifier)."
            )
        self.noise_map = bool(noise_map)
        self.motion = (float(motion[0]), float(motion[1]))
        self.hr, self.lr = hr, lr
        self.scale, self.patch, self.frames = scale, patch, frames
        self.crappifier = crappifier
        self.augment, self.extra_noise, self.min_std = augment, extra_noise, min_std
        self.norm = norm or Normalization()
        self.rng = np.random.default_rng(rng)
        hp = patch * scale
        if lr is not None:
            if len(lr) != len(hr):
                raise PssrError(f"{len(lr)} LR sources but {len(hr)} HR sources; pair them one to one.")
            for a, b in zip(lr, hr, strict=True):
                _check_pair(a, b, scale)
        for s in hr:
            if s.h < hp or s.w < hp:
                raise PssrError(
                    f"source {s.name!r} is {s.h}x{s.w} px, smaller than one HR patch "
                    f"({hp}x{hp} = patch {patch} x scale {scale}); use a smaller --patch."
                )
        folded = [s.name for s in hr if s.axes and "T" in s.axes and "Z" in s.axes]
        if frames > 1 and folded:
            # load_sources folds T and Z into one plane axis: neighbours would cross from the last
            # section of one timepoint into the first of the next.
            raise PssrError(
                f"frames={frames} needs one axis of neighbours, but source(s) {folded} have both T and Z "
                "(folded into one plane axis for training); give a single timepoint (ZYX) or a single "
                "section over time (TYX) per file, or train with --frames 1."
            )
        if frames > 1 and any(s.n < 2 for s in hr):
            raise PssrError(
                f"frames={frames} needs stacks or timelapses; source(s) "
                f"{[s.name for s in hr if s.n < 2]} are single images."
            )
        self.regions = [self._split(s, val_fraction) for s in hr]
        self.lohi = [self._norm_for(i) for i in range(len(hr))]
        weights = np.array([train.area for train, _ in self.regions], float)
        self.weights = weights / weights.sum()
        if lr is not None and check_registration:
            for a, b in zip(lr, hr, strict=True):
                registration_warning(a, b, scale)

    # -- geometry
    def _split(self, s: Source, frac: float) -> tuple[Region, Region]:
        """``(train, val)`` regions of a source: its last planes, else its last rows, held out."""
        hp = self.patch * self.scale
        if s.n >= 5 and frac > 0:
            nv = max(1, int(round(s.n * frac)))
            return Region(0, s.n - nv, 0, s.h), Region(s.n - nv, s.n, 0, s.h)
        if frac > 0 and s.h >= 2 * hp:
            cut = max(hp, int(s.h * (1 - max(frac, 0.15))) // self.scale * self.scale)
            cut = min(cut, s.h - hp)
            return Region(0, s.n, 0, cut), Region(0, s.n, cut, s.h)
        if frac > 0:
            logger.warning(
                "source %s (%d planes of %d rows) is too small to hold out a validation region for "
                "%d-px patches: validation patches come from the training region, so validation scores "
                "are not held out; add data or a smaller --patch.",
                s.name or "(array)", s.n, s.h, hp,
            )  # fmt: skip
        return Region(0, s.n, 0, s.h), Region(0, s.n, 0, s.h)

    def _norm_for(self, i: int) -> tuple[float, float]:
        s = self.hr[i]
        if self.lr is not None:
            return percentile_norm(strided_sample(self.lr[i].data), self.norm)
        # LR statistics of a crappified subsample, so that normalisation matches what
        # prediction computes from a real LR input.
        k = max(1, s.n // 4)
        size_y = min(s.h, 1024) // self.scale * self.scale
        size_x = min(s.w, 1024) // self.scale * self.scale
        sample = np.stack([s.read([p], 0, 0, size_y, size_x)[0] for p in range(0, s.n, k)][:4])
        lr = self.crappifier(sample, rng=np.random.default_rng(12345))
        return percentile_norm(lr, self.norm)

    # -- sampling
    def sample(self, batch: int, *, split: Split | str = Split.TRAIN, rng: np.random.Generator | None = None):
        """``(lr, hr)`` float32 arrays ``(B, frames, p, p)`` and ``(B, 1, p*s, p*s)``."""
        rng = rng or self.rng
        if split not in (Split.TRAIN, Split.VAL):
            raise PssrError(f"split={split!r} is unknown; use 'train' or 'val'.")
        lrs, hrs = [], []
        for _ in range(batch):
            lr, hr = self._one(split, rng)
            lrs.append(lr)
            hrs.append(hr)
        return np.stack(lrs), np.stack(hrs)

    def _one(self, split: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        s_, p = self.scale, self.patch
        hp = p * s_
        for attempt in range(20):
            i = int(rng.choice(len(self.hr), p=self.weights))
            src = self.hr[i]
            reg = self.regions[i][0 if split == Split.TRAIN else 1]
            t = int(rng.integers(reg[0], reg[1]))
            y = int(rng.integers(reg[2] // s_, (reg[3] - hp) // s_ + 1)) * s_
            x = int(rng.integers(0, (src.w - hp) // s_ + 1)) * s_
            planes = frame_indices(t, src.n, self.frames)  # mirrored at the ends, as in prediction
            lo, hi = self.lohi[i]
            hr = src.read([t], y, x, hp, hp)
            hr_n = (hr - lo) / (hi - lo)
            if hr_n.std() < self.min_std and attempt < 19:
                continue  # nearly empty background: PSSR rejected these too
            sd = None
            if self.lr is None:
                if any(self.motion) and split == Split.TRAIN:
                    stack = self._moved(src, planes, t, y, x, hp, rng)
                else:
                    stack = src.read(planes, y, x, hp, hp)
                if self.noise_map:
                    lr, sd = self._crappify_with_std(stack, rng)
                else:
                    lr = self.crappifier(stack, rng=rng)  # independent noise per frame
            else:
                lr = self.lr[i].read(planes, y // s_, x // s_, p, p)
            lr_n = (lr - lo) / (hi - lo)
            if sd is not None:
                lr_n = np.concatenate([sd[None] / (hi - lo), lr_n])
            if self.augment and split == Split.TRAIN:
                d = int(rng.integers(8))
                lr_n, hr_n = _dihedral(lr_n, d), _dihedral(hr_n, d)
                a = float(rng.uniform(0.8, 1.2))
                b = float(rng.uniform(-0.1, 0.1))
                if sd is not None:  # the map is a std: scaled by the gain, not shifted
                    lr_n = np.concatenate([lr_n[:1] * a, lr_n[1:] * a + b])
                else:
                    lr_n = lr_n * a + b
                hr_n = hr_n * a + b
            if self.extra_noise > 0 and split == Split.TRAIN:
                if sd is not None:
                    noise = rng.normal(0, self.extra_noise, lr_n[1:].shape)
                    lr_n = np.concatenate([np.sqrt(lr_n[:1] ** 2 + self.extra_noise**2), lr_n[1:] + noise])
                else:
                    lr_n = lr_n + rng.normal(0, self.extra_noise, lr_n.shape)
            return np.ascontiguousarray(lr_n, np.float32), np.ascontiguousarray(hr_n, np.float32)
        raise AssertionError("unreachable")

    def _crappify_with_std(
        self, stack: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Crappify like ``self.crappifier(stack, rng=rng)`` (same draws) and return the noise std map.

        The jitter multipliers are drawn here exactly as :class:`CrappifierConfig` draws them,
        so the LR is bit-identical to a blind sampler's with the same generator; the map is
        :func:`noise_std` of the centre LR frame for the parameters actually used.
        """
        cfg = self.crappifier
        params = cfg.full_params()
        for name, (lo, hi) in cfg.jitter.items():
            params[name] = params[name] * float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        drawn = CrappifierConfig(cfg.kind, cfg.scale, params)
        lr = drawn(stack, rng=rng)
        fs = float(params["full_scale"]) if params.get("full_scale") else full_scale_of(stack)
        gain, sigma = noise_level(drawn)
        return lr, noise_std(lr[len(lr) // 2], gain, sigma, fs)

    def _moved(
        self, src: Source, planes: list[int], t: int, y: int, x: int, hp: int, rng: np.random.Generator
    ) -> np.ndarray:
        """HR planes with neighbours shifted/rotated about the patch centre (motion augmentation).

        A margin around the patch is read (clipped at the source edges) so that moved
        neighbours are filled with real image, not padding.
        """
        from scipy import ndimage

        max_shift, max_rot = self.motion[0] * self.scale, self.motion[1]
        k = self.frames // 2
        m = int(np.ceil(max_shift * k + hp * 0.71 * np.sin(np.radians(max_rot * k)))) + 2
        y0, x0 = max(0, y - m), max(0, x - m)
        y1, x1 = min(src.h, y + hp + m), min(src.w, x + hp + m)
        big = src.read(planes, y0, x0, y1 - y0, x1 - x0)
        out = np.empty((len(planes), hp, hp), np.float32)
        cy, cx = y - y0 + (hp - 1) / 2, x - x0 + (hp - 1) / 2
        for j in range(len(planes)):
            d = abs(j - k)
            if d == 0:
                out[j] = big[j, y - y0 : y - y0 + hp, x - x0 : x - x0 + hp]
                continue
            ang = np.radians(rng.uniform(-max_rot, max_rot) * d)
            sy, sx = rng.uniform(-max_shift, max_shift, 2) * d
            c, s = np.cos(ang), np.sin(ang)
            rot = np.array([[c, -s], [s, c]])
            # output (u, v) of the patch -> input coordinates in `big`
            centre_out = np.array([(hp - 1) / 2, (hp - 1) / 2])
            offset = np.array([cy + sy, cx + sx]) - rot @ centre_out
            out[j] = ndimage.affine_transform(
                big[j], rot, offset=offset, output_shape=(hp, hp), order=1, mode="reflect"
            )
        return out

    def validation_set(self, n: int = 16, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
        """A fixed set of held-out patches (same every call)."""
        return self.sample(n, split="val", rng=np.random.default_rng(seed))

    def describe(self) -> list[dict[str, Any]]:
        """What the data was (stored in the model's metadata)."""
        return [
            {"path": s.name, "shape": [s.n, s.h, s.w], "train_region": list(r[0]), "val_region": list(r[1])}
            for s, r in zip(self.hr, self.regions, strict=True)
        ]


# ------------------------------------------------------------------ noise-level maps
def noise_level(cfg: CrappifierConfig) -> tuple[float, float]:
    """``(gain, sigma)`` of the LR noise of a crappifier: ``var = gain * m + sigma**2``.

    In fractions of full scale (``m``: the noise-free LR value / full scale), the model
    :func:`pssr.degrade.crappify.estimate_noise` fits and :func:`pssr.degrade.crappify.lr_noise_variance`
    evaluates: ``em`` / ``fluo`` ``1 / dose`` (``1 / photons``) and ``read_sigma``; the PSSR
    presets ``var_factor`` (divided by 4 for even scales: the zoom averages 4 HR pixels)
    and no signal-independent part.  Jitter is ignored: pass the parameters actually used.
    """
    p = cfg.full_params()
    if cfg.kind in ("em", "fluo"):
        dose = p["dose"] if cfg.kind == "em" else p["photons"]
        return (0.0 if np.isinf(dose) else 1.0 / float(dose)), float(p["read_sigma"])
    red = 0.25 if cfg.scale % 2 == 0 else 1.0
    return red * float(p["var_factor"]), 0.0


def noise_std(lr: np.ndarray, gain: float, sigma: float, full_scale: float) -> np.ndarray:
    """Expected noise std of each LR pixel, in the image's units (pointwise in ``lr``).

    ``sqrt((gain * max(lr, 0) / full_scale + sigma**2)) * full_scale``.  The noisy value
    stands in for the unknown noise-free one; being pointwise, the map of a tile is the
    tile of the map, so tiled prediction stays exact.
    """
    m = np.clip(np.asarray(lr, np.float32) / np.float32(full_scale), 0, None)
    return (np.sqrt(np.float32(gain) * m + np.float32(sigma) ** 2) * np.float32(full_scale)).astype(
        np.float32
    )


def noise_map_spec(
    noise: str | dict[str, float] = "fit",
    *,
    plane: np.ndarray | None = None,
    crappifier: CrappifierConfig | None = None,
    full_scale: float,
    factor: float = 1.0,
) -> dict[str, float]:
    """The noise level a noise-conditioned model is told at prediction (``gain``, ``sigma``, ``full_scale``).

    Parameters
    ----------
    noise : {"fit", "model"} or dict
        ``"fit"``: :func:`pssr.degrade.crappify.estimate_noise` of ``plane`` (one raw 2D LR plane,
        e.g. the input's first); ``"model"``: the model's nominal crappifier noise; a dict
        with ``gain`` and ``sigma`` (fractions of ``full_scale``): given by the user.
    plane : ndarray, optional
        Required for ``"fit"``.
    crappifier : CrappifierConfig, optional
        Required for ``"model"``.
    full_scale : float
        The intensity gain and sigma refer to (the dtype maximum for integer input).
    factor : float
        Multiplies the noise std (``> 1`` restores more strongly, ``< 1`` keeps more detail).
    """
    if not (np.isfinite(factor) and factor > 0):
        raise PssrError(f"noise factor={factor} must be a finite number > 0 (1: as fitted).")
    if isinstance(noise, dict):
        try:
            gain, sigma = float(noise["gain"]), float(noise["sigma"])
        except KeyError as e:
            raise PssrError(
                f"noise={noise!r} needs keys 'gain' and 'sigma' (fractions of full scale)."
            ) from e
    elif noise == "fit":
        if plane is None:
            raise PssrError("noise='fit' needs a plane of the input to fit the noise on.")
        from pssr.degrade.crappify import estimate_noise

        fit = estimate_noise(np.asarray(plane, np.float32), full_scale=full_scale)
        gain, sigma = fit["gain"], fit["sigma"]
    elif noise == "model":
        if crappifier is None:
            raise PssrError("noise='model' needs the model's crappifier; this model records none.")
        gain, sigma = noise_level(crappifier)
    else:
        raise PssrError(f"noise={noise!r} must be 'fit', 'model' or a dict with 'gain' and 'sigma'.")
    if not (gain >= 0 and sigma >= 0 and np.isfinite(gain) and np.isfinite(sigma)):
        raise PssrError(f"noise gain={gain}, sigma={sigma} must be finite and >= 0.")
    return {"gain": gain * factor**2, "sigma": sigma * factor, "full_scale": float(full_scale)}


def add_noise_map(x: np.ndarray, spec: dict[str, float], *, lo: float, hi: float) -> np.ndarray:
    """Prepend the noise-level map to normalised LR input (what a noise-conditioned model takes).

    Parameters
    ----------
    x : ndarray
        Normalised input ``(frames, h, w)`` or a batch ``(B, frames, h, w)``: raw values
        mapped by ``(raw - lo) / (hi - lo)``, as the model's normalisation does.
    spec : dict
        ``gain``, ``sigma``, ``full_scale`` from :func:`noise_map_spec`.
    lo, hi : float
        The normalisation's percentiles.

    Returns
    -------
    ndarray
        float32 ``(1 + frames, h, w)`` (or ``(B, 1 + frames, h, w)``): channel 0 is the noise
        std of the centre frame's pixels in normalised units.
    """
    x = np.asarray(x, np.float32)
    if x.ndim not in (3, 4):
        raise PssrError(f"add_noise_map takes (frames, h, w) or (B, frames, h, w); got shape {x.shape}.")
    f = x.shape[-3]
    centre = x[..., f // 2, :, :] * np.float32(hi - lo) + np.float32(lo)
    sd = noise_std(centre, spec["gain"], spec["sigma"], spec["full_scale"]) / np.float32(hi - lo)
    return np.concatenate([sd[..., None, :, :], x], axis=-3).astype(np.float32, copy=False)


def _check_pair(lr: Source, hr: Source, scale: int) -> None:
    ok_y = hr.h // scale == lr.h
    ok_x = hr.w // scale == lr.w
    if lr.n != hr.n or not (ok_y and ok_x):
        raise PssrError(
            f"LR {lr.name!r} has shape {(lr.n, lr.h, lr.w)} but HR {hr.name!r} has "
            f"{(hr.n, hr.h, hr.w)}: at scale {scale} the LR must be (N, HR_Y // {scale}, "
            f"HR_X // {scale}) = {(hr.n, hr.h // scale, hr.w // scale)}. Check --scale or the pairing."
        )


def registration_warning(lr: Source, hr: Source, scale: int, tol: float = 0.5) -> tuple[float, float]:
    """Warn when LR and HR of a pair are shifted by more than ``tol`` LR pixels."""
    from skimage.registration import phase_cross_correlation

    p = lr.n // 2
    h, w = min(lr.h, 256), min(lr.w, 256)
    a = lr.read([p], 0, 0, h, w)[0]
    b = hr.read([p], 0, 0, h * scale, w * scale)[0]
    b_lr = b.reshape(h, scale, w, scale).mean((1, 3))
    shift, _, _ = phase_cross_correlation(b_lr, a, upsample_factor=10, normalization=None)
    if max(abs(shift)) > tol:
        warnings.warn(
            f"LR {lr.name!r} and HR {hr.name!r} look shifted by {tuple(float(v) for v in shift)} LR "
            "pixels; register them (training on misaligned pairs blurs the model).",
            UserWarning,
            stacklevel=3,
        )
    return float(shift[0]), float(shift[1])
