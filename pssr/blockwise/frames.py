"""Neighbour frames of a multi-frame (PSSR-MF) window: registration, agreement, disagreement.

A window is ``(F, h, w)``: frames ``t-k..t+k`` of the input, normalised as the network sees
them, the centre frame at index ``F // 2``.  These functions look only at the input, never at
the network: they decide how far the neighbours can be trusted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pssr.errors import PssrError

__all__ = [
    "AUTO",
    "REGISTRATION",
    "agreement_weights",
    "agreement_window",
    "auto_settings",
    "disagreement",
    "prepare",
    "register_window",
]

REGISTRATION = ("phase", "tvl1", "ilk")
# Local differences are measured after a Gaussian blur of this sigma (input pixels), so that
# noise alone does not read as disagreement.
BLUR_SIGMA = 1.0


def _check(win: np.ndarray) -> np.ndarray:
    win = np.asarray(win, np.float32)
    if win.ndim != 3 or win.shape[0] % 2 == 0:
        raise PssrError(
            f"a frame window must be (F, h, w) with an odd number of frames F, got shape {win.shape}; "
            "pass frames t-k..t+k with the centre frame in the middle."
        )
    return win


def _blur(a: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a, (0,) * (a.ndim - 2) + (BLUR_SIGMA, BLUR_SIGMA), mode="nearest")  # per frame


def register_window(win: np.ndarray, method: str = "phase") -> np.ndarray:
    """Every neighbour of ``win`` moved onto the centre frame (the centre is returned unchanged).

    ``phase``: one global shift per neighbour (scikit-image ``phase_cross_correlation`` of the
    Hann-windowed frames, 1/10 pixel); ``tvl1`` / ``ilk``: a dense optical flow per neighbour (scikit-image
    ``optical_flow_tvl1`` / ``optical_flow_ilk``), the neighbour warped along it. Pixels brought in
    from outside the frame repeat the edge.
    """
    from scipy.ndimage import map_coordinates, shift
    from skimage.filters import window
    from skimage.registration import optical_flow_ilk, optical_flow_tvl1, phase_cross_correlation

    win = _check(win)
    if method not in REGISTRATION:
        raise PssrError(f"registration {method!r} is not one of {REGISTRATION}; pick one of those.")
    c = win.shape[0] // 2
    ref = win[c]
    out = win.copy()
    hann = window("hann", ref.shape)
    rows, cols = np.meshgrid(np.arange(ref.shape[0]), np.arange(ref.shape[1]), indexing="ij")
    for i in range(win.shape[0]):
        if i == c:
            continue
        mov = win[i]
        if method == "phase":
            if np.ptp(ref) == 0 or np.ptp(mov) == 0:
                continue  # nothing to correlate: a flat frame stays where it is
            # a Hann window and the mean removed: without them the frame's edges (not periodic)
            # dominate the correlation and small frames register to ~0 shift
            s = phase_cross_correlation(
                (ref - ref.mean()) * hann, (mov - mov.mean()) * hann, upsample_factor=10, normalization=None
            )[0]
            out[i] = shift(mov, s, order=1, mode="nearest")
        else:
            flow = optical_flow_tvl1 if method == "tvl1" else optical_flow_ilk
            v, u = flow(ref, mov)
            out[i] = map_coordinates(mov, [rows + v, cols + u], order=1, mode="nearest")
    return out


def disagreement(win: np.ndarray) -> float:
    """How much the neighbours differ from the centre frame: one number per window.

    The mean over neighbours and pixels of ``|blur(neighbour) - blur(centre)|`` (Gaussian blur
    sigma :data:`BLUR_SIGMA` input pixels), in the window's (normalised) units, divided by the
    mean of ``|blur(centre)|`` so that it does not depend on how much of the field is bright:
    0 for a still scene; about 2 when the neighbours show entirely different content.
    """
    win = _check(win)
    if win.shape[0] == 1:
        return 0.0
    b = _blur(win)
    c = win.shape[0] // 2
    diff = np.abs(np.delete(b, c, axis=0) - b[c]).mean()
    ref = np.abs(b[c]).mean()
    return float(diff / ref) if ref > 0 else (0.0 if diff == 0 else float("inf"))


def agreement_weights(win: np.ndarray, tolerance: float = 0.1) -> np.ndarray:
    """Per neighbour and pixel, how far it agrees with the centre frame: ``(F, h, w)`` in [0, 1].

    ``exp(-(d / tolerance)**2)`` with ``d = |blur(neighbour) - blur(centre)|`` in the window's
    normalised units (1 = the input's normalisation range). The centre's weight is 1.
    """
    win = _check(win)
    b = _blur(win)
    c = win.shape[0] // 2
    w = np.exp(-(((b - b[c]) / tolerance) ** 2)).astype(np.float32)
    w[c] = 1.0
    return w


def agreement_window(win: np.ndarray, tolerance: float = 0.1) -> np.ndarray:
    """``win`` with each neighbour pixel blended towards the centre's where they disagree."""
    win = _check(win)
    w = agreement_weights(win, tolerance)
    c = win.shape[0] // 2
    return w * win + (1 - w) * win[c]


def prepare(win: np.ndarray, register: str, threshold: float) -> tuple[np.ndarray, bool, float]:
    """What ``--frames auto`` does with one block's window before the network.

    Returns ``(window, single, d)``: the window with its neighbours registered to the centre
    (``register``, see :func:`register_window`), ``single`` True when their :func:`disagreement`
    ``d`` after registration exceeds ``threshold`` (then the block is restored from its centre
    frame alone, by the single-frame fallback model).
    """
    reg = register_window(win, register)
    d = disagreement(reg)
    return reg, bool(d > threshold), d


# --frames auto for the built-in multi-frame models: the single-frame model a block falls back to,
# the registration and the disagreement threshold.  The threshold is the largest disagreement
# (after registration) of any window of the model's own training frames (MitoCheck and Golgi
# frames 0-23, degraded as in evaluation): the neighbours are trusted as far as the model saw
# them agree in training, no further.  Chosen by scripts/multiframe_unseen.py threshold
# (docs/models/multiframe-unseen.json); the unseen movies played no part in it.
AUTO = {"fluo-mf": {"fallback": "fluo", "register": "ilk", "threshold": 0.231}}


def auto_settings(model_path: str | Path, meta: dict[str, Any], frames: int) -> dict[str, Any]:
    """The ``--frames auto`` settings of a multi-frame model, with the fallback's file and sha256.

    From the model's metadata (``frames_auto``) or, for a built-in, from :data:`AUTO`.
    """
    from pssr.nn.modelfile import builtin_models, resolve_model
    from pssr.util import file_sha256

    if frames < 2:
        raise PssrError(
            f"--frames auto needs a multi-frame model; this one takes {frames} frame: leave --frames out."
        )
    spec = meta.get("frames_auto")
    if spec is None:
        sha = file_sha256(model_path)
        builtins = builtin_models()
        spec = next((v for k, v in AUTO.items() if k in builtins and file_sha256(builtins[k]) == sha), None)
    if spec is None:
        raise PssrError(
            f"--frames auto: the model {model_path} has no single-frame fallback (its metadata has no "
            f"'frames_auto' and it is not one of the built-ins {sorted(AUTO)}); use it without "
            "--frames auto, or use a built-in multi-frame model."
        )
    fb = resolve_model(spec["fallback"])
    return {
        "fallback": str(Path(fb).resolve()),
        "fallback_sha256": file_sha256(fb),
        "register": str(spec["register"]),
        "threshold": float(spec["threshold"]),
    }
