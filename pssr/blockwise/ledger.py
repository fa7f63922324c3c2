"""Done records of a restoration: which blocks are written, with their checksums.

A :class:`Ledger` is what the engine and the store use to say "this block is done" and to find,
on resume, what was done before.  The interface is small on purpose (:meth:`Ledger.record`,
:meth:`Ledger.load`, :meth:`Ledger.forget`, :meth:`Ledger.clear`) so that a backend for an
object store (no rename, no append: one object per writer and batch, conditional writes) can be
added beside the local one.

:class:`LocalLedger` keeps the records in the output's ``.pssr/done`` folder as one append-only
JSON-lines log per writer process (``<host>.<pid>.<random>.jsonl``): each record is one line
``{"k": block key, "t": time, ...stats}`` written with a single ``write`` and ``fsync``'d once per
call of :meth:`~LocalLedger.record` (a batch of blocks).  No two processes share a file, so
concurrent writers (dask workers, jobs filling regions of one output) never interleave; a line
cut by ``kill -9`` can only be the last of a dead writer's log and is ignored when loading.  When
a key has several records (a block redone, or forgotten with a tombstone), the newest wins.
Per-block marker files of older pssr versions are still read, so their outputs resume.

:class:`ObjectLedger` keeps the same records on object storage (S3, GCS), where there is no append
and no rename: each call of :meth:`~ObjectLedger.record` puts one new object
``<host>.<pid>.<random>.<sequence>.jsonl`` under the output's ``.pssr/done/`` with
``If-None-Match: *`` (a name is written once, by one writer, whole or not at all: a put is
atomic), so a killed writer leaves only whole objects; loading lists the prefix and reads every
object (side by side), the newest record per key winning as in the local logs.

Each object-store record carries the id of the run that owns the output (``run``: the id in the
output's ``zarr.json``, made when the output is created, kept when it is resumed), and a reader
that knows the owner's id (:attr:`ObjectLedger.run`) ignores the records of any other run: a
writer that lost the output's lease (stalled past its expiry while another run took the output
over with ``--overwrite``) can neither add blocks to the new run's output nor override its records.
The writer's lease (:attr:`ObjectLedger.guard`) is checked before every put, and by the engine
before every block written.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Ledger", "LocalLedger", "ObjectLedger", "Records", "ledger_for"]

_LOG_EXT = ".jsonl"


class Ledger:
    """Where a restoration records finished blocks (the interface every backend implements)."""

    def record(self, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Record blocks ``(key, stats)`` as done, durably, before returning."""
        raise NotImplementedError

    def load(self) -> Mapping[str, dict[str, Any]]:
        """Every block recorded as done (newest record per key), with its stats."""
        raise NotImplementedError

    def forget(self, keys: Iterable[str]) -> None:
        """Blocks found damaged: no longer done (they will be redone)."""
        raise NotImplementedError

    def clear(self) -> None:
        """Drop every record (the output is complete; its checksums live in the output)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise unless this writer may still write the output (it holds its lease); local: always."""


class LocalLedger(Ledger):
    """Append-only JSON-lines logs, one per writer process, in a folder (an output's ``.pssr/done``)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.dir = Path(folder)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid: int | None = None

    # ----------------------------------------------------------------------------- writing
    def _log_fd(self) -> int:
        """The log of this process (opened on first use; a forked child opens its own)."""
        if self._fd is not None and self._pid == os.getpid() and os.fstat(self._fd).st_nlink == 0:
            os.close(self._fd)  # the output was deleted (replaced with --overwrite) since: a new log
            self._fd = None
        if self._fd is None or self._pid != os.getpid():
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_LOG_EXT}"
            self._fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
            self._pid = os.getpid()
        return self._fd

    def _append(self, lines: list[dict[str, Any]]) -> None:
        if not lines:
            return
        data = "".join(json.dumps(rec, separators=(",", ":")) + "\n" for rec in lines).encode()
        with self._lock:
            fd = self._log_fd()
            view = memoryview(data)
            while view:  # one write in practice; a short write (a full disk raises) continues
                n = os.write(fd, view)
                view = view[n:]
            _sync(fd)

    def record(self, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Append one line per block and fsync once."""
        t = time.time()
        self._append([{**stats, "k": key, "t": t} for key, stats in items])

    def forget(self, keys: Iterable[str]) -> None:
        """Append tombstones (newer than the records they cancel)."""
        t = time.time()
        self._append([{"k": k, "t": t, "forget": True} for k in keys])

    def close(self) -> None:
        """Close this process's log (it is reopened by the next record)."""
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None

    # ----------------------------------------------------------------------------- reading
    def load(self) -> Records:
        """Every log's records, the newest per key; torn or garbled lines skipped."""
        if not self.dir.is_dir():
            return Records({})
        best: dict[str, tuple[float, bytes | None]] = {}
        for f in self.dir.iterdir():
            name = f.name
            if name.startswith("."):
                continue
            if name.endswith(_LOG_EXT):
                for line, rec in _read_log(f):
                    key, t = rec.get("k"), rec.get("t")
                    if not isinstance(key, str) or not isinstance(t, int | float):
                        continue
                    old = best.get(key)
                    if old is None or t >= old[0]:
                        best[key] = (t, None if rec.get("forget") else line)
            else:  # a marker file of pssr <= 0.x (one JSON file per block): still resumable
                try:
                    rec = json.loads(f.read_text() or "{}")
                except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                    continue  # a marker cut by a crash: redo that block
                if isinstance(rec, dict) and name not in best:
                    best[name] = (-1.0, json.dumps(rec).encode())
        return Records({key: line for key, (_, line) in best.items() if line is not None})

    def clear(self) -> None:
        """Remove the folder with every log."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ObjectLedger(Ledger):
    """Done records as write-once objects under a URL (an output's ``.pssr/done`` on S3 / GCS)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._lock = threading.Lock()
        self._seq = 0
        self._name = ""
        self._pid: int | None = None
        self.run: str | None = None  # the id of the run that owns the output: records stamped, others ignored
        self.guard: Any = None  # this writer's lease (pssr.io.remote.Lease), checked before each put

    def check(self) -> None:
        """Raise :class:`~pssr.errors.LockedError` when this writer lost the output's lease."""
        if self.guard is not None:
            self.guard.check()

    def _store(self) -> Any:
        from pssr.io import remote

        return remote.raw_store(self.url)

    def _next_name(self) -> str:
        with self._lock:
            if not self._name or self._pid != os.getpid():  # a forked child names its own objects
                self._name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                self._pid, self._seq = os.getpid(), 0
            self._seq += 1
            return f"{self._name}.{self._seq:08d}{_LOG_EXT}"

    def _put(self, lines: list[dict[str, Any]]) -> None:
        from pssr.io import remote

        if not lines:
            return
        self.check()
        if self.run is not None:
            lines = [{**rec, "run": self.run} for rec in lines]
        data = "".join(json.dumps(rec, separators=(",", ":")) + "\n" for rec in lines).encode()
        st = self._store()
        while remote.put_create(st, self._next_name(), data) is None:
            pass  # the name is taken (a clash of the random part): the next sequence number

    def record(self, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Put one object with a line per block (durable when the put returns)."""
        t = time.time()
        self._put([{**stats, "k": key, "t": t} for key, stats in items])

    def forget(self, keys: Iterable[str]) -> None:
        """Put tombstones (newer than the records they cancel)."""
        t = time.time()
        self._put([{"k": k, "t": t, "forget": True} for k in keys])

    def _keys(self) -> list[str]:
        import obstore

        from pssr.io import remote

        st = self._store()
        return remote.retry(
            lambda: [m["path"] for batch in obstore.list(st, chunk_size=1000) for m in batch], self.url
        )

    def load(self) -> Records:
        """Every record object's records, the newest per key (of the owning run's, when it is known)."""
        import obstore

        from pssr.io import remote
        from pssr.util import thread_map

        st = self._store()
        keys = [k for k in self._keys() if k.endswith(_LOG_EXT)]

        def get(k: str) -> bytes:
            try:
                return bytes(remote.retry(lambda: obstore.get(st, k).bytes(), k))
            except FileNotFoundError:  # deleted in between (cleared): no records
                return b""

        best: dict[str, tuple[float, bytes | None]] = {}
        run = self.run
        for data in thread_map(get, keys, threads=16):
            for line, rec in _parse(data):
                key, t = rec.get("k"), rec.get("t")
                if not isinstance(key, str) or not isinstance(t, int | float):
                    continue
                if run is not None and rec.get("run", run) != run:
                    continue  # written by a run that no longer owns the output (it lost the lease)
                old = best.get(key)
                if old is None or t >= old[0]:
                    best[key] = (t, None if rec.get("forget") else line)
        return Records({key: line for key, (_, line) in best.items() if line is not None})

    def clear(self) -> None:
        """Delete every record object."""
        import obstore

        from pssr.io import remote
        from pssr.util import thread_map

        st = self._store()
        list(thread_map(lambda k: remote.retry(lambda: obstore.delete(st, k), k), self._keys(), threads=16))


class Records(Mapping):
    """Done records by block key, kept as their JSON lines and parsed when read.

    About 300 bytes per block in memory instead of about 1 KB as parsed dicts: at 10^6 blocks the
    difference between 0.3 and 1 GB.
    """

    def __init__(self, raw: dict[str, bytes]) -> None:
        self._raw = raw

    def __getitem__(self, key: str) -> dict[str, Any]:
        rec = json.loads(self._raw[key])
        rec.pop("k", None)
        rec.pop("t", None)
        rec.pop("run", None)
        return rec

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, key: object) -> bool:
        return key in self._raw

    def subset(self, keys: Iterable[str]) -> Records:
        """The records of ``keys`` only."""
        return Records({k: self._raw[k] for k in keys})


def _read_log(f: Path):
    try:
        data = f.read_bytes()
    except OSError:
        return
    yield from _parse(data)


def _parse(data: bytes):
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # the last line of a writer killed mid-write
        if isinstance(rec, dict):
            yield line, rec


_sync = getattr(os, "fdatasync", os.fsync)  # the data, not the file's times: one write less on Linux

_LEDGERS: dict[str, Ledger] = {}
_LEDGERS_LOCK = threading.Lock()


def ledger_for(folder: str | os.PathLike) -> Ledger:
    """The ledger in ``folder`` (a local folder, or an ``s3://`` / ``gs://`` URL), one per process."""
    from pssr.io import remote

    url = remote.is_url(str(folder))
    key = str(folder).rstrip("/") if url else str(Path(folder).resolve())
    with _LEDGERS_LOCK:
        led = _LEDGERS.get(key)
        if led is None:
            led = _LEDGERS[key] = ObjectLedger(key) if url else LocalLedger(key)
        return led
