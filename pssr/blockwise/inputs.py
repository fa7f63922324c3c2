"""The input of a restoration: opened lazily, its axes checked, normalised, identified for resuming."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pssr.blockwise import store
from pssr.blockwise.integrity import digest, zarr_sources
from pssr.degrade.crappify import full_scale_of
from pssr.errors import PredictError
from pssr.io import formats as io
from pssr.nn.modelfile import LoadedModel
from pssr.nn.normalization import percentile_norm
from pssr.util import strided_sample

__all__ = ["Input", "content_id", "context_axis", "infer_axes"]


def infer_axes(shape: tuple[int, ...], axes: str | None) -> str:
    """Checked axes (``YX``, ``ZYX``, ``TYX``, ``TZYX``): the given ones, or guessed from ``shape``.

    A ``C`` axis of one channel (as 5D OME-Zarr stores a single channel) is kept as a plane axis.
    """
    if axes:
        axes = axes.upper()
        if "C" in axes and len(axes) == len(shape) and shape[axes.index("C")] != 1:
            raise PredictError(
                f"axes={axes!r}: the channel axis has {shape[axes.index('C')]} channels (shape {shape}); "
                "restore one channel at a time."
            )
        if (
            len(axes) != len(shape)
            or not axes.endswith("YX")
            or not set(axes) <= set("TZCYX")
            or len(set(axes)) != len(axes)
        ):
            raise PredictError(
                f"axes={axes!r} does not fit data of shape {shape}: one letter per dimension "
                "from TZYX (and C for a single channel), each at most once, ending in YX."
            )
        return axes
    default = io.guess_axes(len(shape))
    if not default:
        raise PredictError(
            f"data of shape {shape} has {len(shape)} dimensions; pssr restores 2D images, 3D "
            "stacks/timelapses and TZYX volumes: give its axes (e.g. axes='TCZYX' for one channel "
            "of a 5D array), or select a channel or position first."
        )
    return default


def context_axis(axes: str, frames: int, model_axis: str | None = None) -> int | None:
    """The leading axis a multi-frame model takes its neighbours along (None for one frame).

    ``model_axis`` is what the model was trained along (its metadata's ``context_axis``: "Z" for
    section-context EM models, "T" for timelapse models): used when the input has that axis, so
    an EM section-context model on a TZYX input takes Z neighbours, not time points.  Otherwise
    (an older model recording "T/Z", or the input lacks that axis) T, else Z.
    """
    if frames == 1:
        return None
    lead = axes[:-2]
    if model_axis in ("T", "Z") and model_axis in lead:
        return lead.index(model_axis)
    if "T" in lead:
        return lead.index("T")
    if "Z" in lead:
        return lead.index("Z")
    raise PredictError(
        f"the model takes {frames} frames (t-k..t+k) but the input (axes {axes}) has no time or "
        "z axis; give a timelapse/stack, or use a single-frame model."
    )


def _validate_data(shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype.kind not in "uifb":
        raise PredictError(f"input dtype {dtype} is not numeric; give a grayscale uint8/uint16/float image.")
    h, w = shape[-2:]
    if h < 2 or w < 2:
        raise PredictError(f"input of {h}x{w} pixels is too small to restore (needs at least 2x2).")


def content_id(data: Any, in_path: str | None, in_array: str | None) -> str:
    """What identifies the input's content for resuming.

    Size and mtime of its file (of the zarr array's metadata), or the checksum of an in-memory
    numpy array.
    """
    if isinstance(data, np.ndarray):
        return "blake2b:" + digest(data)
    if hasattr(data, "dask") and hasattr(data, "name"):
        return "dask:" + str(data.name)  # dask's deterministic token of the graph (content for numpy)
    if in_path is None or in_path == "<memory>":
        return ""
    stamp = io.source_stamp(in_path)
    if stamp is not None:  # a URL, an HDF5 dataset, an N5 / precomputed volume
        return stamp
    p = Path(in_path) / (in_array or "")
    p = p / "zarr.json" if p.is_dir() else p
    try:
        st = p.stat()
    except OSError:
        return ""
    return f"{p.name}:{st.st_size}:{st.st_mtime_ns}"


def _first_bad(arr: Any, axes: str) -> str:
    """The first NaN/inf (or beyond float32) pixel of an input, plane by plane, as a message."""
    from pssr.blockwise.engine import bad_pixels, bad_value_message

    for idx in np.ndindex(*arr.shape[:-2]):
        plane = np.asarray(arr[idx])
        bad = bad_pixels(plane) if plane.dtype.kind == "f" else None
        if bad is not None and bad.any():
            y, x = (int(v) for v in np.argwhere(bad)[0])
            where = ", ".join(f"{a}={v}" for a, v in zip(axes[:-2], idx, strict=True))
            return bad_value_message(float(plane[y, x]), f"{where + ', ' if where else ''}y={y}, x={x}")
    return "input contains NaN or infinite values; replace them first (e.g. np.nan_to_num)"


@dataclass
class Input:
    """The input as an array, with its axes, pixel size, origin and where it lies (None: in memory)."""

    data: Any
    arr: Any
    axes: str
    scale: dict[str, float]
    unit: str | None
    path: str | None = None
    array: str | None = None
    origin: dict[str, float] = field(default_factory=dict)
    time_unit: str | None = None

    @classmethod
    def open(cls, data: Any, axes: str | None, storage_options: dict[str, Any] | None = None) -> Input:
        """Wrap an in-memory array, or read a file or URL lazily; check axes, dtype and size."""
        if isinstance(data, io.Image):  # an image read with pssr.io.formats.read_image: its calibration too
            io.check_calibration("the input image (a pssr.io.formats.Image)", data.scale, data.origin)
            img = data.with_axes(infer_axes(tuple(data.shape), axes or data.axes))  # as read_image(axes=)
            src = cls(
                img.data, img.data, img.axes, img.scale, img.unit, origin=img.origin, time_unit=img.time_unit
            )
        elif isinstance(data, zarr.Group):
            raise PredictError(
                f"input is a zarr group ({data.store_path}), not an array: pass its path (an OME-Zarr "
                "image is read with its metadata) or one of its arrays."
            )
        elif not isinstance(data, str | os.PathLike):
            for folder in zarr_sources(data):  # a zarr array of an unfinished output: refused as a path is
                io.check_complete(folder)
            src = cls(data, data, infer_axes(tuple(data.shape), axes), {}, None)
        else:
            img = io.read_image(data, axes=axes, storage_options=storage_options)
            if "C" in img.axes and img.data.shape[img.axes.index("C")] != 1:
                raise PredictError(
                    f"input has a channel axis with {img.data.shape[img.axes.index('C')]} channels (axes "
                    f"{img.axes}, shape {tuple(img.data.shape)}); restore one channel at a time (save each "
                    "channel as its own image), or pass --axes if that axis is really a stack or a timelapse."
                )
            ax = infer_axes(tuple(img.data.shape), img.axes)
            src = cls(data, img.data, ax, img.scale, img.unit, origin=img.origin, time_unit=img.time_unit)
            src.path = io.resolve_source(data)
            if isinstance(img.data, zarr.Array) and src.path == str(Path(data).resolve()):
                # a local zarr: store root and array path inside it (e.g. "s0")
                src.array = img.data.path or None
        _validate_data(src.shape, np.dtype(src.arr.dtype))
        return src

    @property
    def shape(self) -> tuple[int, ...]:
        """The input's shape."""
        return tuple(int(n) for n in self.arr.shape)

    @property
    def input_id(self) -> str:
        """What identifies the input's content when resuming."""
        return content_id(self.data, self.path or "<memory>", self.array)

    def normalisation(self, lm: LoadedModel) -> tuple[float, float, float]:
        """``(lo, hi, full_scale)`` from a strided sample (never the whole volume)."""
        sample = strided_sample(self.arr)
        if not np.all(np.isfinite(sample)):
            raise PredictError(_first_bad(self.arr, self.axes) + ".")
        lo, hi = percentile_norm(sample, lm.normalization)
        kind = np.dtype(self.arr.dtype).kind
        fs = float(np.iinfo(self.arr.dtype).max) if kind in "ui" else full_scale_of(sample)
        return lo, hi, fs

    def stage(self, work: Path) -> Path:
        """Copy an in-memory input into a zarr beside the work store, for dask workers to read."""
        staged = work.with_name(work.name + ".input.zarr")
        store.stage_input(self.arr, staged)
        self.path, self.array = str(staged), None
        self.arr = zarr.open_array(str(staged), mode="r")
        return staged
