"""The one pixel-centre rule of pssr, for every resampling of a calibrated axis.

Low-resolution pixel ``i`` of an image resampled ``s`` times coarser is centred on
high-resolution coordinate ``i*s + (s-1)/2`` (it averages, or samples the middle of, ``s``
pixels).  Every crappifier, baseline, restoration, pyramid level and napari layer places its
pixels by this rule: :func:`coarser` and :func:`finer` turn an axis' pixel size and origin (the
world coordinate of the centre of pixel 0) into those of the resampled axis.
"""

from __future__ import annotations

__all__ = ["coarser", "finer"]


def coarser(size: float, origin: float, s: float) -> tuple[float, float]:
    """Pixel size and origin of an axis ``s`` times coarser (crappified LR, a pyramid level).

    Its pixel 0 covers input pixels ``0 .. s-1``: its centre lies ``(s-1)/2`` input pixels in.
    """
    return size * s, origin + (s - 1) / 2 * size


def finer(size: float, origin: float, s: float) -> tuple[float, float]:
    """Pixel size and origin of an axis ``s`` times finer (a restoration): the inverse of :func:`coarser`.

    Output pixel ``j`` is centred on input coordinate ``(j - (s-1)/2) / s``: the origin moves by
    ``-(s-1)/2`` output pixels.
    """
    out = size / s
    return out, origin - (s - 1) / 2 * out
