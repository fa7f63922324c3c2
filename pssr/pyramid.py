"""The YX pyramid of a restored OME-Zarr output: one definition, used to write and to verify.

Level ``k+1`` is the 2x2 mean of level ``k`` (computed in float32 in a fixed order, then
rounded and clipped for integer outputs), cropped to even sizes.  Each target chunk is
computed by exactly one task from the matching 2x2-chunk region of the level below, so no two
tasks ever write into the same chunk (concurrent partial writes to one chunk lose data).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["cast", "downsample2", "level_shapes", "write_level"]

MIN_SIDE = 64
MAX_LEVELS = 4


def cast(y: np.ndarray, dtype: str | np.dtype) -> np.ndarray:
    """Float values to ``dtype``: rounded and clipped for integers, as they are for floats."""
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        return np.clip(np.rint(y), info.min, info.max).astype(dt)
    return np.asarray(y).astype(dt)


def downsample2(a: np.ndarray, dtype: str | np.dtype) -> np.ndarray:
    """2x2 mean over the last two axes (even-cropped), in float32, cast to ``dtype``."""
    h, w = a.shape[-2:]
    a = np.asarray(a[..., : h // 2 * 2, : w // 2 * 2], np.float32)
    s = (a[..., 0::2, 0::2] + a[..., 1::2, 0::2]) + (a[..., 0::2, 1::2] + a[..., 1::2, 1::2])
    return cast(s * np.float32(0.25), dtype)


def level_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of all levels, level 0 first: halve YX while the smaller side stays >= 64, at most 4."""
    shapes = [tuple(shape)]
    while len(shapes) < MAX_LEVELS:
        *lead, h, w = shapes[-1]
        if min(h, w) // 2 < MIN_SIDE:
            break
        shapes.append((*lead, h // 2, w // 2))
    return shapes


def chunk_regions(shape: tuple[int, ...], chunks: tuple[int, ...]):
    """Every chunk of an array as a tuple of slices (C order)."""
    grids = [range(0, n, c) for n, c in zip(shape, chunks, strict=True)]
    for starts in np.ndindex(*(len(g) for g in grids)):
        yield tuple(
            slice(g[i], min(g[i] + c, n)) for i, g, c, n in zip(starts, grids, chunks, shape, strict=True)
        )


def source_region(region: tuple[slice, ...]) -> tuple[slice, ...]:
    """The region of the level below that a target region is computed from."""
    *lead, ys, xs = region
    return (*lead, slice(2 * ys.start, 2 * ys.stop), slice(2 * xs.start, 2 * xs.stop))


def write_level(below: Any, target: Any, *, workers: int = 2) -> None:
    """Fill ``target`` (zarr) chunk by chunk from ``below`` (zarr), one task per target chunk."""
    from concurrent.futures import ThreadPoolExecutor

    dtype = target.dtype

    def one(region: tuple[slice, ...]) -> None:
        target[region] = downsample2(np.asarray(below[source_region(region)]), dtype)

    regions = list(chunk_regions(target.shape, target.chunks))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        for _ in ex.map(one, regions):
            pass
