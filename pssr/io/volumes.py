"""Connectomics volumes: N5 and Neuroglancer precomputed (tensorstore) and HDF5 datasets (h5py).

Each is opened lazily as a :class:`LazyVolume`, an array-like in C (ZYX) order that the engine
slices like a zarr array: only the chunks a slice touches are read.  N5 and precomputed store X
fastest; tensorstore reads them with ``order="F"`` and the result is transposed for free (a default
C-order read makes the decoder transpose: 25-30x slower, docs/remote.md).

The voxel size and offset become the image's world coordinates (:class:`pssr.io.formats.Image`'s
``scale`` and ``origin``, the centre of voxel 0):

- precomputed: ``resolution`` (nm, XYZ) and ``voxel_offset`` (voxels); voxel ``v`` spans
  ``[v, v+1) * resolution`` in Neuroglancer, so the centre of voxel 0 is
  ``(voxel_offset + 0.5) * resolution``;
- N5: ``pixelResolution`` (``{"dimensions": [...], "unit": "nm"}``, BigDataViewer / n5-viewer),
  ``resolution`` (+ ``units``/``unit``, Saalfeld lab / funlib) with ``offset`` in world units,
  or the COSEM/OpenOrganelle ``transform`` (``axes``, ``scale``, ``translate``, ``units``);
  attribute lists are in N5's XYZ order unless named;
- HDF5: ``resolution`` and ``offset`` (ZYX, nanometres: CREMI, funlib) or ``element_size_um``
  (ZYX, micrometres: ilastik, Fiji).

An input without any of these is read with a pixel size of 1 and a warning that says so.
Credentials for tensorstore come only from the environment (tensorstore prints its whole spec in
its error messages, so nothing secret ever goes into a spec).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pssr.errors import PssrIOError
from pssr.io import remote

logger = logging.getLogger(__name__)

__all__ = ["LazyVolume", "Regions", "Volume", "h5_parts", "read_hdf5", "read_tensorstore", "sniff"]

_H5 = re.compile(r"^(.*?\.(?:h5|hdf5|hdf|he5))(?::(.*))?$", re.I)
_CACHE_BYTES = 256 << 20  # tensorstore's chunk cache: neighbouring tiles (halos) reuse chunks


def h5_parts(path: str) -> tuple[str, str | None] | None:
    """``(file, dataset)`` of ``file.h5:/dataset`` (dataset None when not given); None for other paths."""
    m = _H5.match(path)
    if not m:
        return None
    return m.group(1), (m.group(2) or None)


@dataclass
class Volume:
    """What a volume's metadata says: the lazy data, axes, voxel size, unit, origin (centre of voxel 0)."""

    data: Any
    axes: str
    scale: dict[str, float]
    unit: str | None
    origin: dict[str, float]
    axes_guessed: bool


def _guess_axes(ndim: int) -> str:
    return {2: "YX", 3: "ZYX", 4: "TZYX"}.get(ndim, "?" * ndim)


class Regions:
    """Base of pssr's lazy arrays, read region by region (``self[idx]`` returns a numpy array).

    Subclasses set ``shape``, ``dtype`` and ``ndim`` and implement ``__getitem__``, which may
    normalise its index with :meth:`full_index`.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    ndim: int

    def full_index(self, idx: Any, what: str) -> tuple[Any, ...]:
        """``idx`` with one entry per dimension: ``...`` expanded, missing trailing axes as ``:``."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (self.ndim - len(idx) + 1) + idx[k + 1 :]
        idx = idx + (slice(None),) * (self.ndim - len(idx))
        if len(idx) != self.ndim:
            raise IndexError(f"too many indices for {what} of shape {self.shape}")
        return idx

    @staticmethod
    def position(i: Any, n: int) -> int:
        """An integer index ``i`` on an axis of size ``n`` as ``0 .. n-1`` (negative from the end)."""
        j = int(i)
        if not -n <= j < n:
            raise IndexError(f"index {j} is out of bounds for an axis of size {n}")
        return j % n

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]  # type: ignore[index]
        return out if dtype is None else out.astype(dtype)


class LazyVolume(Regions):
    """A lazily read ZYX (C order) view of an X-fastest volume, sliced like a zarr array.

    ``read(index)`` reads the given (XYZ-order) tensorstore index; :meth:`__getitem__` takes a
    numpy-style ZYX index (integers and slices with positive steps) and returns a numpy array.
    Reads are retried on transient failures (:func:`pssr.io.remote.retry`, counted).
    """

    def __init__(self, store: Any, where: str) -> None:
        self._t = store
        self.where = where
        self.shape = tuple(int(n) for n in reversed(store.shape))
        self.dtype = np.dtype(store.dtype.numpy_dtype)
        self.ndim = len(self.shape)

    def __repr__(self) -> str:
        return f"LazyVolume({self.where!r}, shape={self.shape}, dtype={self.dtype})"

    def _index(self, idx: Any) -> tuple[list[Any], tuple[int, ...]]:
        idx = self.full_index(idx, "a volume")
        out: list[Any] = []
        shape: list[int] = []
        for i, n in zip(idx, self.shape, strict=True):
            if isinstance(i, slice):
                start, stop, step = i.indices(n)
                if step < 1:
                    raise IndexError("negative steps are not supported")
                out.append(slice(start, max(start, stop), step))
                shape.append(len(range(start, stop, step)))
            else:
                out.append(self.position(i, n))
        return out, tuple(shape)

    def __getitem__(self, idx: Any) -> np.ndarray:
        """A numpy array of the selected region (only its chunks are read)."""
        sel, shape = self._index(idx)
        if 0 in shape:
            return np.empty(shape, self.dtype)
        view = self._t[tuple(reversed(sel))]
        data = remote.retry(lambda: view.read(order="F").result(), self.where)
        return np.asarray(data).T


# ---------------------------------------------------------------------------- tensorstore
def _ts() -> Any:
    return remote.require("tensorstore", "reading N5 and Neuroglancer precomputed volumes")


def kvstore(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A tensorstore kvstore spec for a local path or URL; credentials stay in the environment."""
    if not remote.is_url(path):
        return {"driver": "file", "path": str(Path(path).resolve()) + "/"}
    scheme, bucket, key = remote.split_url(path)
    opts = dict(storage_options or {})
    secret = sorted(k for k in opts if k not in ("endpoint_url", "client_kwargs", "anon"))
    if secret:
        raise PssrIOError(
            f"{path!r}: --storage-options {secret} cannot be passed to tensorstore (which reads N5 and "
            "precomputed; it prints its settings in its error messages); give credentials through the "
            "environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
            "GOOGLE_APPLICATION_CREDENTIALS)."
        )
    if scheme == "s3":
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key + "/" if key else ""}
        endpoint = (
            opts.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        region = (opts.get("client_kwargs") or {}).get("region_name") or os.environ.get("AWS_REGION")
        region = region or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint:
            spec["endpoint"] = endpoint
            spec["aws_region"] = region or "us-east-1"
        elif region:
            spec["aws_region"] = region
        return spec
    if scheme == "gs":
        return {"driver": "gcs", "bucket": bucket, "path": key + "/" if key else ""}
    return {"driver": "http", "base_url": path.rstrip("/") + "/"}


def context_spec() -> dict[str, Any]:
    """Tensorstore context: a chunk cache (halos reuse chunks) and retries with backoff on every store."""
    retries = {"max_retries": 16, "initial_delay": "50ms", "max_delay": "5s"}
    return {
        "cache_pool": {"total_bytes_limit": _CACHE_BYTES},
        "s3_request_retries": retries,
        "gcs_request_retries": retries,
        "http_request_retries": retries,
    }


def _read_json(kv: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    ts = _ts()
    store = ts.KvStore.open(kv, context=ts.Context(context_spec())).result()
    res = remote.retry(lambda: store.read(key).result(), where)
    if res.state != "value":
        return None
    try:
        doc = json.loads(bytes(res.value))
    except ValueError as e:
        raise PssrIOError(
            f"{where}: {key} is not valid JSON ({e}); the volume's metadata is damaged."
        ) from None
    return doc if isinstance(doc, dict) else None


def sniff(path: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """``"precomputed"``, ``"n5"`` or ``"zarr"`` from a path's name or its metadata files; None if unknown."""
    name = path.rstrip("/").lower()
    for suffix, kind in ((".precomputed", "precomputed"), (".n5", "n5"), (".zarr", "zarr")):
        if name.endswith(suffix) or f"{suffix}/" in name:
            return kind
    if not remote.is_url(path):
        p = Path(path)
        if (p / "zarr.json").exists() or (p / ".zarray").exists() or (p / ".zgroup").exists():
            return "zarr"
        if (p / "info").is_file():
            return "precomputed"
        if (p / "attributes.json").is_file():
            return "n5"
        return None
    kv = kvstore(path, storage_options)
    for key, kind in (("zarr.json", "zarr"), (".zarray", "zarr"), (".zgroup", "zarr")):
        if _exists(kv, key, path):
            return kind
    if _exists(kv, "info", path):
        return "precomputed"
    if _exists(kv, "attributes.json", path):
        return "n5"
    return None


def _exists(kv: dict[str, Any], key: str, where: str) -> bool:
    try:
        return _read_json(kv, key, where) is not None
    except PssrIOError:
        return True
    except Exception:
        return False


def read_tensorstore(path: str, kind: str, storage_options: dict[str, Any] | None = None) -> Volume:
    """An N5 or precomputed volume (local or remote), read lazily."""
    ts = _ts()
    kv = kvstore(path, storage_options)
    meta_key = "info" if kind == "precomputed" else "attributes.json"
    try:
        meta = _read_json(kv, meta_key, path)
    except PssrIOError:
        raise
    except Exception as e:
        raise _explained(path, e, storage_options) from None
    if meta is None:
        raise _not_found(path, kind, meta_key, storage_options)
    spec: dict[str, Any] = {"kvstore": kv, "context": context_spec(), "recheck_cached_data": "open"}
    if kind == "precomputed":
        spec.update(driver="neuroglancer_precomputed", scale_index=0)
    else:
        spec.update(driver="n5")
    try:
        t = remote.retry(lambda: ts.open(spec, read=True).result(), path)
    except Exception as e:
        raise _explained(path, e, storage_options) from None
    scale: dict[str, float] = {}
    origin: dict[str, float] = {}
    unit: str | None = None
    names = ""
    if kind == "precomputed":
        nch = int(meta.get("num_channels", 1))
        if nch != 1:
            raise PssrIOError(
                f"precomputed volume {path!r} has {nch} channels; pssr restores one channel at a time "
                "(write each channel as its own volume)."
            )
        if meta.get("type") not in (None, "image"):
            raise PssrIOError(
                f"precomputed volume {path!r} is of type {meta.get('type')!r}; pssr restores images "
                "(type 'image'), not segmentations."
            )
        t = t[ts.d["channel"][0]]
        sc0 = (meta.get("scales") or [{}])[0]
        res = [float(v) for v in sc0.get("resolution", [1, 1, 1])]
        off = [float(v) for v in sc0.get("voxel_offset", [0, 0, 0])]
        scale = {a: r for a, r in zip("XYZ", res, strict=True)}
        origin = {a: (o + 0.5) * r for a, o, r in zip("XYZ", off, res, strict=True)}
        unit = "nanometer"
        names = "ZYX"
    else:
        names, scale, origin, unit = _n5_calibration(meta, t.ndim, path)
    t = t.translate_to[(0,) * t.ndim]
    vol = LazyVolume(t, path)
    if not scale:
        _no_calibration(path, kind)
    return Volume(vol, names or _guess_axes(vol.ndim), scale, unit, origin, not names)


def _n5_calibration(
    meta: dict[str, Any], ndim: int, where: str
) -> tuple[str, dict[str, float], dict[str, float], str | None]:
    """``(axes, scale, origin, unit)`` of an N5 dataset's attributes (lists in N5's XYZ order)."""
    xyz = "XYZT"[:ndim] if ndim <= 4 else ""
    names = ""
    axes_attr = meta.get("axes")
    if isinstance(axes_attr, list) and len(axes_attr) == ndim and all(isinstance(a, str) for a in axes_attr):
        named = "".join(a.upper() for a in axes_attr)
        if set(named) <= set("TZCYX") and len(set(named)) == ndim:
            xyz, names = named, named[::-1]
    scale: dict[str, float] = {}
    origin: dict[str, float] = {}
    unit: str | None = None
    tr = meta.get("transform")
    if isinstance(tr, dict) and isinstance(tr.get("axes"), list):  # COSEM / OpenOrganelle
        ax = [str(a).upper() for a in tr["axes"]]
        scale = {a: float(v) for a, v in zip(ax, tr.get("scale") or [], strict=False)}
        origin = {a: float(v) for a, v in zip(ax, tr.get("translate") or [], strict=False)}
        units = tr.get("units") or []
        unit = units[0] if units else None
        if set(ax) <= set("ZYX") and len(ax) == ndim:
            names = "".join(ax) if ax[-1] == "X" else "".join(ax[::-1])
    elif isinstance(meta.get("pixelResolution"), dict):  # BigDataViewer / n5-viewer
        pr = meta["pixelResolution"]
        scale = {a: float(v) for a, v in zip(xyz, pr.get("dimensions") or [], strict=False)}
        unit = pr.get("unit")
    elif isinstance(meta.get("resolution"), list):  # Saalfeld lab / funlib
        scale = {a: float(v) for a, v in zip(xyz, meta["resolution"], strict=False)}
        off = meta.get("offset")
        if isinstance(off, list):
            origin = {a: float(v) for a, v in zip(xyz, off, strict=False)}
        u = meta.get("units") or meta.get("unit")
        unit = u[0] if isinstance(u, list) and u else (u if isinstance(u, str) else None)
    if not names and ndim in (2, 3):
        names = "ZYX"[-ndim:]
    keep = set(names) if names else set("ZYX")
    scale = {a: v for a, v in scale.items() if a in keep}
    origin = {a: v for a, v in origin.items() if a in keep}
    return names, scale, origin, unit


def _no_calibration(where: str, kind: str) -> None:
    fixes = {
        "precomputed": "its info file's 'resolution'",
        "n5": "the dataset's attributes.json: 'pixelResolution' {'dimensions': [x, y, z], 'unit': 'nm'}, "
        "or 'resolution' [x, y, z] with 'offset'",
        "hdf5": "the dataset's attributes 'resolution' [z, y, x] in nm (CREMI) and 'offset', or "
        "'element_size_um' [z, y, x]",
    }
    logger.warning(
        "%s says nothing about its voxel size or offset: read with a pixel size of 1 and origin 0 (no "
        "unit), and the output will be calibrated the same way; to fix, set %s",
        where, fixes[kind],
    )  # fmt: skip


def _not_found(where: str, kind: str, key: str, storage_options: dict[str, Any] | None) -> PssrIOError:
    if remote.is_url(where):
        why = remote.probe(where, storage_options)
        if why is not None:
            return why
        return PssrIOError(
            f"cannot read {where!r}: HTTP 404: it has no '{key}' ({kind} metadata); check the URL (and "
            "AWS_ENDPOINT_URL / --storage-options endpoint_url for a non-AWS server)."
        )
    return PssrIOError(f"{where!r} has no '{key}': it is not a {kind} volume; check the path.")


def _explained(where: str, e: BaseException, storage_options: dict[str, Any] | None) -> PssrIOError:
    """One line for a tensorstore failure (never its spec: it follows the message in brackets)."""
    text = str(e).split(" [tensorstore_spec=")[0]
    if remote.is_url(where):
        status, _ = remote._status(text)
        if status is None and ("NOT_FOUND" in text or "PERMISSION_DENIED" in text):
            why = remote.probe(where, storage_options)
            if why is not None:
                return why
        return remote.explain(where, type(e)(text))
    return PssrIOError(f"cannot read {where!r}: {text.splitlines()[0][:300]}")


# ---------------------------------------------------------------------------------- HDF5
def read_hdf5(path: str) -> Volume:
    """A dataset of a local HDF5 file, ``file.h5:/group/dataset``, read lazily (an h5py Dataset)."""
    parts = h5_parts(path)
    assert parts is not None
    file, name = parts
    if remote.is_url(file):
        raise PssrIOError(
            f"{path!r}: HDF5 is read from a local file only (HDF5 over object storage reads at 2-12 MB/s "
            "through Python, and the h5py wheels lack the ros3 driver); copy the file first (e.g. "
            "`aws s3 cp`), or convert it to zarr or N5."
        )
    h5py = remote.require("h5py", "reading HDF5 files")
    if not Path(file).is_file():
        raise PssrIOError(f"input {file!r} does not exist; check the path.")
    try:
        f = h5py.File(file, "r")
    except OSError as e:
        raise PssrIOError(f"cannot read {file!r} as HDF5: {e}") from None
    datasets: list[str] = []
    f.visititems(lambda k, v: datasets.append("/" + k) if isinstance(v, h5py.Dataset) else None)
    if name is None:
        if len(datasets) != 1:
            raise PssrIOError(
                f"{file!r} holds {len(datasets)} datasets; name one as FILE.h5:/DATASET, e.g. "
                f"{', '.join(repr(file + ':' + d) for d in datasets[:4]) or '(none)'}."
            )
        name = datasets[0]
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise PssrIOError(
            f"{file!r} has no dataset {name!r}; its datasets: "
            f"{', '.join(datasets[:6]) or 'none'}{' ...' if len(datasets) > 6 else ''}."
        )
    attrs = dict(obj.attrs)
    nd = obj.ndim
    zyx = "ZYX"[-nd:] if nd <= 3 else _guess_axes(nd)
    scale: dict[str, float] = {}
    origin: dict[str, float] = {}
    unit: str | None = None
    if "resolution" in attrs:
        res = np.atleast_1d(np.asarray(attrs["resolution"], float))
        if res.size == len(zyx):
            scale = dict(zip(zyx, res.tolist(), strict=True))
            u = attrs.get("unit") or attrs.get("units")
            unit = (u.decode() if isinstance(u, bytes) else str(u)) if u is not None else "nanometer"
        off = attrs.get("offset")
        if off is not None and np.size(off) == len(zyx):
            origin = dict(zip(zyx, np.asarray(off, float).ravel().tolist(), strict=True))
    elif "element_size_um" in attrs:
        res = np.atleast_1d(np.asarray(attrs["element_size_um"], float))
        if res.size == len(zyx):
            scale, unit = dict(zip(zyx, res.tolist(), strict=True)), "micrometer"
    if not scale:
        _no_calibration(path, "hdf5")
    return Volume(obj, zyx, scale, unit, origin, nd > 2)
