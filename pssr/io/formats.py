"""Reading and writing microscopy images: TIFF / OME-TIFF, PNG, zarr v3 and OME-Zarr.

Nikon ND2, Zeiss CZI and Leica LIF files are read through the bioio readers when the
``pssr-toolkit[vendor]`` extra is installed (:func:`read_vendor`).

Everything is returned as an :class:`Image`: the pixel data (a numpy array, or a lazy
zarr array that is only read where sliced), the axes (a string over ``TZYX``, e.g.
``"ZYX"``), the physical pixel size per axis, where pixel 0 lies (the origin) and the units.

Writes are atomic: a file or folder is written under a temporary name in the target's
folder and renamed into place only when complete, so an interrupted write never leaves
something that looks like a finished output.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from pssr.errors import IntegrityError, PssrError, PssrIOError
from pssr.io import remote, volumes
from pssr.util import check_folder, replaceable

logger = logging.getLogger(__name__)

__all__ = [
    "Image",
    "check_output_path",
    "read_image",
    "write_image",
    "write_ome_zarr",
    "write_tiff",
    "ome_zarr_metadata",
    "ngff_transforms",
    "check_calibration",
    "check_complete",
    "check_tiff",
    "replace_path",
    "tiff_record",
    "block_digest",
    "grid_cells",
    "WORK_SUFFIX",
]

TIFF_EXT = (".tif", ".tiff")
PNG_EXT = (".png",)
ZARR_EXT = (".zarr",)
#: Vendor formats read through the bioio readers of the ``vendor`` extra: extension -> (format, module).
VENDOR_EXT = {
    ".nd2": ("Nikon ND2", "bioio_nd2"),
    ".czi": ("Zeiss CZI", "bioio_czi"),
    ".lif": ("Leica LIF", "bioio_lif"),
}
_UNIT_ALIASES = {
    "um": "micrometer",
    "µm": "micrometer",
    "\\u00B5m": "micrometer",
    "micron": "micrometer",
    "nm": "nanometer",
    "mm": "millimeter",
    "cm": "centimeter",
    "m": "meter",
    "Å": "angstrom",
    "\\u00C5": "angstrom",
    "in": "inch",
}


@dataclass
class Image:
    """Pixel data with axes and physical calibration.

    Attributes
    ----------
    data : array-like
        numpy array or lazy zarr array, shape matching ``axes``.
    axes : str
        One letter per dimension from ``T``, ``Z``, ``C``, ``Y``, ``X`` (e.g. ``"TYX"``).
    scale : dict
        Physical size of one pixel per axis (only axes that are calibrated; ``T`` is the
        frame interval).
    unit : str or None
        Unit of the spatial scale, OME-NGFF style (``"micrometer"``, ``"nanometer"``).
    axes_guessed : bool
        True when the file said nothing about its axes and they were guessed from the number
        of dimensions (a plain multi-page TIFF reads as ``ZYX``, whether it is a stack or a
        timelapse); False when they came from metadata or were given.
    origin : dict
        Physical coordinate of the centre of pixel 0 per axis (an OME-Zarr ``translation``, an
        ImageJ ``xorigin``/``yorigin``/``zorigin`` read the same way, as napari places pixels;
        only axes that have one, in the axis' unit).
    time_unit : str or None
        Unit of ``scale["T"]`` and ``origin["T"]`` (``"second"``, ``"millisecond"``, ...).

    Examples
    --------
    >>> import numpy as np
    >>> img = Image(np.zeros((3, 8, 8), np.uint16), "ZYX", scale={"Y": 0.1, "X": 0.1}, unit="micrometer")
    >>> img.data.shape, img.axes
    ((3, 8, 8), 'ZYX')
    """

    data: Any
    axes: str
    scale: dict[str, float] = field(default_factory=dict)
    unit: str | None = None
    axes_guessed: bool = False
    origin: dict[str, float] = field(default_factory=dict)
    time_unit: str | None = None

    def __post_init__(self) -> None:
        if len(self.axes) != self.data.ndim:
            raise PssrError(
                f"axes={self.axes!r} has {len(self.axes)} letters but the data has "
                f"{self.data.ndim} dimensions (shape {tuple(self.data.shape)})."
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the data."""
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        """Dtype of the data."""
        return np.dtype(self.data.dtype)

    def with_axes(self, axes: str) -> Image:
        """The same data read with ``axes``: the calibration of the axes that keep their letter."""
        return Image(
            self.data,
            axes,
            {a: v for a, v in self.scale.items() if a in axes},
            self.unit,
            origin={a: v for a, v in self.origin.items() if a in axes},
            time_unit=self.time_unit if "T" in axes else None,
        )


def _ngff_unit(unit: str | None, aliases: dict[str, str], names: Any, what: str) -> str | None:
    """The OME-NGFF name of a unit (``aliases`` map other spellings); None, with a warning, otherwise."""
    if not unit:
        return None
    name = aliases.get(unit, unit)
    if name not in names:
        logger.warning("%s unit %r is not an OME-NGFF %s unit; kept without a unit", what, unit, what)
        return None
    return name


def _norm_unit(unit: str | None) -> str | None:
    if unit in ("pixel", "pixels", "px"):  # ImageJ's "not calibrated"
        return None
    return _ngff_unit(unit, _UNIT_ALIASES, _METRES, "space")


_TIME_ALIASES = {
    "s": "second",
    "sec": "second",
    "seconds": "second",
    "ms": "millisecond",
    "msec": "millisecond",
    "min": "minute",
    "minutes": "minute",
    "h": "hour",
    "hr": "hour",
    "hours": "hour",
    "us": "microsecond",
    "µs": "microsecond",
    "usec": "microsecond",
    "ns": "nanosecond",
    "nsec": "nanosecond",
    "d": "day",
}


def _norm_time_unit(unit: str | None) -> str | None:
    return _ngff_unit(unit, _TIME_ALIASES, _TIME_UNITS, "time")


def guess_axes(ndim: int) -> str:
    return {2: "YX", 3: "ZYX", 4: "TZYX"}.get(ndim, "")


# --------------------------------------------------------------------------------- read
def read_image(
    path: str | os.PathLike,
    *,
    axes: str | None = None,
    lazy: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Image:
    """Read a TIFF, PNG, zarr array, OME-Zarr, N5, Neuroglancer precomputed or HDF5 image.

    Parameters
    ----------
    path : path-like or URL
        ``.tif``/``.tiff`` (multi-page, ImageJ hyperstack, OME-TIFF), ``.png``, ``.nd2`` /
        ``.czi`` / ``.lif`` (the ``vendor`` extra, :func:`read_vendor`), a zarr v2/v3 array /
        OME-Zarr group, an N5 dataset, a Neuroglancer precomputed volume (scale 0), or
        ``file.h5:/dataset``; local, or (all but TIFF, PNG and HDF5) an ``s3://``, ``gs://`` or
        ``http(s)://`` URL (:mod:`pssr.io.remote`; Neuroglancer's ``precomputed://``, ``n5://``
        and ``zarr://`` prefixes choose the format).  Remote and N5/precomputed/HDF5 data are
        read lazily, block by block (:mod:`pssr.io.volumes`).
    storage_options : dict, optional
        fsspec options for a URL (``endpoint_url``, ``key``, ``secret``, ``anon``...); by
        default the SDKs' environment/profile chain.
    axes : str, optional
        Override the axes found in the metadata (e.g. ``"TYX"`` for a timelapse saved
        as a plain stack).
    lazy : bool
        For zarr: keep the data lazy (default).  TIFF and PNG are read into memory.

    Returns
    -------
    Image

    Examples
    --------
    >>> import numpy as np
    >>> _ = write_image("cells.tif", np.zeros((8, 8), np.uint8), axes="YX", scale={"Y": 0.05, "X": 0.05},
    ...                 unit="micrometer")
    >>> img = read_image("cells.tif")
    >>> img.axes, img.data.shape, img.scale["X"], img.unit
    ('YX', (8, 8), 0.05, 'micrometer')
    """
    kind = _source_kind(path)
    p: Any = Path(path) if kind is None else path
    if kind is None:
        check_complete(p)
    if kind is None and not p.exists():
        raise PssrIOError(f"input {str(p)!r} does not exist; check the path.")
    name = str(p).rstrip("/").lower()
    try:
        if kind is not None:
            img = _read_source(str(path), kind, lazy=lazy, storage_options=storage_options)
        elif p.is_dir() or name.endswith(ZARR_EXT):
            img = _read_zarr(p, lazy=lazy)
        elif name.endswith(TIFF_EXT):
            img = _read_tiff(p)
        elif name.endswith(PNG_EXT):
            img = _read_png(p)
        elif name.endswith(tuple(VENDOR_EXT)):
            img = read_vendor(p, lazy=lazy)
        else:
            raise PssrIOError(
                f"input {str(p)!r} has an unsupported extension; use .tif/.tiff, .png, a .zarr folder, or "
                "(with pssr-toolkit[vendor]) .nd2/.czi/.lif."
            )
    except PssrIOError:
        raise
    except Exception as e:  # corrupt/unreadable files from the libraries
        if kind is not None and remote.is_url(str(path)):
            url = str(path)
            why = remote.bad_option(url, e, storage_options)
            raise (why or remote.probe(url, storage_options) or remote.explain(url, e)) from None
        raise PssrIOError(
            f"cannot read {str(p)!r}: {type(e).__name__}: {e}; the file is damaged or not the format its "
            "name says (re-export it from its source)."
        ) from e
    check_calibration(repr(str(p)), img.scale, img.origin)
    if axes is not None:
        axes = axes.upper()
        if (
            len(axes) != img.data.ndim
            or not set(axes) <= set("TZCYX")
            or not axes.endswith("YX")
            or len(set(axes)) != len(axes)
        ):
            raise PssrIOError(
                f"axes={axes!r} does not fit data of shape {img.shape}: give one letter "
                "per dimension from TZCYX, each at most once, ending in YX."
            )
        img = img.with_axes(axes)
    elif not set(img.axes) <= set("TZCYX") or len(set(img.axes)) != len(img.axes):
        raise PssrIOError(
            f"{str(p)!r} has {img.data.ndim} dimensions (shape {img.shape}) and no usable axis "
            f"metadata (read as {img.axes!r}); pass the axes explicitly, e.g. --axes TZCYX (one letter "
            "per dimension from TZCYX), or save it as an ImageJ hyperstack / OME-TIFF."
        )
    return img


#: The hidden work store of a TIFF output ``X.tif`` is ``.X.tif`` + this suffix, beside it.
WORK_SUFFIX = ".pssr-work.zarr"
_SIDE_SUFFIXES = (".fidelity.tif", ".uncertainty.tif")
#: The hidden folder of an OME-Zarr output's bookkeeping (checksums, done logs, fidelity maps).
BOOKKEEPING = ".pssr"


def _zarr_attrs(folder: Path) -> dict[str, Any] | None:
    """The attributes in a zarr v3 node's ``zarr.json`` (None: no such node, or unreadable)."""
    try:
        meta = json.loads((folder / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else {}


def _finish_command(attrs: dict[str, Any], output: Path) -> str:
    """The command that finishes an interrupted restoration, from the job it recorded."""
    job = attrs.get("job") if isinstance(attrs.get("job"), dict) else {}
    parts = ["pssr predict", str(job.get("input", "INPUT"))]
    if job.get("input_array"):
        parts[-1] = str(Path(parts[-1]) / str(job["input_array"]))
    parts.append(str(output))
    if job.get("model"):
        parts += ["--model", str(job["model"])]
    if job.get("tile"):
        parts += ["--tile", str(job["tile"])]
    parts += [flag for key, flag in (("tta", "--tta"), ("fidelity", "--fidelity")) if job.get(key)]
    return " ".join(parts)


def _tiff_work(p: Path) -> Path | None:
    """The work store of the TIFF output that ``p`` is (``X.tif``) or a side file of (``X.fidelity.tif``)."""
    cands = [p.with_name(f".{p.name}{WORK_SUFFIX}")]
    low = p.name.lower()
    for suffix in _SIDE_SUFFIXES:
        if low.endswith(suffix):
            stem_ = p.name[: -len(suffix)]
            cands += [p.with_name(f".{stem_}{ext}{WORK_SUFFIX}") for ext in (".tif", ".tiff", ".ome.tif")]
    return next((c for c in cands if (c / "zarr.json").is_file()), None)


def check_complete(path: str | os.PathLike) -> None:
    """Refuse to read a pssr output that is not complete, naming its status and how to finish it.

    An OME-Zarr output (or its work store) whose ``pssr.status`` is not ``complete``, opened as a
    group or by the path of one of its arrays (``out.ome.zarr/s0``), and a TIFF output (or side
    file) whose restoration is being finished (its hidden work store says so) or that does not
    exist while its interrupted work store does.  Everything else (any file pssr did not write, a
    complete output) passes.  Every reader of images calls this (:func:`read_image`, the napari
    reader), so no command takes half an output as its input.
    """
    p = Path(os.path.abspath(path))
    # A zarr node and every zarr group above it (a level opened by its path: out.ome.zarr/s0).
    for q in (p, *p.parents):
        attrs = _zarr_attrs(q)
        if attrs is None:
            if q == p or q.name == BOOKKEEPING:  # ... or the folder of an output's side arrays
                continue
            break
        rec = attrs.get("pssr")
        status = rec.get("status") if isinstance(rec, dict) else None
        if status is not None and status != "complete":
            name = q.name
            output = q
            if name.startswith(".") and name.endswith(WORK_SUFFIX):  # a TIFF output's work store
                output = q.with_name(name[1 : -len(WORK_SUFFIX)])
            what = "" if q == p else f" (it is part of {str(q)!r})"
            raise PssrIOError(
                f"{str(p)!r} is an unfinished pssr restoration{what}: status {status!r}, not 'complete', "
                f"so some of its blocks are not written (they read as zeros). Finish it by running the "
                f"command that started it again: {_finish_command(rec, output)} (same other options)."
            )
    if not p.name.lower().endswith(TIFF_EXT):
        return
    work = _tiff_work(p)
    if work is None:
        return
    rec = (_zarr_attrs(work) or {}).get("pssr")
    status = rec.get("status") if isinstance(rec, dict) else None
    if status is None or status == "complete":
        return
    output = work.with_name(work.name[1 : -len(WORK_SUFFIX)])
    if status == "finishing" or not p.exists():
        how = (
            "was interrupted while its files were moved into place"
            if status == "finishing"
            else f"was interrupted before it was written (its blocks are in {str(work)!r})"
        )
        raise PssrIOError(
            f"{str(p)!r}: the pssr restoration that writes it {how}: status {status!r}, not 'complete'. "
            f"Finish it by running the command that started it again: {_finish_command(rec, output)} "
            "(same other options)."
        )
    # status running and the file exists: the previous, complete result, kept until a new one replaces it


def resolve_source(path: str | os.PathLike) -> str:
    """An input's lasting name: a URL as given, a local path resolved (``file.h5:/dataset`` kept)."""
    s = os.fspath(path)
    if remote.is_url(s):
        return s
    parts = volumes.h5_parts(s)
    if parts is not None:
        return str(Path(parts[0]).resolve()) + ":" + (parts[1] or "")
    return str(Path(s).resolve())


def local_file(path: str) -> str:
    """The local file or folder of an input name (an HDF5 file without its ``:/dataset``)."""
    parts = volumes.h5_parts(path)
    return parts[0] if parts is not None else path


def source_stamp(path: str) -> str | None:
    """What identifies a URL, HDF5, N5 or precomputed input for resuming; None for other inputs."""
    kind = _source_kind(path)
    if kind is None:
        return None
    if kind == "url":
        m = re.match(r"^([a-z0-9]+)://", path)
        url = path[m.end() :] if m and m.group(1) in remote.FORMAT_PREFIXES else path
        if not remote.is_url(url):
            return source_stamp(url) or ""
        keys = ("zarr.json", ".zarray", ".zattrs", "info", "attributes.json")
        return "url:" + remote.content_stamp(url, keys)
    f = Path(local_file(path))
    meta = [f / k for k in ("info", "attributes.json")] if f.is_dir() else [f]
    for m in meta:
        if m.exists():
            st = m.stat()
            return f"{m.name}:{st.st_size}:{st.st_mtime_ns}"
    return ""


def _source_kind(path: Any) -> str | None:
    """How a path that is not a plain local TIFF/PNG/zarr is read: "url", "hdf5", "n5", "precomputed"."""
    if not isinstance(path, str | os.PathLike):
        return None
    s = os.fspath(path)
    if remote.is_url(s):
        return "url"
    if volumes.h5_parts(s) is not None:
        return "hdf5"
    if s.lower().startswith(tuple(f"{k}://" for k in remote.FORMAT_PREFIXES)):
        return "url"  # a format prefix on a local path: handled with the URLs
    if Path(s).is_dir():
        kind = volumes.sniff(s)
        return kind if kind in ("n5", "precomputed") else None
    return None


def _read_source(path: str, kind: str, *, lazy: bool, storage_options: dict[str, Any] | None) -> Image:
    """A remote image (zarr, N5, precomputed), a local N5/precomputed volume or an HDF5 dataset."""
    if kind == "hdf5":
        img = _volume_image(volumes.read_hdf5(path), f"HDF5 {path!r}")
    else:
        fmt = None
        m = re.match(r"^([a-z0-9]+)://", path)
        if m and m.group(1) in remote.FORMAT_PREFIXES:
            fmt, path = m.group(1), path[m.end() :]
            fmt = "zarr" if fmt.startswith("zarr") else fmt
        if kind in ("n5", "precomputed"):
            fmt = kind
        fmt = fmt or volumes.sniff(path, storage_options) or "zarr"
        if fmt == "zarr":
            where = UrlPath(path, storage_options) if remote.is_url(path) else Path(path)
            img = _read_zarr(where, lazy=lazy)
        else:
            img = _volume_image(volumes.read_tensorstore(path, fmt, storage_options), f"{fmt} {path!r}")
    if not lazy:
        img.data = np.asarray(img.data[...])
    return img


def _volume_image(v: volumes.Volume, where: str) -> Image:
    units = {a: v.unit for a in v.scale if a in "ZYX"} if v.unit else {}
    unit, scale, origin = _common_space_unit(units, v.scale, v.origin, where)
    return Image(v.data, v.axes, scale, unit, axes_guessed=v.axes_guessed, origin=origin)


class UrlPath(str):
    """A URL that ``_read_zarr`` walks like a path (``.name``, ``.parent``, ``/``).

    It is opened through :func:`pssr.io.remote.zarr_store` with its ``storage_options``.
    """

    storage_options: dict[str, Any] | None = None

    def __new__(cls, url: str, storage_options: dict[str, Any] | None = None) -> UrlPath:  # noqa: D102
        obj = super().__new__(cls, url.rstrip("/"))
        obj.storage_options = storage_options
        return obj

    @property
    def name(self) -> str:
        """The last part of the URL's path."""
        return self.rsplit("/", 1)[-1]

    @property
    def parent(self) -> UrlPath:
        """The URL one level up."""
        return UrlPath(self.rsplit("/", 1)[0], self.storage_options)

    def __truediv__(self, key: Any) -> UrlPath:
        return UrlPath(f"{self}/{key}", self.storage_options)


def _zopen(p: Any, kind: str = "any") -> Any:
    """``zarr.open`` / ``open_group`` of a local path or a :class:`UrlPath`."""
    target: Any = str(p)
    if isinstance(p, UrlPath):
        target = remote.zarr_store(str(p), storage_options=p.storage_options)
    if kind == "group":
        return zarr.open_group(target, mode="r")
    return zarr.open(target, mode="r")


def _read_png(p: Path) -> Image:
    import imageio.v3 as iio

    data = np.asarray(iio.imread(p))
    if data.ndim == 3:
        if data.shape[-1] in (3, 4):
            raise PssrIOError(
                f"{str(p)!r} is an RGB(A) PNG; pssr restores single-channel images. "
                "Convert it to grayscale first."
            )
    return Image(data, "YX")


def read_vendor(p: str | os.PathLike, *, lazy: bool = True) -> Image:
    """A Nikon ND2, Zeiss CZI or Leica LIF file through its bioio reader (the ``vendor`` extra).

    The first scene (position / series) is read, with its pixel size (bioio reports micrometres)
    and frame interval (seconds) as an OME-TIFF's are.  Axes of length 1 are dropped (bioio always
    reports ``TCZYX``), so a single-plane file reads as ``YX``.  Above :data:`TIFF_LAZY_BYTES` the
    pixels stay lazy (:class:`VendorRegions`); below, they are read whole.
    """
    p = Path(p)
    fmt, module = VENDOR_EXT[p.suffix.lower()]
    try:
        plugin = importlib.import_module(module)
    except ImportError as e:
        missing = (getattr(e, "name", None) or module).split(".")[0]
        what = (
            f"the bioio reader {module.replace('_', '-')!r}, which is not installed"
            if missing == module
            else f"the bioio reader {module.replace('_', '-')!r}, whose dependency {missing!r} is not "
            f"installed or does not import ({e})"
        )
        raise PssrIOError(
            f"{str(p)!r} is a {fmt} file; reading it needs {what}. Install the optional extra: pip "
            "install 'pssr-toolkit[vendor]' (or export the file as OME-TIFF)."
        ) from None
    try:
        reader = plugin.Reader(str(p))
        scenes = tuple(reader.scenes)
        dims, shape, data = str(reader.dims.order), tuple(reader.shape), reader.dask_data
    except Exception as e:
        raise PssrIOError(
            f"cannot read {str(p)!r} as a {fmt} file ({type(e).__name__}: {e}); the file is damaged or "
            f"not a {fmt} file (re-export it from the microscope software, or as OME-TIFF)."
        ) from e
    if len(scenes) > 1:
        logger.warning(
            "%s holds %d scenes (%s); pssr reads the first, %r (export the others as their own files)",
            p, len(scenes), ", ".join(map(str, scenes[:4])), scenes[0],
        )  # fmt: skip
    for d, n in zip(dims, shape, strict=True):
        if d == "S" and n > 1:
            raise PssrIOError(
                f"{str(p)!r} is an RGB {fmt} image ({n} samples per pixel); pssr restores single-channel "
                "images. Export it as grayscale first."
            )
        if d not in "TCZYX" and n > 1:
            raise PssrIOError(
                f"{str(p)!r} has a {d!r} dimension of length {n} (dims {dims}, shape {shape}) that pssr "
                f"cannot restore as one image; export each {d} as its own file."
            )
    keep = [i for i, (d, n) in enumerate(zip(dims, shape, strict=True)) if d in "YX" or n > 1]
    data = data[tuple(slice(None) if i in keep else 0 for i in range(len(dims)))]
    axes = "".join(dims[i] for i in keep)
    sizes = reader.physical_pixel_sizes
    # 0 (or None) is "not calibrated", as an OME-TIFF's absent PhysicalSize is (CZI writes Z = 0 for 2D)
    scale = {a: float(v) for a in "ZYX" if a in axes and (v := getattr(sizes, a, None))}
    interval = reader.time_interval
    tunit = None
    if interval is not None and "T" in axes:
        scale["T"], tunit = float(interval.total_seconds()), "second"
    check_calibration(repr(str(p)), scale, {})
    declared = int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    data = VendorRegions(data) if lazy and declared > TIFF_LAZY_BYTES else np.asarray(_compute(data))
    unit = "micrometer" if any(a in scale for a in "ZYX") else None
    return Image(data, axes, scale, unit, time_unit=tunit).with_axes(axes)


def _compute(data: Any) -> Any:
    """A dask array's values, computed in this thread (never on a dask.distributed cluster)."""
    return data.compute(scheduler="synchronous")


class VendorRegions(volumes.Regions):
    """A vendor file's pixels read region by region (lazy, like a zarr array).

    Wraps the bioio reader's dask array; each read computes only its region, in the calling
    thread, so a dask.distributed worker never submits work to its own cluster.
    """

    def __init__(self, data: Any) -> None:
        self.data = data
        self.shape, self.dtype, self.ndim = tuple(data.shape), np.dtype(data.dtype), data.ndim

    def __getitem__(self, idx: Any) -> np.ndarray:
        return np.asarray(_compute(self.data[idx]))


# Above this many decoded bytes a TIFF is read lazily, block by block (TIFF_LAZY_BYTES).
TIFF_LAZY_BYTES = 256 * 2**20
# How much larger than its stored bytes a compressed strip or tile may decode to: deflate's limit is
# 1032:1; LZW and the others stay below this (a TIFF claiming more is refused before anything is
# allocated).
_MAX_RATIO = {1: 1.0, 8: 1100.0, 32946: 1100.0}
_DEFAULT_RATIO = 5000.0


def _human(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def check_tiff_sizes(p: Path, tif: tifffile.TiffFile, series: Any) -> None:
    """Refuse a TIFF whose tags declare more pixels than its bytes can hold, before allocating.

    Every strip/tile a page needs must be listed and lie inside the file, and the declared image
    must fit in its stored bytes (uncompressed), or in at most the codec's largest expansion of
    them (compressed).  A 283-byte file declaring 100000 x 100000 pixels is refused here with the
    file, the declared size and the file size, instead of allocating 10 GB.
    """
    size = p.stat().st_size
    itemsize = np.dtype(series.dtype).itemsize
    declared = float(np.prod([float(n) for n in series.shape])) * itemsize
    shape = " x ".join(str(n) for n in series.shape)

    def refuse(why: str) -> None:
        raise PssrIOError(
            f"TIFF {str(p)!r} declares {shape} pixels of {np.dtype(series.dtype).name} "
            f"({_human(declared)}) in a file of {_human(size)}: {why}; the file is damaged or not a "
            "real image (re-export it from its source)."
        )

    if series.dataoffset is not None:  # one contiguous block of uncompressed data
        if series.dataoffset + declared > size:
            refuse("its pixel data would end beyond the end of the file")
        return
    stored, ratio = 0, 1.0
    pages = series.pages if len(series.pages) <= 100_000 else [series.pages[0]]
    for page in pages:
        if page is None:
            continue
        offsets, counts = page.dataoffsets, page.databytecounts
        need = int(np.prod(page.chunked)) if getattr(page, "chunked", None) else len(offsets)
        if len(offsets) < need or len(counts) < need:
            refuse(f"a page lists {len(offsets)} of the {need} strips or tiles its size needs")
        for o, c in zip(offsets, counts, strict=False):
            if o + c > size:
                refuse(f"a strip or tile at byte {o} of {c} bytes lies beyond the end of the file")
        stored += int(sum(counts))
        comp = int(getattr(page, "compression", 1))
        ratio = max(ratio, _MAX_RATIO.get(comp, _DEFAULT_RATIO))
    if len(pages) < len(series.pages):  # a huge page count: the first page stands for all
        stored *= len(series.pages)
    if declared > max(stored, 1) * ratio * 1.01 + 4096:
        kind = "uncompressed" if ratio == 1.0 else f"compressed (at most {ratio:.0f}:1)"
        refuse(f"its {_human(stored)} of {kind} data cannot hold that many pixels")


class TiffRegions(volumes.Regions):
    """An uncompressed, contiguous TIFF series read region by region (lazy, like a zarr array).

    Each read maps only the rows it needs (:class:`numpy.memmap`) and copies them out, so memory
    follows the region read, not the file (a TIFF of 16384^2 pixels costs a block per read).
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.offset = str(path), int(offset)
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = self.full_index(idx, "a TIFF")
        lead, ys, xs = idx[:-2], idx[-2], idx[-1]
        h, w = self.shape[-2:]
        lead_ranges = []
        for i, n in zip(lead, self.shape[:-2], strict=True):
            if isinstance(i, slice):
                lead_ranges.append(range(*i.indices(n)))
            else:
                lead_ranges.append([self.position(i, n)])
        yr = range(*ys.indices(h)) if isinstance(ys, slice) else [int(ys) % h]
        planes = []
        for q in np.ndindex(*(len(r) for r in lead_ranges)):
            at = [r[j] for r, j in zip(lead_ranges, q, strict=True)]
            plane = int(np.ravel_multi_index(at, self.shape[:-2])) if at else 0
            planes.append(self._rows(plane, yr)[:, xs] if len(yr) else np.zeros((0, w), self.dtype)[:, xs])
        out_shape = [len(r) for r, i in zip(lead_ranges, lead, strict=True) if isinstance(i, slice)]
        out = np.stack(planes) if planes else np.zeros((0,), self.dtype)
        out = out.reshape(*out_shape, *out.shape[1:]) if planes else out
        return out[..., 0, :] if not isinstance(ys, slice) else out

    def _rows(self, plane: int, yr: range) -> np.ndarray:
        h, w = self.shape[-2:]
        y0, y1 = min(yr[0], yr[-1]), max(yr[0], yr[-1]) + 1
        row = w * self.dtype.itemsize
        mm = np.memmap(self.path, self.dtype, "r", self.offset + (plane * h + y0) * row, (y1 - y0, w))
        try:
            return np.array(mm[[y - y0 for y in yr]])
        finally:
            del mm


def _lazy_tiff(p: Path, tif: tifffile.TiffFile, series: Any) -> Any:
    """A TIFF series above :data:`TIFF_LAZY_BYTES` as a lazy array (None: read it whole)."""
    declared = int(np.prod(series.shape)) * np.dtype(series.dtype).itemsize
    if declared <= TIFF_LAZY_BYTES:
        return None
    if series.dataoffset is not None:  # uncompressed and contiguous: rows straight from the file
        return TiffRegions(p, series.dataoffset, series.shape, series.dtype)
    store = tifffile.imread(str(p), aszarr=True, series=0)  # strips/tiles decoded as read
    arr = zarr.open_array(store, mode="r")
    arr._pssr_tiff_store = store  # type: ignore[attr-defined]  (keeps the file open while in use)
    return arr


def _read_tiff(p: Path) -> Image:
    with tifffile.TiffFile(p) as tif:
        series = tif.series[0] if tif.series else None
        if series is None or not series.shape or 0 in series.shape:
            raise PssrIOError(
                f"TIFF {str(p)!r} holds no image ({len(tif.pages)} pages, no pixels in its first series: "
                f"shape {tuple(series.shape) if series is not None else None}); the file is damaged or not a "
                "TIFF image (re-export it from its source)."
            )
        check_tiff_sizes(p, tif, series)
        lazy = _lazy_tiff(p, tif, series)
        data = series.asarray() if lazy is None else lazy
        guessed = "Q" in series.axes.upper() or "I" in series.axes.upper()  # tifffile's "unknown"
        axes = series.axes.upper().replace("Q", "Z").replace("I", "Z")
        axes = axes.replace("S", "C")
        scale: dict[str, float] = {}
        origin: dict[str, float] = {}
        unit: str | None = None
        units: dict[str, str] = {}
        tunit: str | None = None
        if tif.is_ome and tif.ome_metadata:
            meta = tifffile.xml2dict(tif.ome_metadata)
            pix = meta.get("OME", {}).get("Image", {})
            pix = (pix[0] if isinstance(pix, list) else pix).get("Pixels", {})
            for a in "XYZ":
                v = pix.get(f"PhysicalSize{a}")
                if v:
                    scale[a] = float(v)
                    units[a] = pix.get(f"PhysicalSize{a}Unit", "µm")  # the OME default
            if pix.get("TimeIncrement"):
                scale["T"] = float(pix["TimeIncrement"])
                tunit = _norm_time_unit(pix.get("TimeIncrementUnit", "s"))
        else:
            page = tif.pages[0]
            xres = page.tags.get("XResolution")
            yres = page.tags.get("YResolution")
            ij = tif.imagej_metadata or {}
            if xres is not None:
                num, den = xres.value
                if num and den and (num, den) != (1, 1):
                    scale["X"] = den / num
                    if yres is not None and yres.value[0]:
                        scale["Y"] = yres.value[1] / yres.value[0]
                    else:
                        scale["Y"] = scale["X"]
            if ij.get("spacing"):  # ImageJ writes 0 for "not set"
                scale["Z"] = float(ij["spacing"])
            if ij.get("finterval"):
                scale["T"] = float(ij["finterval"])
                tunit = _norm_time_unit(ij.get("tunit"))  # none: unknown (ImageJ shows "sec")
            # ImageJ: "unit" for X (and Y, Z unless "yunit"/"zunit" say otherwise)
            for a, key in (("X", "unit"), ("Y", "yunit"), ("Z", "zunit")):
                u = ij.get(key) or ij.get("unit")
                if a in scale and u:
                    units[a] = u
            unit = _norm_unit(ij.get("unit"))
            if scale and unit is None:
                ru = page.tags.get("ResolutionUnit")
                if ru is not None and int(ru.value) == 3:  # centimetre
                    scale = {a: v * (1.0 if a == "T" else 1e4) for a, v in scale.items()}
                    unit = "micrometer"
            # ImageJ's origin is in pixels: pixel i lies at (i - origin) * pixel size.
            origin = {
                a: -float(ij[f"{a.lower()}origin"]) * scale.get(a, 1.0)
                for a in "XYZ"
                if ij.get(f"{a.lower()}origin")
            }
    if units:
        unit, scale, origin = _common_space_unit(units, scale, origin, f"TIFF {str(p)!r}")
    # Drop singleton channel axes that tifffile reports for plain stacks.
    while "C" in axes and data.shape[axes.index("C")] == 1:
        i = axes.index("C")
        data = data.take(0, axis=i) if isinstance(data, np.ndarray) else _drop_axis(data, i)
        axes = axes[:i] + axes[i + 1 :]
    if not set(axes) <= set("TZCYX") or len(set(axes)) != len(axes):
        axes = guess_axes(data.ndim) or axes  # read_image refuses what is still ambiguous
        guessed = True
    # the calibration of the axes the image has (tifffile may have dropped some)
    img = Image(data, axes, scale, unit, origin=origin, time_unit=tunit).with_axes(axes)
    img.axes_guessed = guessed
    return img


def _drop_axis(data: Any, i: int) -> Any:
    """A lazy TIFF without its length-1 axis ``i``."""
    if isinstance(data, TiffRegions):
        return TiffRegions(Path(data.path), data.offset, data.shape[:i] + data.shape[i + 1 :], data.dtype)
    raise PssrIOError(
        f"a large TIFF of shape {tuple(data.shape)} with a length-1 channel axis cannot be read lazily; "
        "save it without that axis (e.g. as an ImageJ hyperstack of one channel)."
    )


def ome_zarr_metadata(group: zarr.Group) -> dict[str, Any] | None:
    """The ``multiscales[0]`` entry of an OME-Zarr group (v0.4 or v0.5), or None."""
    attrs = dict(group.attrs)
    ms = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
    return ms[0] if ms else None


def _read_zarr(p: Path, *, lazy: bool) -> Image:
    node = _zopen(p)
    if isinstance(node, zarr.Array):
        parent = _ome_parent(p, node)
        if parent is not None:  # one level of an OME-Zarr image, opened by its path: its calibration
            return _ome_image(p, *parent, lazy=lazy)
        data = node
        attrs = dict(node.attrs)
        names = getattr(node.metadata, "dimension_names", None) or ()  # zarr v3 only
        named = (
            "".join(n.upper() for n in names)
            if all(isinstance(n, str) and len(n) == 1 for n in names)
            else ""
        )
        known = attrs.get("pssr_axes") or named
        # No metadata and no guess ("?"): read_image takes the given axes, or asks for them.
        axes, guessed = known or guess_axes(node.ndim) or "?" * node.ndim, not known
        scale = attrs.get("pssr_scale", {})
        origin = attrs.get("pssr_origin", {})
        if not lazy:
            data = np.asarray(data[...])
        return Image(
            data, axes, scale, attrs.get("pssr_unit"), axes_guessed=guessed, origin=origin,
            time_unit=attrs.get("pssr_time_unit"),
        )  # fmt: skip
    ms = ome_zarr_metadata(node)
    if ms is None:
        images = [k for k, g in members(node, "groups") if ome_zarr_metadata(g) is not None]
        if images:  # a bioformats2raw layout: the image(s) in numbered subgroups
            raise PssrIOError(
                f"zarr group {str(p)!r} holds its image(s) in subgroups (bioformats2raw layout): give "
                f"one of {', '.join(repr(str(p / k)) for k in sorted(images)[:4])}."
            )
        arrays = sorted(k for k, _ in members(node, "arrays"))
        raise PssrIOError(
            f"zarr group {str(p)!r} has no OME-Zarr 'multiscales' metadata; open one of "
            f"its arrays instead ({', '.join(str(p / a) for a in arrays[:4]) or 'none found'})."
        )
    if not isinstance(ms.get("datasets"), list) or not ms["datasets"]:
        raise PssrIOError(f"OME-Zarr {str(p)!r} lists no datasets in its multiscales metadata.")
    return _ome_image(p, node, ms, ms["datasets"][0], lazy=lazy)


def members(group: zarr.Group, kind: str = "members") -> list[tuple[str, Any]]:
    """A group's ``arrays()`` / ``groups()`` / ``members()``, without zarr's warning about ``.pssr/``.

    zarr-python warns ("Object at .pssr is not recognized as a component of a Zarr hierarchy")
    for every folder of a group that is not a zarr node whenever it lists the group; pssr's
    bookkeeping folder is one on purpose (as a zarr group, napari's built-in reader would open it
    instead of the image; as an array, it would be listed among the pyramid levels).  Any other
    stray folder is still warned about.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=rf"Object at {re.escape(BOOKKEEPING)} is not recognized")
        return list(getattr(group, kind)())


def _ome_parent(p: Path, node: zarr.Array) -> tuple[zarr.Group, dict[str, Any], dict[str, Any]] | None:
    """(group, multiscales, dataset) when the array at ``p`` is a level of an OME-Zarr image."""
    if isinstance(p, UrlPath) and "/" not in remote.split_url(str(p))[2]:
        return None  # the bucket itself is not a group
    try:
        group = _zopen(p.parent, "group")
    except Exception:
        return None
    ms = ome_zarr_metadata(group)
    if not ms:
        return None
    for ds in ms.get("datasets") or []:
        if isinstance(ds, dict) and str(ds.get("path", "")).strip("/") == p.name:
            return group, ms, ds
    return None


_KINDS = {"T": "time", "C": "channel"}


def _ome_image(p: Path, group: zarr.Group, ms: dict[str, Any], ds: dict[str, Any], *, lazy: bool) -> Image:
    """One dataset (level) of an OME-Zarr image with its axes, scale, origin and units."""
    try:
        data = group[str(ds["path"])]
    except KeyError:
        raise PssrIOError(
            f"OME-Zarr {str(p)!r} lists a dataset {ds.get('path')!r} that it does not contain; "
            "the image is incomplete or its metadata is wrong."
        ) from None
    meta = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
    named = "".join(str(a.get("name", "")).upper() for a in meta)
    if meta and len(named) != len(meta):
        named = ""  # names longer than one letter: not axes pssr can map
    axes, guessed = named or guess_axes(data.ndim) or "?" * data.ndim, not named
    if len(axes) != data.ndim:
        raise PssrIOError(
            f"OME-Zarr {str(p)!r} names {len(axes)} axes ({axes}) for an array of {data.ndim} dimensions "
            f"(shape {tuple(data.shape)}); fix its 'axes' metadata."
        )
    # The dataset's transformations, then the multiscale-level ones (OME-NGFF 0.4/0.5).
    where = f"OME-Zarr {str(p)!r}"
    own, top = ds.get("coordinateTransformations", []), ms.get("coordinateTransformations", [])
    sc, tr = ngff_transforms(own, data.ndim, where=where)
    sc, tr = ngff_transforms(top, data.ndim, sc, tr, where=where)
    given_sc = any(t.get("type") == "scale" for t in [*own, *top])
    keep = [a for a in axes if a != "C"]
    scale = {a: v for a, v in zip(axes, sc, strict=True) if a in keep} if given_sc else {}
    origin = {a: v for a, v in zip(axes, tr, strict=True) if a in keep and v != 0.0}
    kinds = [a.get("type") or _KINDS.get(ax, "space") for a, ax in zip(meta, axes, strict=False)]
    units = {
        ax: a.get("unit")
        for a, ax, k in zip(meta, axes, kinds, strict=False)
        if k == "space" and a.get("unit")
    }
    unit, scale, origin = _common_space_unit(units, scale, origin, where)
    tunit = next(
        (a.get("unit") for a, k in zip(meta, kinds, strict=False) if k == "time" and a.get("unit")), None
    )
    if not lazy:
        data = np.asarray(data[...])
    return Image(
        data, axes, scale, unit, axes_guessed=guessed, origin=origin, time_unit=_norm_time_unit(tunit)
    )


# Metres per unit of the OME-NGFF (UDUNITS-2) space units.
_METRES = {
    "angstrom": 1e-10, "attometer": 1e-18, "centimeter": 1e-2, "decimeter": 1e-1, "exameter": 1e18,
    "femtometer": 1e-15, "foot": 0.3048, "gigameter": 1e9, "hectometer": 1e2, "inch": 0.0254,
    "kilometer": 1e3, "megameter": 1e6, "meter": 1.0, "micrometer": 1e-6, "mile": 1609.344,
    "millimeter": 1e-3, "nanometer": 1e-9, "parsec": 3.0857e16, "petameter": 1e15, "picometer": 1e-12,
    "terameter": 1e12, "yard": 0.9144, "yoctometer": 1e-24, "yottameter": 1e24, "zeptometer": 1e-21,
    "zettameter": 1e21,
}  # fmt: skip
_TIME_UNITS = {
    "attosecond", "centisecond", "day", "decisecond", "exasecond", "femtosecond", "gigasecond",
    "hectosecond", "hour", "kilosecond", "megasecond", "microsecond", "millisecond", "minute",
    "nanosecond", "petasecond", "picosecond", "second", "terasecond", "yoctosecond", "yottasecond",
    "zeptosecond", "zettasecond",
}  # fmt: skip


def _common_space_unit(
    units: dict[str, str], scale: dict[str, float], origin: dict[str, float], where: str
) -> tuple[str | None, dict[str, float], dict[str, float]]:
    """One space unit for every spatial axis: Z (or any other) converted to the unit of X/Y."""
    raw = {a: u for a, u in units.items() if u}
    if len(set(raw.values())) <= 1:  # one unit (or none) for every axis that has one
        if raw and not (raw.get("X") or raw.get("Y")) and ("X" in scale or "Y" in scale):
            logger.warning(
                "%s gives a unit only to %s; its pixel sizes are kept without a unit", where, sorted(raw)
            )
            return None, scale, origin
        return _norm_unit(next(iter(raw.values()), None)), scale, origin
    known = {a: _UNIT_ALIASES.get(u, u) for a, u in raw.items()}
    plane = known.get("X") or known.get("Y")
    if plane is None or any(u not in _METRES for u in known.values()):
        raise PssrIOError(
            f"{where} gives its spatial axes different units ({raw}) that pssr cannot convert; "
            f"give every spatial axis the same unit (OME-NGFF names such as 'micrometer', 'nanometer')."
        )
    factor = {a: _METRES[u] / _METRES[plane] for a, u in known.items()}
    scale = {a: v * factor.get(a, 1.0) for a, v in scale.items()}
    origin = {a: v * factor.get(a, 1.0) for a, v in origin.items()}
    return plane, scale, origin


def check_calibration(where: str, scale: dict[str, Any], origin: dict[str, Any]) -> None:
    """Refuse a pixel size that is not a positive finite number, or an origin that is not finite."""
    for a, v in scale.items():
        if not (isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) and v > 0):
            raise PssrIOError(
                f"{where} gives axis {a} a pixel size of {v!r}; a pixel size must be a finite number > 0. "
                f"Fix {_FIX_HINT}"
            )
    for a, v in origin.items():
        if not (isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)):
            raise PssrIOError(
                f"{where} gives axis {a} an origin (translation) of {v!r}; it must be a finite number. "
                f"Fix {_FIX_HINT}"
            )


_FIX_HINT = (
    "the calibration (OME-Zarr: coordinateTransformations; ImageJ TIFF: resolution, spacing, finterval, "
    "x/y/zorigin; OME-TIFF: PhysicalSize*, TimeIncrement; a pssr.io.formats.Image: its scale and origin)."
)


def ngff_transforms(
    transforms: Any,
    ndim: int,
    scale: list[float] | None = None,
    translation: list[float] | None = None,
    *,
    where: str = "OME-Zarr",
) -> tuple[list[float], list[float]]:
    """Compose OME-NGFF ``scale``/``translation`` transformations onto ``world = scale * i + translation``.

    Starts from identity (or the given ``scale``/``translation``, to apply a multiscale's own
    transformations after its dataset's) and returns the composed pair, one value per axis.
    Anything else than a list of scale/translation/identity transformations with ``ndim``
    numbers each is refused with a :class:`PssrIOError` naming it (``where`` says whose).
    """
    sc = list(scale) if scale is not None else [1.0] * ndim
    tr = list(translation) if translation is not None else [0.0] * ndim
    if not isinstance(transforms, list):
        raise PssrIOError(f"{where}: coordinateTransformations must be a list, got {transforms!r}.")
    for t in transforms:
        kind = t.get("type") if isinstance(t, dict) else None
        if kind in ("scale", "translation"):
            v = t.get(kind)
            if "path" in t and v is None:
                raise PssrIOError(
                    f"{where}: a {kind} stored in a separate array ('path': {t['path']!r}) is not supported; "
                    f"write the {kind} values inline."
                )
            ok = isinstance(v, list) and len(v) == ndim
            ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
            if not ok:
                raise PssrIOError(
                    f"{where}: the {kind} {v!r} must be a list of {ndim} numbers, one per axis; fix it."
                )
            v = [float(x) for x in v]
            if kind == "scale":
                sc = [a * b for a, b in zip(sc, v, strict=True)]
                tr = [a * b for a, b in zip(tr, v, strict=True)]
            else:
                tr = [a + b for a, b in zip(tr, v, strict=True)]
        elif not isinstance(t, dict):
            raise PssrIOError(
                f"{where}: each coordinate transformation must be an object such as "
                f'{{"type": "scale", "scale": [...]}}, got {t!r}; fix the metadata.'
            )
        elif kind != "identity":
            raise PssrIOError(
                f"{where}: coordinate transformation {kind if kind is not None else t!r} is not supported "
                "(only scale and translation, as OME-Zarr 0.4/0.5 allow); convert the image to use those."
            )
    return sc, tr


# -------------------------------------------------------------------------------- write
def check_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Validate an output path before any work: refuse existing outputs and unwritable folders."""
    p = Path(path)
    name = p.name.lower()
    if not (name.endswith(TIFF_EXT) or name.endswith(ZARR_EXT)):
        raise PssrIOError(f"output {str(p)!r} must end in .tif/.tiff (TIFF) or .zarr / .ome.zarr (OME-Zarr).")
    if p.exists() and not overwrite:
        raise PssrIOError(f"output {str(p)!r} already exists; choose another path or pass --overwrite.")
    if p.is_dir() and not replaceable(p):
        raise PssrIOError(
            f"--overwrite would delete the folder {str(p)!r}, which pssr did not write; pssr never deletes "
            "data it did not write: choose another output, or delete that folder yourself if you are sure."
        )
    check_folder(p, PssrIOError)
    return p


def _atomic(path: Path, writer: Callable[[Path], None], *, overwrite: bool) -> None:
    """Write via ``writer(tmp)`` to a temporary sibling, then rename onto ``path``.

    An existing ``path`` stays intact and readable until the new one replaces it (:func:`replace_path`).
    """
    check_output_path(path, overwrite=overwrite)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        writer(tmp)
        replace_path(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where not supported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_path(new: Path, dst: Path) -> None:
    """Move the finished ``new`` (file or folder) onto ``dst``; the old ``dst`` is readable until then.

    A file is replaced by one atomic rename; a folder is swapped atomically where the system can
    (Linux), else renamed aside, replaced and then deleted (a kill between the two renames leaves
    the old one under ``.<name>.*.old``).
    """
    if not dst.is_dir():
        os.replace(new, dst)
        return
    if _exchange(new, dst):
        shutil.rmtree(new) if new.is_dir() else new.unlink()  # ``new`` now holds the old one
        return
    old = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def _imagej_unit(unit: str | None) -> str:
    return {"micrometer": "um", "nanometer": "nm", "millimeter": "mm"}.get(unit or "", unit or "")


def _imagej_time_unit(unit: str) -> str:
    return {"second": "sec", "millisecond": "ms", "minute": "min", "hour": "hr", "microsecond": "us"}.get(
        unit, unit
    )


def write_tiff(
    path: str | os.PathLike,
    data: np.ndarray,
    *,
    axes: str,
    scale: dict[str, float] | None = None,
    unit: str | None = None,
    overwrite: bool = False,
    origin: dict[str, float] | None = None,
    time_unit: str | None = None,
    sums: tuple[tuple[int, int], str] | None = None,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write an ImageJ-compatible TIFF with pixel size, frame interval and origin (atomic).

    uint8, uint16 and float32 are written as they are; other dtypes are converted to
    float32 (ImageJ's types), never silently clipped.  The file carries its checksums in its
    ImageJ ``Info`` property (``{"pssr": {...}}``, :func:`tiff_record`) so that ``pssr verify``
    detects any later edit: ``sums`` gives them as ``(grid, hex)`` (the blake2b-128 of each
    ``grid``-sized cell of each page, pages in order, cells row-major, as written); without it
    they are computed here, one per page.  ``record`` adds fields (run id, array name, side files).
    """
    p = Path(path)
    dtype = np.dtype(data.dtype)
    if dtype not in (np.uint8, np.uint16, np.float32):
        dtype = np.dtype(np.float32)
    if sums is None:
        lead_ = tuple(data.shape[:-2])
        grid = (int(data.shape[-2]), int(data.shape[-1]))
        sums = (grid, "".join(block_digest(np.asarray(data[i], dtype)) for i in np.ndindex(*lead_)))
    if isinstance(data, np.ndarray) or np.ndim(data) <= 2:
        arr: Any = np.asarray(data, dtype=dtype)
    else:
        # A lazy (zarr/dask) array: stream plane by plane so memory stays at one plane.
        lead = data.shape[:-2]
        arr = (np.asarray(data[idx], dtype=dtype) for idx in np.ndindex(*lead))
    scale = scale or {}
    resolution = None
    if "X" in scale and "Y" in scale:
        resolution = (1.0 / scale["X"], 1.0 / scale["Y"])
    meta: dict[str, Any] = {"axes": axes}
    if unit:
        meta["unit"] = _imagej_unit(unit)
    if "Z" in scale:
        meta["spacing"] = scale["Z"]
    if "T" in scale and "T" in axes:
        meta["finterval"] = scale["T"]
        tunit = _norm_time_unit(time_unit)
        if tunit:  # no unit: none written (ImageJ would otherwise say seconds)
            meta["tunit"] = _imagej_time_unit(tunit)
    for a, v in (origin or {}).items():
        # ImageJ counts its origin in pixels, with the opposite sign (read back the same way)
        if a in "XYZ" and a in axes and a in scale and v:
            meta[f"{a.lower()}origin"] = -v / scale[a]
    meta["Info"] = json.dumps(
        {
            "pssr": {
                "format": 1,
                "status": "complete",
                **(record or {}),
                "axes": axes,
                "shape": [int(n) for n in data.shape],
                "dtype": dtype.name,
                "digest": DIGEST_DOC,
                "grid": [int(g) for g in sums[0]],
                "sums": sums[1],
            }
        },
        separators=(",", ":"),
    )

    def writer(tmp: Path) -> None:
        shape_kw = {} if isinstance(arr, np.ndarray) else {"shape": tuple(data.shape), "dtype": dtype}
        tifffile.imwrite(
            tmp,
            arr,
            imagej=True,
            resolution=resolution,
            metadata=meta,
            compression="zlib",
            **shape_kw,
        )

    _atomic(p, writer, overwrite=overwrite)
    return p


DIGEST_DOC = "blake2b-128 of each grid cell's dtype, shape and C-order bytes; pages in order, cells row-major"


def block_digest(*arrays: np.ndarray) -> str:
    """A 128-bit BLAKE2b checksum of arrays' dtypes, shapes and bytes (C order)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def grid_cells(shape: tuple[int, ...], grid: tuple[int, int]) -> list[tuple[tuple[int, ...], slice, slice]]:
    """``(page index, y slice, x slice)`` of every grid cell of every page, in checksum order."""
    h, w = shape[-2:]
    gy, gx = grid
    return [
        (idx, slice(y, min(y + gy, h)), slice(x, min(x + gx, w)))
        for idx in np.ndindex(*shape[:-2])
        for y in range(0, h, gy)
        for x in range(0, w, gx)
    ]


def tiff_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``pssr`` record a TIFF written by pssr carries (checksums, run), or None for any other TIFF."""
    with tifffile.TiffFile(path) as tif:
        info = (tif.imagej_metadata or {}).get("Info")
    try:
        rec = json.loads(info).get("pssr") if isinstance(info, str) else None
    except (ValueError, AttributeError):
        return None
    return rec if isinstance(rec, dict) else None


def check_tiff(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> int:
    """Compare every grid cell of a pssr TIFF with the checksum it carries; returns the cells checked.

    Raises :class:`~pssr.errors.IntegrityError` naming the first cell that differs (or a page that
    does not decode), or, for a TIFF without pssr checksums, "not a pssr output".
    """
    p = Path(path)
    rec = tiff_record(p)
    if rec is None or not isinstance(rec.get("sums"), str) or not isinstance(rec.get("grid"), list):
        raise IntegrityError(
            f"{str(p)!r} is not a pssr output: nothing to verify against (it carries no pssr block "
            "checksums; pssr writes them in every TIFF it writes)."
        )
    try:
        shape, grid, sums = (
            tuple(int(n) for n in rec["shape"]),
            tuple(int(g) for g in rec["grid"]),
            rec["sums"],
        )  # noqa: E501
        cells = grid_cells(shape, grid)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"{str(p)!r}: its pssr checksum record is damaged ({e}); write it again.") from e
    if len(sums) != 32 * len(cells):
        raise IntegrityError(
            f"{str(p)!r}: {len(sums) // 32} block checksums recorded for {len(cells)} blocks of shape "
            f"{shape}; the file or its record was changed after it was written: write it again."
        )
    lead = shape[:-2]
    with tifffile.TiffFile(p) as tif:
        pages = tif.pages
        if len(pages) != max(1, int(np.prod(lead))):
            raise IntegrityError(
                f"{str(p)!r} has {len(pages)} pages but was written with {max(1, int(np.prod(lead)))}; "
                "it was changed after it was written: write it again."
            )
        k, current, plane = 0, None, None
        for idx, ys, xs in cells:
            if idx != current:
                i = int(np.ravel_multi_index(idx, lead)) if lead else 0
                try:
                    plane = pages[i].asarray()
                except Exception as e:
                    raise IntegrityError(
                        f"{str(p)!r}: page {i} cannot be read ({type(e).__name__}: {e}); write it again."
                    ) from e
                if plane.shape[-2:] != shape[-2:] or plane.dtype.name != rec.get("dtype", plane.dtype.name):
                    raise IntegrityError(
                        f"{str(p)!r}: page {i} is {plane.dtype} {plane.shape}, written as "
                        f"{rec.get('dtype')} {shape[-2:]}; it was changed after it was written."
                    )
                current = idx
                if progress is not None:
                    progress(1)
            if block_digest(plane[ys, xs]) != sums[32 * k : 32 * k + 32]:  # type: ignore[index]
                axes_ = str(rec.get("axes", ""))[: len(idx)]
                where = ", ".join(f"{a}={v}" for a, v in zip(axes_, idx, strict=False))
                raise IntegrityError(
                    f"{str(p)!r}: the block at {where + ', ' if where else ''}y {ys.start}:{ys.stop}, "
                    f"x {xs.start}:{xs.stop} does not match the checksum recorded when it was written "
                    f"(block {k}); the file was changed or corrupted after it was written: write it again."
                )
            k += 1
    return len(cells)


def write_ome_zarr(
    path: str | os.PathLike,
    data: Any,
    *,
    axes: str,
    scale: dict[str, float] | None = None,
    unit: str | None = None,
    levels: int = 3,
    chunks: tuple[int, ...] | None = None,
    overwrite: bool = False,
    attrs: dict[str, Any] | None = None,
    origin: dict[str, float] | None = None,
    time_unit: str | None = None,
) -> Path:
    """Write OME-Zarr (NGFF 0.5, zarr v3) with a YX pyramid of at most ``levels`` levels (atomic).

    ``data`` may be a numpy, dask or zarr array; it is written chunk by chunk.  The levels and
    their metadata come from :mod:`pssr.io.ngff`, the writer restorations use too: each level is
    the 2x2 mean of the one below (:mod:`pssr.io.pyramid`; levels of at least 64 px), with a
    scale and a translation: ``origin`` (the centre of pixel 0 of level 0) plus, for a level
    downsampled f times, (f - 1) / 2 of a level-0 pixel, where its pixel 0's centre lies.
    """
    import dask.array as da

    from pssr.io import ngff, pyramid

    p = Path(path)
    phys = {a: float((scale or {}).get(a, 1.0)) for a in axes}
    org = {a: float((origin or {}).get(a, 0.0)) for a in axes}

    def writer(tmp: Path) -> None:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        ck = chunks or tuple(min(n, 512) if a in "YX" else 1 for a, n in zip(axes, data.shape, strict=True))
        base = group.create_array(
            "s0",
            shape=data.shape,
            dtype=data.dtype,
            chunks=ck,
            fill_value=0,
            dimension_names=list(axes.lower()),
        )
        if isinstance(data, np.ndarray):
            base[...] = data
        else:  # chunk by chunk: never the whole array in memory
            arr = data if isinstance(data, da.Array) else da.from_zarr(data)
            da.store(arr.rechunk(ck), base, lock=False)
        lv = ngff.create_levels(group, axes, min_side=16, max_levels=max(1, levels))
        pyramid.Builder([base, *lv]).close()
        group.attrs["ome"] = ngff.image_attrs(
            axes, phys, org, 1 + len(lv), unit=unit, time_unit=_norm_time_unit(time_unit), name=p.name
        )
        # A pssr record: what pssr wrote it may replace with --overwrite (never anyone else's data).
        group.attrs.update({"pssr_written": {"by": "pssr.io.formats.write_ome_zarr"}, **(attrs or {})})

    _atomic(p, writer, overwrite=overwrite)
    return p


def write_image(
    path: str | os.PathLike,
    data: Any,
    *,
    axes: str,
    scale: dict[str, float] | None = None,
    unit: str | None = None,
    overwrite: bool = False,
    origin: dict[str, float] | None = None,
    time_unit: str | None = None,
) -> Path:
    """Write TIFF or OME-Zarr depending on the extension of ``path``.

    ``scale`` is the pixel size per axis (in ``unit``; ``T`` in ``time_unit``), ``origin`` the
    physical position of the centre of pixel 0 (an OME-Zarr ``translation``).  An existing
    ``path`` is refused unless ``overwrite``.  Returns the path written.

    Examples
    --------
    >>> import numpy as np
    >>> write_image("cells.ome.zarr", np.zeros((4, 16, 16), np.uint16), axes="ZYX",
    ...             scale={"Z": 0.5, "Y": 0.1, "X": 0.1}, unit="micrometer", origin={"Y": 2.0, "X": 3.0})
    PosixPath('cells.ome.zarr')
    >>> img = read_image("cells.ome.zarr")
    >>> img.axes, img.data.shape, img.scale["Z"], img.origin["X"]
    ('ZYX', (4, 16, 16), 0.5, 3.0)
    """
    name = Path(path).name.lower()
    kw = {"scale": scale, "unit": unit, "overwrite": overwrite, "origin": origin, "time_unit": time_unit}
    if name.endswith(ZARR_EXT):
        return write_ome_zarr(path, data, axes=axes, **kw)
    if name.endswith(TIFF_EXT):
        return write_tiff(path, data, axes=axes, **kw)
    raise PssrIOError(f"output {str(path)!r} must end in .tif/.tiff (TIFF) or .zarr / .ome.zarr (OME-Zarr).")
