"""Small helpers shared by several core modules (one definition each; no torch, no GUI)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pssr.errors import PssrError

__all__ = [
    "Planes",
    "check_folder",
    "chunk_exists",
    "chunk_grid",
    "chunk_key_separator",
    "file_sha256",
    "replaceable",
    "sample_crops",
    "stored_chunks",
    "strided_sample",
]


MAX_IO_THREADS = 64


def io_threads() -> int:
    """Threads for a run's CPU-side work (chunk encoding, checksums, pyramid, verification).

    ``$PSSR_IO_THREADS`` when set (1 to :data:`MAX_IO_THREADS`), else the CPUs this process may
    use, at most 8.  On a GPU node this work, not the network, sets the pace
    (docs/benchmarks/gpu.md); on a CPU-only node it overlaps the network and takes what the
    network leaves.
    """
    env = os.environ.get("PSSR_IO_THREADS", "").strip()
    if env:
        digits = env.lstrip("0") or "0"
        n = int(digits) if env.isascii() and env.isdigit() and len(digits) <= 4 else 0
        if not 1 <= n <= MAX_IO_THREADS:
            raise PssrError(
                f"PSSR_IO_THREADS={env!r} must be a whole number from 1 to {MAX_IO_THREADS}; unset it "
                "for the default (the usable CPUs, at most 8)."
            )
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def thread_map(fn, items, threads: int | None = None):
    """``fn`` over ``items`` in :func:`io_threads` threads; results yielded in the items' order.

    The first error in that order is raised when its turn comes; work not yet started is
    cancelled and the running calls finish before it propagates (no thread outlives the call).
    """
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    n = io_threads() if threads is None else max(1, int(threads))
    if n == 1 or len(items) < 2:
        for x in items:
            yield fn(x)
        return
    pool = ThreadPoolExecutor(max_workers=min(n, len(items)), thread_name_prefix="pssr-io")
    try:
        futures = [pool.submit(fn, x) for x in items]
        for f in futures:
            yield f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_folder(path: str | os.PathLike, error: type[Exception], fix: str = "choose another output") -> Path:
    """The folder an output will be written into must exist and be writable; returns it.

    ``error`` is the caller's error class (so the message belongs to its family) and ``fix`` what
    the user should do about an unwritable folder.
    """
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise error(f"output folder {str(parent)!r} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise error(f"output folder {str(parent)!r} is not writable; {fix}.")
    return parent


class Planes:
    """A lazy array-like seen as ``(N, Y, X)`` planes: 2D -> ``(1, Y, X)``, TZYX -> ``(T*Z, Y, X)``.

    Indexing takes a plane index or slice first, then any YX indices; only the planes asked for
    are read.
    """

    def __init__(self, a: Any) -> None:
        if a.ndim < 2:
            raise PssrError(f"an array of shape {tuple(a.shape)} has no YX planes.")
        self.a = a
        self._lead = tuple(int(n) for n in a.shape[:-2])
        self.shape = (int(np.prod(self._lead)), *(int(n) for n in a.shape[-2:]))
        self.ndim = 3
        self.dtype = a.dtype

    def __getitem__(self, idx: Any) -> np.ndarray:
        if idx is Ellipsis:
            return np.asarray(self.a[...]).reshape(self.shape)
        idx = idx if isinstance(idx, tuple) else (idx,)
        p, rest = idx[0], idx[1:]
        planes = range(*p.indices(self.shape[0])) if isinstance(p, slice) else [int(p)]
        if not planes:  # an empty selection: the right shape, nothing read
            return np.zeros((0, *self.shape[1:]), self.dtype)[(slice(None), *rest)]
        out = np.stack([np.asarray(self.a[(*self._lead_index(q), *rest)]) for q in planes])
        return out if isinstance(p, slice) else out[0]

    def _lead_index(self, q: int) -> tuple[int, ...]:
        if not 0 <= q < self.shape[0]:
            raise IndexError(f"plane {q} is outside 0..{self.shape[0] - 1}.")
        return tuple(int(i) for i in np.unravel_index(q, self._lead)) if self._lead else ()


def strided_sample(arr: Any, max_px: int = 2**22) -> np.ndarray:
    """A subsample of an array-like for percentiles, read in memory bounded by ``max_px``.

    At most about ``max_px`` pixels: every plane of a small input, else up to 8 evenly spaced
    planes (of a ``(N, Y, X)`` view) read one at a time.  A plane of at most ``max_px`` pixels is
    read whole and subsampled in Y and X with one stride (the same pixels as reading them all at
    once); a larger one gives a grid of small crops instead (:func:`sample_crops`: chunk-aligned,
    evenly spaced, from stored chunks where the array can say which exist), so a 10^5-pixel-wide
    section costs a few MB, never the section.  Deterministic: the same input, the same sample.
    """
    n = int(np.prod(arr.shape))
    if n <= max_px:
        return np.asarray(arr[...], np.float32)
    planes_view = arr if arr.ndim == 3 else Planes(arr) if arr.ndim > 3 else None
    if planes_view is None:  # one 2D plane
        return _plane_sample(arr, (), max_px)
    n_planes = planes_view.shape[0]
    step_p = max(1, n_planes // 8)
    picked = range(0, n_planes, step_p)
    per = int(np.prod(planes_view.shape[1:])) * len(picked)
    st = int(np.ceil(np.sqrt(per / max_px)))
    if int(np.prod(planes_view.shape[1:])) <= max_px:  # small planes: the strided pixels, as always
        return np.stack([np.asarray(planes_view[q][::st, ::st], np.float32) for q in picked])
    lead = [tuple(int(i) for i in np.unravel_index(q, arr.shape[:-2])) for q in picked]
    out = np.concatenate([_plane_sample(arr, p, max_px // len(picked)).ravel() for p in lead])
    return out if out.size else _fill_sample(arr)


def _fill_sample(arr: Any) -> np.ndarray:
    """The sample of an array with nothing stored: its fill value."""
    fill = getattr(arr, "fill_value", None)
    return np.full(1, float(fill) if fill is not None else 0.0, np.float32)


def _plane_sample(arr: Any, plane: tuple[int, ...], max_px: int) -> np.ndarray:
    """About ``max_px`` pixels of one plane: the strided plane when it is small, else crops."""
    h, w = (int(n) for n in arr.shape[-2:])
    if h * w <= max_px:
        return np.asarray(arr[plane] if plane else arr[...], np.float32)
    out = sample_crops(arr, plane, max_px)
    return out if out.size or plane else _fill_sample(arr)


def _crop_side(arr: Any) -> tuple[int, int]:
    """Crop height and width for :func:`sample_crops`: the array's chunk in Y/X, 64 to 512 px."""
    chunks = getattr(arr, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == len(arr.shape) and all(type(c) is int for c in chunks):
        cy, cx = chunks[-2:]
        return (cy if 64 <= cy <= 512 else 256), (cx if 64 <= cx <= 512 else 256)
    return 256, 256


def sample_crops(arr: Any, plane: tuple[int, ...], max_px: int) -> np.ndarray:
    """About ``max_px`` pixels of plane ``plane`` of ``arr`` as a grid of chunk-aligned crops (flat).

    The crops lie on an evenly spaced grid of crop-sized cells.  For a zarr array, crops over
    chunks that are not stored (fill value, e.g. outside the tissue of a sparse volume) are
    replaced by crops of stored chunks of that plane (the first in C order), so a volume with a
    few populated chunks is normalised on its data, not on its fill value; an array without any
    stored chunk in that plane gives its fill value.
    """
    h, w = (int(n) for n in arr.shape[-2:])
    ch, cw = _crop_side(arr)
    ny, nx = -(-h // ch), -(-w // cw)
    k = max(1, max_px // (ch * cw))
    g = max(1, int(np.floor(np.sqrt(k))))
    ys = sorted({int(round(v)) for v in np.linspace(0, ny - 1, min(g, ny))})
    xs = sorted({int(round(v)) for v in np.linspace(0, nx - 1, min(g, nx))})
    cells = [(y, x) for y in ys for x in xs]
    stored = _stored_cells(arr, plane, (ch, cw), set(cells), len(cells))
    if stored is not None:
        cells = stored
    if not cells:  # nothing stored in this plane
        return np.zeros(0, np.float32)
    out = [
        np.asarray(arr[(*plane, slice(y * ch, min(h, (y + 1) * ch)), slice(x * cw, min(w, (x + 1) * cw)))])
        for y, x in cells
    ]
    return np.concatenate([o.ravel() for o in out]).astype(np.float32)


def _stored_cells(
    arr: Any, plane: tuple[int, ...], cell: tuple[int, int], wanted: set[tuple[int, int]], n: int
) -> list[tuple[int, int]] | None:
    """For a zarr array whose chunks are the cells: the wanted cells that are stored, topped up.

    Each wanted cell's chunk is looked up (one ``exists`` each); when some are missing, the plane's
    stored chunks are listed and the first of them in C order take their place (at most ``n`` in
    all).  None when the array cannot say which chunks exist.
    """
    chunks = getattr(arr, "chunks", None)
    if not hasattr(arr, "store_path") or not isinstance(chunks, tuple) or chunks[-2:] != cell:
        return None
    if any(c != 1 for c in chunks[:-2]) or getattr(arr, "shards", None):
        return None
    try:
        keep = sorted(yx for yx in wanted if chunk_exists(arr, (*plane, *yx)))
        if len(keep) == len(wanted):
            return keep
        extra: list[tuple[int, int]] = []
        for idx in stored_chunks(arr, lead=plane):
            yx = (idx[-2], idx[-1])
            if tuple(idx[:-2]) == tuple(plane) and yx not in wanted:
                extra.append(yx)
                if len(extra) > 4 * n:  # bounded: the smallest ones kept
                    extra = sorted(extra)[:n]
    except Exception:  # a store that cannot be listed: sample as if every chunk were stored
        return None
    return keep + sorted(extra)[: n - len(keep)]


def chunk_key_separator(arr: Any) -> str:
    """The separator of a zarr array's chunk keys (``/``: a plane's chunks share a key prefix)."""
    return _key_encoding(arr)[2]


def _key_encoding(arr: Any):
    """``(encode, decode, separator)`` of a zarr array's chunk keys (relative to the array)."""
    md = arr.metadata
    if md.zarr_format == 3:
        enc = md.chunk_key_encoding
        sep = getattr(enc, "separator", "/")
        if getattr(enc, "name", "default") == "default":  # "c/1/2/3" (zarr's own decoder splits "/" wrong)

            def decode_default(key: str) -> tuple[int, ...]:
                if key == "c":
                    return ()
                if not key.startswith("c" + sep):
                    raise ValueError(key)
                return tuple(int(p) for p in key[2:].split(sep))

            return enc.encode_chunk_key, decode_default, sep
    else:
        sep = getattr(md, "dimension_separator", ".") or "."

    def encode(idx: tuple[int, ...]) -> str:
        return sep.join(str(i) for i in idx) if idx else "0"

    def decode(key: str) -> tuple[int, ...]:
        return tuple(int(p) for p in key.split(sep))

    return encode, decode, sep


def _array_prefix(arr: Any) -> str:
    path = arr.store_path.path
    return path + "/" if path else ""


def chunk_exists(arr: Any, idx: tuple[int, ...]) -> bool:
    """Whether chunk ``idx`` (chunk-grid index; shard index for a sharded array) is stored."""
    from zarr.core.sync import sync

    encode, _, _ = _key_encoding(arr)
    return bool(sync(arr.store_path.store.exists(_array_prefix(arr) + encode(tuple(idx)))))


def stored_chunks(arr: Any, lead: tuple[int, ...] = ()):
    """Chunk-grid indices of the chunks a zarr array has in its store (missing ones are fill value).

    Lists the store under the array's path (no chunk is read), so it costs the stored chunks,
    never the declared grid: a (1000, 200000, 200000) array with three chunks yields three indices
    at once.  ``lead`` (leading chunk indices) narrows the listing to that part of the grid where
    the keys are folders (zarr v3's default ``c/0/1/2``); other chunks may still be yielded.
    Sharded arrays yield shard indices (:func:`chunk_grid`).
    """
    from zarr.core.sync import sync

    encode, decode, sep = _key_encoding(arr)
    base = _array_prefix(arr)
    ndim = len(arr.shape)
    prefix = base
    if lead and sep == "/":
        full = encode(tuple(lead) + (0,) * (ndim - len(lead)))
        prefix = base + "/".join(full.split("/")[: -(ndim - len(lead))]) + "/"

    async def keys() -> list[str]:
        return [k async for k in arr.store_path.store.list_prefix(prefix)]

    for key in sync(keys()):
        rel = key[len(base) :]
        if rel.rsplit("/", 1)[-1] in ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"):
            continue
        try:
            idx = tuple(int(i) for i in decode(rel))
        except (ValueError, TypeError):
            continue
        if len(idx) == ndim:
            yield idx


def chunk_grid(arr: Any) -> tuple[int, ...]:
    """The shape of the unit :func:`stored_chunks` counts in (a sharded array's shards, else its chunks)."""
    shards = getattr(arr, "shards", None)
    return tuple(shards) if shards else tuple(arr.chunks)


def file_sha256(path: str | None) -> str:
    """The sha256 of a file's bytes (hex), or "" when there is no such file."""
    if not path or not Path(path).is_file():
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replaceable(folder: Path, names: set[str] | frozenset[str] = frozenset()) -> bool:
    """Whether ``--overwrite`` may delete ``folder``: empty, written by pssr, or a pssr store cut short.

    "Written by pssr" = its zarr.json carries a ``pssr`` record (``pssr`` / ``pssr_axes``
    attributes); "cut short" = a zarr group without attributes holding only ``names``.  Anything
    else may be someone's data and is never deleted.
    """
    entries = {e.name for e in folder.iterdir()}
    if not entries:
        return True
    try:
        attrs = json.loads((folder / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    if isinstance(attrs, dict) and any(k.startswith("pssr") for k in attrs):
        return True
    return not attrs and entries <= set(names) | {"zarr.json"}
