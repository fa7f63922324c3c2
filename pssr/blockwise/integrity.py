"""Guards that keep an output from ever being silently wrong.

* :func:`check_distinct`: no command writes into, over or around one of its own inputs
  (resolved paths, containment either way: ``x.ome.zarr/s0`` is inside ``x.ome.zarr``).
* :class:`OutputLock`: one writer per output.  An exclusive lock file beside the output
  records the owner's pid, host and process start time; a second run gets a clear error
  naming the file, and a lock left by a dead process on this host is taken over.
* :class:`RegionClaims`: one writer per block: runs filling regions of one output claim them,
  overlapping claims are refused.
* :func:`digest`: the checksum stored in every block's done marker, so a resumed run can
  tell a complete chunk from one a crash or a full disk left truncated.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pssr.errors import IntegrityError, LockedError
from pssr.io import remote
from pssr.io.formats import block_digest

logger = logging.getLogger(__name__)

__all__ = [
    "IntegrityError",
    "LockedError",
    "OutputLock",
    "RegionClaims",
    "check_distinct",
    "container",
    "digest",
    "protected",
    "zarr_sources",
]


digest = block_digest  # one checksum for work stores, OME-Zarr outputs and TIFF outputs


# ----------------------------------------------------------------------- inputs vs outputs
def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


_ZARR_META = ("zarr.json", ".zarray", ".zgroup", ".zattrs")


def _is_zarr_node(p: Path) -> bool:
    return any((p / m).is_file() for m in _ZARR_META)


def container(p: Path) -> Path:
    """The outermost zarr node that holds ``p`` (its OME-Zarr group, bioformats2raw root, zarr store).

    ``p`` itself for anything that is not inside a zarr hierarchy (a TIFF, a plain folder).
    """
    top = p
    for q in p.parents:
        if q.name == ".pssr":  # pssr's bookkeeping folder inside an output: its group is above it
            continue
        if not _is_zarr_node(q):
            break
        top = q
    return top


def protected(p: Path) -> list[tuple[Path, str]]:
    """What an output must stay clear of for the input ``p`` (resolved): the input, its container, its work.

    The container is the outermost zarr node holding the input (``in.ome.zarr`` for
    ``in.ome.zarr/s0``); the work folder is the hidden work store of a TIFF input that is itself a
    pssr output (``.in.tif.pssr-work.zarr``), which an interrupted restoration of it resumes from.
    """
    out = [(p, "the input")]
    top = container(p)
    if top != p:
        out.append((top, "the zarr container (OME-Zarr group / zarr store) of the input"))
    if p.name.lower().endswith((".tif", ".tiff")):
        out.append((p.with_name(f".{p.name}.pssr-work.zarr"), "the work folder of the input"))
    return out


def _url_protected(parts: tuple[str, str, tuple[str, ...]]) -> list[tuple[tuple, str]]:
    """What an output URL must stay clear of for an input URL: the input and its zarr container.

    The container is the prefix up to the first key segment ending in ``.zarr`` (``in.ome.zarr`` for
    ``in.ome.zarr/s0``): an object store has no marker files to look for without a request.
    """
    scheme, bucket, segs = parts
    out: list[tuple[tuple, str]] = [(parts, "the input")]
    for n, seg in enumerate(segs[:-1]):
        if seg.lower().endswith(".zarr"):
            out.append(
                (
                    (scheme, bucket, segs[: n + 1]),
                    "the zarr container (OME-Zarr group / zarr store) of the input",
                )
            )
            break
    return out


def _url_str(parts: tuple[str, str, tuple[str, ...]]) -> str:
    return f"{parts[0]}://{parts[1]}/" + "/".join(parts[2])


def _refuse(out: str, how: str, whose: str) -> None:
    raise IntegrityError(
        f"output {out!r} {how} {whose}; writing it would modify or delete the input or "
        "what holds it, which pssr never does. Choose an output outside the input's folder."
    )


def _as_url(p: Any) -> str | None:
    return p if isinstance(p, str) and remote.is_url(p) else None


def check_distinct(
    inputs: Iterable[str | os.PathLike | None],
    outputs: Iterable[str | os.PathLike | None],
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Refuse outputs that are, contain or lie inside one of the inputs or its container.

    Paths are compared after resolving symlinks and ``..``, so ``x.ome.zarr/s0`` as input and
    ``x.ome.zarr`` as output (or the reverse) are refused, as is ``a.tif`` -> ``./a.tif``; nothing is
    written anywhere inside an input's container either (``x.ome.zarr/s0`` -> ``x.ome.zarr/s9.ome.zarr``:
    :func:`protected`).  URLs (``s3://``, ``gs://``, ``http(s)://``) are compared the same way after
    :func:`pssr.io.remote.url_parts` (scheme, bucket, key with ``//`` and trailing slashes dropped, an
    http(s) URL on the S3 endpoint in ``storage_options`` / ``AWS_ENDPOINT_URL`` as its ``s3://``
    URL); a URL with a ``.`` or ``..`` key segment is refused.  A URL and a local path never overlap.
    """
    inputs, outputs = [p for p in inputs if p is not None], [p for p in outputs if p is not None]
    url_ins = [(u, remote.url_parts(u, storage_options)) for u in map(_as_url, inputs) if u]
    ins = [Path(p).resolve() for p in inputs if not _as_url(p)]
    for o in outputs:
        if (ou := _as_url(o)) is not None:
            op = remote.url_parts(ou, storage_options)
            for u, ip in url_ins:
                for guarded, what in _url_protected(ip):
                    if guarded[:2] != op[:2]:
                        continue
                    g, k = guarded[2], op[2]
                    if g == k:
                        how = "is"
                    elif k[: len(g)] == g:
                        how = "lies inside"
                    elif g[: len(k)] == k:
                        how = "contains"
                    else:
                        continue
                    whose = f"the input {u!r}" if guarded == ip else f"{_url_str(guarded)!r}, {what} {u!r}"
                    _refuse(ou, how, whose)
            continue
        out = Path(o).resolve()
        for i in ins:
            for guarded, what in protected(i):
                if not _overlap(guarded, out):
                    continue
                how = "is" if guarded == out else ("contains" if out in guarded.parents else "lies inside")
                whose = f"the input {str(i)!r}" if guarded == i else f"{str(guarded)!r}, {what} {str(i)!r}"
                _refuse(str(out), how, whose)


def _store_path(z: Any) -> Path | None:
    """The local folder of a zarr array's store (LocalStore, or fsspec on the local filesystem)."""
    store = getattr(z, "store", None)
    root = getattr(store, "root", None)
    if root is None:
        fs = getattr(store, "fs", None)
        protocol = getattr(getattr(fs, "sync_fs", fs), "protocol", None)
        local = protocol is not None and ("file" in protocol or "local" in protocol)
        root = getattr(store, "path", None) if local or fs is not None else None
    if root is None:
        return None
    return Path(str(root)) / (getattr(z, "path", "") or "")


def zarr_sources(data: Any) -> list[Path]:
    """Local folders of zarr arrays behind ``data`` (a zarr array, or a dask array made from one).

    Used to keep an in-memory-looking input (a napari layer backed by a zarr store, opened
    by path through fsspec or from an array, inlined or not) from being overwritten by its own
    restoration.  Only the first tasks of each graph layer are looked at (every task of a
    ``from_zarr`` layer refers to the same array).
    """
    import zarr

    found: list[Path] = []

    def walk(v: Any, depth: int) -> None:
        if isinstance(v, zarr.Array):
            p = _store_path(v)
            if p is not None:
                found.append(p)
        elif depth < 5:
            if isinstance(v, tuple | list):
                for x in v[:8]:
                    walk(x, depth + 1)
            elif isinstance(v, dict):
                for x in list(v.values())[:8]:
                    walk(x, depth + 1)
            else:
                for attr in ("args", "kwargs", "value"):  # dask task-spec nodes
                    if hasattr(v, attr) and not callable(getattr(v, attr)):
                        walk(getattr(v, attr), depth + 1)

    if isinstance(data, zarr.Array):
        walk(data, 0)
        return found
    layers = getattr(getattr(data, "dask", None), "layers", None)
    if layers is None:
        return found
    for layer in layers.values():
        try:
            values = [v for _, v in zip(range(8), layer.values(), strict=False)]
        except Exception:  # pragma: no cover - exotic layers
            continue
        for v in values:
            walk(v, 0)
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
        if not info.get("host"):
            # Empty or garbage: not written by this version (which links a complete record);
            # left by a crash or by hand, after a grace period for other writers.
            return time.time() - _mtime(self.path) > 5
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

    def acquire(self, wait: float = 0.0) -> OutputLock:
        """Take the lock or raise :class:`LockedError` (after retrying for ``wait`` seconds)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._acquire()
            except LockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def _acquire(self) -> OutputLock:
        for _ in range(3):
            # Write the owner's record to a private file, then hard-link it to the lock name: the
            # lock appears atomically with its content (a full disk fails before, never leaving an
            # empty lock), and of two runs only one link succeeds.
            tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                tmp.write_text(json.dumps(self._info()))
                _link_or_create(tmp, self.path)
            except FileExistsError:
                try:
                    info = json.loads(self.path.read_text() or "{}")
                    if not isinstance(info, dict):
                        info = {}
                except (OSError, json.JSONDecodeError):
                    info = {}
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
                if not info.get("host"):
                    raise LockedError(
                        f"output {str(self.output)!r} is locked by {str(self.path)!r}, which is empty or "
                        "unreadable (another run is creating it, or one crashed); run again in a few "
                        "seconds (a lock left empty is taken over after 5 s), or delete it if no other "
                        "run is writing this output."
                    ) from None
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("taken", 0)))
                raise LockedError(
                    f"output {str(self.output)!r} is being written by another pssr run (pid "
                    f"{info.get('pid')} on host {info.get('host')!r}, since {when}); wait for it to "
                    f"finish, or, if that run is dead, delete the lock file {str(self.path)!r} and "
                    "run again (it resumes)."
                ) from None
            finally:
                tmp.unlink(missing_ok=True)
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


class RegionClaims:
    """One writer per block: the regions that live runs write in one output.

    Each run writing an output claims its region (``(start, stop)`` input pixels per axis; the
    whole input for a run without ``--region``) with a file in ``.<output>.pssr-regions/``
    holding the region and the owner's pid, host and process start time.  Claims are made and
    checked while holding the output's :class:`OutputLock`, taken only for that moment (and to
    create or finish the output), so two runs never claim overlapping regions: the second is
    refused, naming the first.  A claim whose owner is dead (``kill -9``) is stale and dropped,
    exactly as a stale :class:`OutputLock` is.
    """

    def __init__(self, output: str | os.PathLike) -> None:
        out = Path(output).resolve()
        self.dir = out.with_name(f".{out.name}.pssr-regions")
        self.output = out
        self._probe = OutputLock(output)

    def live(self) -> list[tuple[Path, dict[str, Any]]]:
        """Claims of live runs (stale ones removed); call with the output lock held."""
        if not self.dir.is_dir():
            return []
        res = []
        for f in sorted(self.dir.glob("*.json")):
            try:
                info = json.loads(f.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                info = {}
            if not isinstance(info, dict) or self._probe._stale(info) or not info.get("region"):
                logger.warning("dropped the stale region claim %s (its run is no longer running)", f)
                f.unlink(missing_ok=True)
                continue
            res.append((f, info))
        return res

    def claim(self, region: list[list[int]], *, full_output: bool, overwrite: bool, describe) -> Path:
        """Claim ``region`` or raise :class:`LockedError`; call with the output lock held."""
        for _, info in self.live():
            why = remote.claim_conflict(
                region, info, full_output=full_output, overwrite=overwrite, describe=describe
            )
            if why:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("taken", 0)))
                raise LockedError(
                    f"output {str(self.output)!r} is being written by another pssr run (pid "
                    f"{info.get('pid')} on host {info.get('host')!r}, since {when}); {why}. Wait for it "
                    f"to finish, choose another region, or, if that run is dead, delete "
                    f"{str(self.dir)!r} and run again (it resumes)."
                )
        self.dir.mkdir(exist_ok=True)
        path = self.dir / f"{uuid.uuid4().hex}.json"
        info = {
            **self._probe._info(),
            "region": [list(map(int, r)) for r in region],
            "full_output": full_output,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)
        return path

    def release(self, path: Path | None) -> None:
        """Drop a claim (and the folder once empty)."""
        if path is not None:
            path.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass  # other claims remain


def _link_or_create(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst``, failing if ``dst`` exists.

    On filesystems without hard links: an exclusive create followed by the write.
    """
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(src.read_text())


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0
