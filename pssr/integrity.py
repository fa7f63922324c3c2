"""Guards that keep an output from ever being silently wrong.

* :func:`check_distinct`: no command writes into, over or around one of its own inputs
  (resolved paths, containment either way: ``x.ome.zarr/s0`` is inside ``x.ome.zarr``).
* :class:`OutputLock`: one writer per output.  An exclusive lock file beside the output
  records the owner's pid, host and process start time; a second run gets a clear error
  naming the file, and a lock left by a dead process on this host is taken over.
* :func:`digest`: the checksum stored in every block's done marker, so a resumed run can
  tell a complete chunk from one a crash or a full disk left truncated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pssr.errors import PssrError

logger = logging.getLogger(__name__)

__all__ = ["IntegrityError", "LockedError", "OutputLock", "check_distinct", "digest", "zarr_sources"]


class IntegrityError(PssrError):
    """An output is incomplete, corrupt or would overwrite an input; the message says how to fix it."""


class LockedError(IntegrityError):
    """Another run is writing the same output."""


def digest(*arrays: np.ndarray) -> str:
    """A 128-bit BLAKE2b checksum of arrays' dtypes, shapes and bytes (C order)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------- inputs vs outputs
def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_distinct(
    inputs: Iterable[str | os.PathLike | None], outputs: Iterable[str | os.PathLike | None]
) -> None:
    """Refuse outputs that are, contain or lie inside one of the inputs.

    Paths are compared after resolving symlinks and ``..``, so ``x.ome.zarr/s0`` as input and
    ``x.ome.zarr`` as output (or the reverse) are refused, as is ``a.tif`` -> ``./a.tif``.
    """
    ins = [Path(p).resolve() for p in inputs if p is not None]
    for o in outputs:
        if o is None:
            continue
        out = Path(o).resolve()
        for i in ins:
            if _overlap(i, out):
                how = "is" if i == out else ("lies inside" if out in i.parents else "contains")
                raise IntegrityError(
                    f"output {str(out)!r} {how} the input {str(i)!r}; writing it would modify or "
                    "delete the input, which pssr never does. Choose an output outside the input."
                )


def zarr_sources(data: Any) -> list[Path]:
    """Local folders of zarr arrays behind ``data`` (a zarr array, or a dask array made from one).

    Used to keep an in-memory-looking input (a napari layer backed by a zarr store) from being
    overwritten by its own restoration.
    """
    found: list[Path] = []

    def add(z: Any) -> None:
        root = getattr(getattr(z, "store", None), "root", None)
        if root is not None:
            found.append(Path(str(root)) / (getattr(z, "path", "") or ""))

    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is a dependency
        return found
    if isinstance(data, zarr.Array):
        add(data)
        return found
    graph = getattr(data, "dask", None)
    layers = getattr(graph, "layers", None)
    if layers is None:
        return found
    for layer in layers.values():
        # Only small layers: the array objects from_zarr puts in the graph, not per-chunk tasks.
        try:
            if len(layer) > 4:
                continue
            values = list(layer.values())
        except Exception:  # pragma: no cover - exotic layers
            continue
        for v in values:
            if isinstance(v, zarr.Array):
                add(v)
    return found


# --------------------------------------------------------------------------------- lock
def _proc_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # no such process, or no access
        return None


class OutputLock:
    """An exclusive lock on one output path, held for the duration of a ``with`` block.

    The lock is the file ``.<name>.pssr-lock`` beside the output, created with ``O_EXCL``; it
    holds JSON with the owner's ``pid``, ``host``, process ``start`` time and the time taken.
    A lock whose owner is on this host and no longer running (or whose pid now belongs to a
    process started later) is stale and taken over with a warning; a lock held by a live
    process or another host gives :class:`LockedError` naming the file.
    """

    def __init__(self, output: str | os.PathLike) -> None:
        out = Path(output).resolve()
        self.path = out.with_name(f".{out.name}.pssr-lock")
        self.output = out
        self._held = False

    def _info(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "start": _proc_start(pid), "taken": time.time()}

    def _stale(self, info: dict[str, Any]) -> bool:
        if info.get("host") != socket.gethostname():
            return False
        pid = info.get("pid")
        if not isinstance(pid, int):
            return True
        start = _proc_start(pid)
        if start is None:
            return True  # that process is gone
        recorded = info.get("start")
        return recorded is not None and abs(start - float(recorded)) > 1.0  # pid reused

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`LockedError`."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    info = json.loads(self.path.read_text() or "{}")
                    if not isinstance(info, dict):
                        info = {}
                except (OSError, json.JSONDecodeError):
                    info = {}
                if not info and time.time() - _mtime(self.path) < 5:
                    time.sleep(0.2)  # its owner is still writing it
                    continue
                if self._stale(info):
                    # Move the stale lock aside atomically: of two runs that both found it stale,
                    # only one rename succeeds, and both then race fairly on O_EXCL.
                    aside = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.stale")
                    try:
                        os.replace(self.path, aside)
                        aside.unlink(missing_ok=True)
                        logger.warning(
                            "took over the stale lock %s (pid %s on %s is no longer running)",
                            self.path,
                            info.get("pid"),
                            info.get("host"),
                        )
                    except FileNotFoundError:
                        pass
                    continue
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("taken", 0)))
                raise LockedError(
                    f"output {str(self.output)!r} is being written by another pssr run (pid "
                    f"{info.get('pid')} on host {info.get('host')!r}, since {when}); wait for it to "
                    f"finish, or, if that run is dead, delete the lock file {str(self.path)!r} and "
                    "run again (it resumes)."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self._info(), f)
            self._held = True
            return self
        raise LockedError(
            f"could not take the lock {str(self.path)!r} for {str(self.output)!r}; another run keeps "
            "taking it. Wait for it to finish, or delete the lock file if no run is active."
        )

    def release(self) -> None:
        """Give the lock back (only if this object holds it)."""
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0
