"""Small helpers shared by several core modules (one definition each; no torch, no GUI)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pssr.errors import PssrError

__all__ = ["Planes", "check_folder", "file_sha256", "replaceable", "strided_sample"]


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
    """A strided subsample of an array-like without reading it all (for percentiles).

    At most about ``max_px`` pixels: every plane of a small input, else up to 8 evenly spaced
    planes (of a ``(N, Y, X)`` view) subsampled in Y and X with the same stride.
    """
    n = int(np.prod(arr.shape))
    if n <= max_px:
        return np.asarray(arr[...], np.float32)
    if arr.ndim not in (2, 3):
        arr = Planes(arr)
    planes = arr.shape[0] if arr.ndim == 3 else 1
    step_p = max(1, planes // 8) if arr.ndim == 3 else 1
    sel = arr[::step_p] if arr.ndim == 3 else arr
    per = int(np.prod(sel.shape))
    st = int(np.ceil(np.sqrt(per / max_px)))
    return np.asarray(sel[..., ::st, ::st], np.float32)


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
