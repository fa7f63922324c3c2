"""Regions of interest: parse ``--region`` / ``--region-world``, snap them to the block grid.

A region is one ``(start, stop)`` pair of input pixels per axis of the input (leading axes, then
Y and X), as in a Python slice.  Written as text, either

* in pixels, ``z0:z1,y0:y1,x0:x1``: the ranges apply to the *last* axes (``y0:y1,x0:x1`` on a
  ZYX input keeps every section), an empty end is the axis' end (``:``, ``100:``, ``:2048``);
  ranges may also be named (``z=0:64,x=1024:``), unnamed axes are whole;
* in world coordinates, ``z=1000:2000,y=4um:8um``: the input's calibrated units (its pixel size
  and origin; an uncalibrated axis counts in pixels), or any length unit as a suffix (``nm``,
  ``um``, ``mm``, ``m``); a pixel belongs to the region when its centre lies in ``[start, stop)``.

Blocks are always those of the whole input's grid (``tile``-pixel cores from pixel 0), so a
region's output is byte for byte the same crop of a whole run: Y and X are *snapped outward* to
that grid (:func:`snap`); the leading axes are exact (a block is one plane).
"""

from __future__ import annotations

import math
import re

from pssr.errors import PredictError

__all__ = ["Region", "box_overlap", "parse_region", "parse_world_region", "snap"]

Region = tuple[tuple[int, int], ...]

_LENGTH = {"nm": 1e-9, "nanometer": 1e-9, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "micrometer": 1e-6,
           "mm": 1e-3, "millimeter": 1e-3, "cm": 1e-2, "centimeter": 1e-2, "m": 1.0, "meter": 1.0,
           "angstrom": 1e-10, "pm": 1e-12, "picometer": 1e-12}  # fmt: skip
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _split(text: str, axes: str, flag: str) -> list[tuple[str | None, str]]:
    parts = [p.strip() for p in str(text).split(",")]
    if not text or not str(text).strip() or any(not p for p in parts):
        raise PredictError(
            f"{flag} {text!r} is empty or has an empty part; give start:stop per axis, e.g. "
            f"{flag} 0:64,0:2048,0:2048 (input pixels, last axes) or z=0:64,y=0:2048."
        )
    out = []
    for p in parts:
        m = re.fullmatch(r"([A-Za-z])\s*=\s*(.*)", p)
        out.append((m.group(1).upper(), m.group(2)) if m else (None, p))
    named = [a for a, _ in out if a is not None]
    if named and len(named) != len(out):
        raise PredictError(f"{flag} {text!r} mixes named (z=...) and unnamed ranges; use one form.")
    if len(out) > len(axes):
        raise PredictError(
            f"{flag} {text!r} has {len(out)} ranges but the input has {len(axes)} axes ({axes})."
        )
    for a in named:
        if a not in axes or named.count(a) > 1:
            raise PredictError(
                f"{flag} {text!r}: axis {a!r} is {'repeated' if a in axes else 'not an axis of the input'} "
                f"(axes {axes}); name each of them at most once."
            )
    if not named:  # positional: the last axes
        out = list(zip(axes[len(axes) - len(out) :], (v for _, v in out), strict=True))
    return out  # type: ignore[return-value]


def _bounds(a: str, lo: int, hi: int, n: int, text: str, flag: str) -> tuple[int, int]:
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        raise PredictError(
            f"{flag} {text!r}: the {a} range selects no pixel of the input (its {a} axis has {n} "
            "pixels, 0 to {n}); give a range inside it with start < stop.".replace("{n}", str(n))
        )
    return lo, hi


def parse_region(text: str, axes: str, shape: tuple[int, ...]) -> Region:
    """A pixel region (``z0:z1,y0:y1,x0:x1``, open ends allowed) as ``(start, stop)`` per axis."""
    flag = "--region"
    ranges = dict(_split(text, axes, flag))
    out = []
    for a, n in zip(axes, shape, strict=True):
        if a not in ranges:
            out.append((0, n))
            continue
        m = re.fullmatch(r"\s*([-+]?\d+)?\s*:\s*([-+]?\d+)?\s*", ranges[a])
        if not m:
            raise PredictError(
                f"{flag} {text!r}: {ranges[a]!r} is not start:stop in whole input pixels (e.g. 0:2048, "
                "1024:, :512); for world coordinates use --region-world."
            )
        lo = int(m.group(1)) if m.group(1) else 0
        hi = int(m.group(2)) if m.group(2) else n
        if lo < 0 or hi < 0:
            raise PredictError(f"{flag} {text!r}: negative pixel index on {a}; pixels count from 0.")
        out.append(_bounds(a, lo, hi, n, text, flag))
    return tuple(out)


def _to_meters(unit: str | None) -> float | None:
    if not unit:
        return None
    return _LENGTH.get(unit.strip().lower())


def parse_world_region(
    text: str,
    axes: str,
    shape: tuple[int, ...],
    scale: dict[str, float],
    origin: dict[str, float],
    unit: str | None,
) -> Region:
    """A world-coordinate region (``z=1000:2000,y=4um:8um``) as pixel ``(start, stop)`` per axis.

    ``scale`` and ``origin`` (the centre of pixel 0) are the input's, in ``unit``; a pixel is in
    the region when its centre lies in ``[start, stop)``.
    """
    flag = "--region-world"
    ranges = dict(_split(text, axes, flag))
    in_m = _to_meters(unit)
    out = []
    for a, n in zip(axes, shape, strict=True):
        if a not in ranges:
            out.append((0, n))
            continue
        m = re.fullmatch(rf"\s*(?:({_NUM})\s*([A-Za-zµ]*))?\s*:\s*(?:({_NUM})\s*([A-Za-zµ]*))?\s*", ranges[a])
        if not m:
            raise PredictError(
                f"{flag} {text!r}: {ranges[a]!r} is not start:stop in world units (e.g. 1000:2000 in the "
                "input's units, or 4um:8.5um)."
            )
        px, o = float(scale.get(a, 1.0)), float(origin.get(a, 0.0))
        bounds = []
        for num, suf, default in ((m.group(1), m.group(2), 0), (m.group(3), m.group(4), n)):
            if num is None:
                bounds.append(default)
                continue
            v = float(num)
            if suf:
                f = _to_meters(suf)
                if f is None or a in "TC":
                    raise PredictError(
                        f"{flag} {text!r}: unknown length unit {suf!r} on {a} (use nm, um, mm or m; "
                        "time and plain numbers take the input's own units)."
                    )
                if in_m is None:
                    raise PredictError(
                        f"{flag} {text!r}: {num}{suf} needs the input's unit, but the input has "
                        f"{'no unit' if not unit else f'the unit {unit!r}'}; give plain numbers (in its "
                        "pixel-size units, pixels if uncalibrated) or use --region in pixels."
                    )
                v = v * f / in_m
            bounds.append(math.ceil((v - o) / px - 1e-9))  # first pixel whose centre is >= v
        out.append(_bounds(a, bounds[0], bounds[1], n, text, flag))
    return tuple(out)


def snap(region: Region, tile: int, shape: tuple[int, ...]) -> Region:
    """The region grown outward to the block grid along Y and X (leading axes unchanged)."""
    *lead, (y0, y1), (x0, x1) = region
    h, w = shape[-2:]
    return (
        *lead,
        (y0 // tile * tile, min(h, -(-y1 // tile) * tile)),
        (x0 // tile * tile, min(w, -(-x1 // tile) * tile)),
    )


def box_overlap(a: Region | list, b: Region | list) -> bool:
    """Whether two regions share a pixel."""
    return len(a) == len(b) and all(p[0] < q[1] and q[0] < p[1] for p, q in zip(a, b, strict=True))


def describe(region: Region, axes: str) -> str:
    """``z 0:64, y 0:2048, x 1024:3072``."""
    return ", ".join(f"{a.lower()} {lo}:{hi}" for a, (lo, hi) in zip(axes, region, strict=True))
