"""Outputs on object storage (OME-Zarr, Neuroglancer precomputed) and local precomputed outputs.

An OME-Zarr on object storage is written in place, block by block, as a local OME-Zarr is: the
work store *is* the output URL (zarr 3 over obstore), its done records are write-once objects
(:class:`pssr.blockwise.ledger.ObjectLedger`), and its status says ``running`` until it was
verified there, read back through the same store; the last write sets ``complete``.  Local disk
holds only the blocks in flight.

A precomputed output is computed into an OME-Zarr work store (beside it on object storage,
``OUTPUT/.pssr-work.ome.zarr``; beside a local precomputed output on disk), verified, then
converted with tensorstore, one precomputed scale per pyramid level, with the ``resolution`` and
``voxel_offset`` that overlay it on the input in Neuroglancer; its ``provenance`` object is written
last and marks it complete; the work store is then deleted.

There is no rename and no file lock on object storage: one writer per output is a lease object
(:class:`pssr.io.remote.Lease`, conditional writes, expiry, renewal), taken before any work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pssr.blockwise.store import CHECKSUMS, RESUMABLE, array_at, delete_remote, open_checksums
from pssr.blockwise.store import open_group as store_open_group
from pssr.errors import LockedError, PredictError, PssrError
from pssr.io import remote, volumes

logger = logging.getLogger(__name__)

__all__ = ["Target", "is_precomputed"]

_FORMAT = "precomputed://"
WORK_KEY = ".pssr-work.ome.zarr"  # a precomputed output's OME-Zarr work store, beside it on object storage


def obstore_get(st: Any, key: str) -> bytes:
    """The bytes of an object (retried)."""
    import obstore

    return bytes(remote.retry(lambda: obstore.get(st, key).bytes(), key))


def is_precomputed(output: str) -> bool:
    """Whether an output names a Neuroglancer precomputed volume (``.precomputed``, ``precomputed://``)."""
    return output.lower().startswith(_FORMAT) or output.rstrip("/").lower().endswith(".precomputed")


@dataclass
class Target:
    """Where a restoration's output is published: a URL and/or the precomputed format."""

    output: str
    kind: str  # "ome-zarr" or "precomputed"
    staging: Path | str  # the work store: a local folder, or a URL (on object storage, beside the output)
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    lease: Any = None

    @classmethod
    def of(cls, output: Any, storage_options: dict[str, Any] | None = None) -> Target | None:
        """The target of an output that is remote or precomputed; None for a local TIFF / OME-Zarr."""
        if output is None or not isinstance(output, str | os.PathLike):
            return None
        out = os.fspath(output)
        pre = is_precomputed(out)
        if pre and out.lower().startswith(_FORMAT):
            out = out[len(_FORMAT) :]
        url = remote.is_url(out)
        if url:
            scheme = remote.split_url(out)[0]
            if scheme in ("http", "https"):
                raise PredictError(
                    f"output {out!r}: http(s):// is read-only; write to a local path, s3:// or gs://."
                )
            if not pre and not out.rstrip("/").lower().endswith(".zarr"):
                raise PredictError(
                    f"output {out!r} must end in .ome.zarr (OME-Zarr) or .precomputed (Neuroglancer "
                    "precomputed) on object storage."
                )
        if not url and not pre:
            return None
        staging: Path | str
        if url:  # written in place; a precomputed output's OME-Zarr work store lies beside it there
            staging = f"{out.rstrip('/')}/{WORK_KEY}" if pre else out.rstrip("/")
        else:
            p = Path(out).resolve()
            out = str(p)
            staging = p.with_name(f".{p.name}.pssr-work.ome.zarr")
        return cls(out.rstrip("/"), "precomputed" if pre else "ome-zarr", staging, storage_options)

    @property
    def remote(self) -> bool:
        """Whether the output is on object storage."""
        return remote.is_url(self.output)

    def _store(self) -> Any:
        return remote.object_store(self.output, self.storage_options)

    # ------------------------------------------------------------------------------ before
    def store(self) -> Any:
        """The obstore store at the output URL (leases, region claims)."""
        return self._store()

    def begin(self, *, overwrite: bool, axes: str, maps: bool = False, held: bool = False) -> None:
        """Take the output's lease (object storage) and refuse an existing output unless ``overwrite``.

        ``maps``: a fidelity or uncertainty map was asked for (an OME-Zarr holds them; a
        precomputed volume holds the restored image only, so that is refused before any work).
        ``held``: the caller holds the lease (a --full-output run, which holds it only to claim its
        region and to finish) and has claimed its region; otherwise the lease is taken for the
        whole run, and refused while --full-output runs are writing regions of the output.
        """
        if self.kind == "precomputed" and ("T" in axes or "C" in axes):
            raise PredictError(
                f"output {self.output!r}: Neuroglancer precomputed holds X, Y, Z volumes; the input's axes "
                f"are {axes}: write an .ome.zarr output instead."
            )
        if self.kind == "precomputed" and maps:
            raise PredictError(
                f"output {self.output!r}: a precomputed volume holds the restored image only, not the "
                "fidelity or uncertainty map (--fidelity, --tta); write an .ome.zarr output for those."
            )
        if self.remote and not held:
            try:
                self.lease = remote.Lease(self._store(), self.output).acquire()
                live = remote.Claims(self._store(), self.output).live()
            except PssrError:
                raise
            except Exception as e:  # a missing bucket, a 403, an unreachable endpoint: one line
                raise remote.explain(self.output, e, "write") from None
            if live:
                info = live[0][1]
                self.end()
                raise LockedError(
                    f"output {self.output!r} is being filled region by region by --full-output runs (e.g. "
                    f"pid {info.get('pid')} on host {info.get('host')!r}); wait for them to finish, or run "
                    "this one with --full-output and a --region of its own."
                )
        try:
            existing = self._existing()
            if existing and not overwrite:
                raise PredictError(
                    f"{self.output!r} already exists ({existing}); pass --overwrite to replace it."
                )
            if existing:
                self._delete_existing(existing)
        except BaseException:
            self.end()
            raise

    def _existing(self) -> str | None:
        """What marks a complete output there (a publish cut short leaves none: it is finished)."""
        if self.remote:
            st = self._store()
            if self.kind == "precomputed":
                return "provenance" if remote.head(st, "provenance") is not None else None
            if remote.head(st, "zarr.json") is None:
                return None
            try:  # an OME-Zarr being written there says "running": the same command resumes it
                attrs = json.loads(bytes(obstore_get(st, "zarr.json"))).get("attributes", {})
            except (ValueError, AttributeError):
                return "zarr.json"
            status = (attrs.get("pssr") or {}).get("status") if isinstance(attrs, dict) else None
            return None if status in RESUMABLE else "zarr.json"
        p = Path(self.output)
        if not p.exists():
            return None
        if (
            p.is_dir()
            and ((p / "info").is_file() or not any(p.iterdir()))
            and not (p / "provenance").exists()
        ):
            return None  # a precomputed volume whose publish was cut short, or an empty folder
        return "provenance" if (p / "provenance").exists() else "a file or folder"

    def _delete_existing(self, what: str) -> None:
        if not self._ours():
            raise PredictError(
                f"--overwrite would delete {self.output!r}, which pssr did not write ({what} without a pssr "
                "record); choose another output, or delete it yourself if you are sure."
            )
        if self.remote:
            import obstore

            st = self._store()
            keys = [
                m["path"] for batch in obstore.list(st) for m in batch
                if m["path"] != remote.Lease.KEY and not m["path"].startswith(remote.Claims.PREFIX)
            ]  # fmt: skip
            with ThreadPoolExecutor(16) as ex:
                list(ex.map(lambda k: remote.retry(lambda: obstore.delete(st, k), k), keys))
        else:
            shutil.rmtree(self.output)

    def _ours(self) -> bool:
        try:
            if self.remote:
                import obstore

                st = self._store()
                for key in ("zarr.json", "provenance"):
                    if remote.head(st, key) is not None:
                        doc = json.loads(bytes(obstore.get(st, key).bytes()))
                        return "pssr" in json.dumps(doc)
                return False
            p = Path(self.output)
            prov = p / "provenance"
            return not any(p.iterdir()) or (prov.is_file() and "pssr" in prov.read_text())
        except Exception:
            return False

    def staged_complete(self, job: Any) -> bool:
        """Whether the staging output is complete and made by ``job`` (its publish was cut short)."""
        if self.remote and self.kind == "ome-zarr":
            return False  # the output itself: nothing to publish
        try:
            attrs = dict(store_open_group(self.staging, mode="r").attrs).get("pssr", {})
        except Exception:
            return False
        if not isinstance(attrs, dict) or attrs.get("status") != "complete":
            return False
        old = attrs.get("job")
        return isinstance(old, dict) and job.same_work(old)

    def end(self) -> None:
        """Release the lease."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def publish(self, job_json: str) -> dict[str, Any]:
        """Convert the verified work store into the output (precomputed); then delete the work store."""
        if self.lease is not None:
            self.lease.check()
        t0 = time.monotonic()
        if self.kind == "ome-zarr":  # written in place on object storage, complete: nothing to move
            return {"in_place": True, "seconds": 0.0}
        stats = self._publish_precomputed(job_json)
        stats["seconds"] = round(time.monotonic() - t0, 2)
        if isinstance(self.staging, str):
            delete_remote(self.staging)
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
        return stats

    def _publish_precomputed(self, job_json: str) -> dict[str, Any]:
        ts = remote.require("tensorstore", f"writing {self.output!r}")
        g = store_open_group(self.staging, mode="r")
        ms = dict(g.attrs)["ome"]["multiscales"][0]
        axes = [a["name"].upper() for a in ms["axes"]]
        unit = next((a.get("unit") for a in ms["axes"] if a["name"] in "xy"), None)
        to_nm = _NM.get(unit or "", None)
        if to_nm is None:
            logger.warning(
                "the output's unit is %r: Neuroglancer precomputed counts in nanometres; its resolution is "
                "written in pixel units", unit,
            )  # fmt: skip
            to_nm = 1.0
        kv = volumes.kvstore(self.output, self.storage_options)
        levels = []
        for ds in ms["datasets"]:
            sc = next(t["scale"] for t in ds["coordinateTransformations"] if t["type"] == "scale")
            tr = next(
                (t["translation"] for t in ds["coordinateTransformations"] if t["type"] == "translation"),
                [0.0] * len(axes),
            )
            levels.append((ds["path"], dict(zip(axes, sc, strict=True)), dict(zip(axes, tr, strict=True))))
        arr0 = g[levels[0][0]]
        dtype = np.dtype(arr0.dtype).name
        scales = []
        for path, sc, tr in levels:
            shp = dict(zip(axes, g[path].shape, strict=True))
            res = [sc.get(a, 1.0) * to_nm for a in "XYZ"]
            # the centre of voxel 0 lies at (voxel_offset + 0.5) * resolution in Neuroglancer
            exact = [
                tr.get(a, 0.0) * to_nm / r - 0.5 if a in tr else 0.0 for a, r in zip("XYZ", res, strict=True)
            ]
            off = [round(v) for v in exact]
            shift = max(abs(v - o) for v, o in zip(exact, off, strict=True))
            if shift > 1e-6:  # precomputed offsets are whole voxels: this scale cannot lie exactly
                logger.warning(
                    "precomputed scale %s: its voxel 0 lies %.3g voxels off the whole-voxel grid that "
                    "voxel_offset can express, so Neuroglancer shows this scale shifted by up to %.3g of "
                    "its voxels against the finer ones (the OME-Zarr translations are exact)",
                    path, shift, shift,
                )  # fmt: skip
            size = [shp.get(a, 1) for a in "XYZ"]
            chunk = [min(128, size[0]), min(128, size[1]), min(16, size[2])]
            scales.append(
                {"key": path, "size": size, "resolution": res, "voxel_offset": off, "chunk_size": chunk}
            )
        ctx = ts.Context(volumes.context_spec())
        sent = 0
        for i, (path, _, _) in enumerate(levels):
            s = scales[i]
            spec = {
                "driver": "neuroglancer_precomputed", "kvstore": kv,
                "scale_metadata": {
                    "key": s["key"], "size": s["size"], "resolution": s["resolution"],
                    "voxel_offset": s["voxel_offset"], "chunk_size": s["chunk_size"], "encoding": "raw",
                    "sharding": _sharding(s["size"], s["chunk_size"]),
                },
                "multiscale_metadata": {"type": "image", "data_type": dtype, "num_channels": 1},
                "create": True, "open": True,
            }  # fmt: skip
            t = remote.retry(lambda spec=spec: ts.open(spec, context=ctx).result(), self.output)
            t = t[ts.d["channel"][0]].translate_to[0, 0, 0]
            sent += _copy_level(g[path], axes, t, s["chunk_size"])
        self._copy_checksums(g)
        from pssr.blockwise.verify import verify_precomputed

        # read back as Neuroglancer's readers do, before it may say complete (work store kept on failure)
        checked = verify_precomputed(self.output, progress=False, allow_running=True)
        prov = {
            "description": "restored with pssr (point-scanning super-resolution)",
            "owners": [],
            "processing": [{"method": {"pssr": json.loads(job_json)}, "by": "pssr", "date": time.ctime()}],
            "sources": [json.loads(job_json).get("input", "")],
            "pssr": {"status": "complete", "checksums": CHECKSUMS, "job": json.loads(job_json)},
        }
        data = json.dumps(remote.redact(prov), indent=1).encode()
        store = ts.KvStore.open(kv).result()
        remote.retry(lambda: store.write("provenance", data).result(), self.output)  # complete: last
        return {"scales": len(scales), "bytes": sent, "verified_chunks": checked["chunks"]}

    def _copy_checksums(self, g: Any) -> None:
        """The work store's block checksums, beside the scales (``.pssr/checksums``), for ``pssr verify``."""
        import zarr

        from pssr.util import stored_chunks

        attrs = dict(g.attrs).get("pssr", {})
        src = open_checksums(self.staging, attrs["checksums"], group=g)
        dst = zarr.create_array(
            array_at(self.output, CHECKSUMS), shape=src.shape, chunks=src.chunks, dtype=src.dtype,
            dimension_names=["block", "array", "byte"], overwrite=True,
        )  # fmt: skip
        for c in stored_chunks(src):
            r0 = c[0] * src.chunks[0]
            dst[r0 : r0 + src.chunks[0]] = src[r0 : r0 + src.chunks[0]]
        dst.attrs.update(dict(src.attrs))


_NM = {"nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6, "angstrom": 0.1, "meter": 1e9}


def _sharding(size: list[int], chunk: list[int]) -> dict[str, Any]:
    """Neuroglancer's sharded format, gzip-compressed chunks (Neuroglancer, CloudVolume, tensorstore read it).

    Up to 8 chunks per minishard and 8 minishards per shard (64 chunks, one object), the chunks in
    compressed Morton order (``identity`` hash) so that a shard is a box of chunks.
    """
    bits = sum(max(0, math.ceil(math.log2(-(-n // c)))) for n, c in zip(size, chunk, strict=True))
    pre = min(bits, 3)
    mini = min(bits - pre, 3)
    return {
        "@type": "neuroglancer_uint64_sharded_v1", "hash": "identity", "preshift_bits": pre,
        "minishard_bits": mini, "shard_bits": bits - pre - mini, "minishard_index_encoding": "gzip",
        "data_encoding": "gzip",
    }  # fmt: skip


def _copy_level(src: Any, axes: list[str], dst: Any, chunk: list[int]) -> int:
    """Copy one pyramid level (ZYX or YX zarr) into an XYZ tensorstore, a chunk-aligned slab at a time."""
    nz = src.shape[axes.index("Z")] if "Z" in axes else 1
    ny, nx = src.shape[-2:]
    step_x, step_y, step_z = chunk[0] * 8, chunk[1] * 8, chunk[2]
    wc = [int(v) for v in dst.chunk_layout.write_chunk.shape]  # a shard, when shards are boxes
    if math.prod(wc) <= 2**26:  # whole shards at a time: each written once, never read back and merged
        step_x, step_y, step_z = wc
    futures = []
    n = 0
    for z0 in range(0, nz, step_z):
        z1 = min(nz, z0 + step_z)
        for y0 in range(0, ny, step_y):
            for x0 in range(0, nx, step_x):
                y1, x1 = min(ny, y0 + step_y), min(nx, x0 + step_x)
                if "Z" in axes:
                    block = np.asarray(src[z0:z1, y0:y1, x0:x1])
                else:
                    block = np.asarray(src[y0:y1, x0:x1])[None]
                futures.append(dst[x0:x1, y0:y1, z0:z1].write(block.T))
                n += block.nbytes
                if len(futures) >= 16:
                    futures.pop(0).result()
    for f in futures:
        f.result()
    return n
