"""Check a restored output end to end: ``pssr verify OUTPUT`` and the last step of every run.

For an OME-Zarr written by pssr:

1. the metadata validates against the OME-Zarr 0.5 schema (``ome-zarr-models``);
2. the run is complete (not an interrupted one);
3. every block of ``s0`` (and of the fidelity / uncertainty arrays) reads back and matches
   the checksum recorded when it was written;
4. every chunk of every pyramid level reads back and equals the 2x2 mean of the level below
   (:mod:`pssr.io.pyramid`, the same function that wrote it).

Any other OME-Zarr gets checks 1 and "every chunk of every array decodes".  A TIFF written by
pssr carries its block checksums (:func:`pssr.io.formats.check_tiff`): every block is compared
with them, and an output's side files (fidelity, uncertainty, fidelity summary) must come from the
same run; a TIFF without them is "not a pssr output: nothing to verify against".

The first failure raises :class:`~pssr.blockwise.integrity.IntegrityError` naming the
array and the coordinates of the bad block or chunk.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pssr.blockwise import store
from pssr.blockwise.integrity import IntegrityError, digest
from pssr.blockwise.store import chunk_stored, fill_digest
from pssr.blockwise.tiling import block_at, block_grid
from pssr.io import formats as io
from pssr.io import pyramid, remote
from pssr.util import io_threads, stored_chunks, thread_map

logger = logging.getLogger(__name__)

__all__ = ["verify_output"]


def verify_output(
    path: str | os.PathLike, *, progress: bool = True, allow_running: bool = False
) -> dict[str, Any]:
    """Verify an output; returns what was checked, raises :class:`IntegrityError` on the first fault.

    Parameters
    ----------
    path : path-like
        A ``.ome.zarr`` folder or a ``.tif`` file.
    progress : bool
        Show a progress bar.
    allow_running : bool
        Check an output that is not yet marked complete (the last step of a run).

    Returns
    -------
    dict
        ``{"path", "kind", "blocks", "chunks", "levels"}``: counts of what was checked.

    Examples
    --------
    >>> import numpy as np
    >>> from pssr.blockwise.predict import restore
    >>> lr = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    >>> _ = restore(lr, model="bilinear:4", output="restored.ome.zarr", progress=False)
    >>> report = verify_output("restored.ome.zarr", progress=False)
    >>> report["kind"], report["blocks"]
    ('ome-zarr', 1)
    """
    try:
        io_threads()  # a bad $PSSR_IO_THREADS is refused before any work, whatever the output
    except ValueError as e:
        raise IntegrityError(str(e)) from None
    if _is_precomputed(path):
        return verify_precomputed(str(path), progress=progress, allow_running=allow_running)
    if remote.is_url(str(path)):  # an OME-Zarr on object storage, checked through the same reads
        url = str(path).rstrip("/")
        try:
            scheme = remote.split_url(url)[0]
            st = remote.writable_store(url) if scheme in ("s3", "gs") else remote.zarr_store(url)
            group = zarr.open_group(st, mode="r")
        except Exception as e:
            raise remote.probe(url) or remote.explain(url, e) from None
        return _verify_zarr(url, progress, allow_running, group=group)  # type: ignore[arg-type]
    p = Path(path)
    if not p.exists():
        raise IntegrityError(f"{str(p)!r} does not exist; give a restored .ome.zarr folder or .tif file.")
    if p.is_dir():
        return _verify_zarr(p, progress, allow_running)
    return _verify_tiff(p, progress)


def _is_precomputed(path: Any) -> bool:
    text = str(path).rstrip("/")
    if text.lower().startswith("precomputed://") or text.lower().endswith(".precomputed"):
        return True
    return (
        not remote.is_url(text)
        and (Path(text) / "info").is_file()
        and not (Path(text) / "zarr.json").exists()
    )


def verify_precomputed(path: str, *, progress: bool = True, allow_running: bool = False) -> dict[str, Any]:
    """Verify a Neuroglancer precomputed volume written by pssr, reading it as Neuroglancer does.

    Every scale is opened with tensorstore's ``neuroglancer_precomputed`` driver (what Google's
    pipelines read it with); the ``provenance`` object (written last) must say complete; every
    restored block of scale 0 must match the checksum recorded when it was written (the
    ``.pssr/checksums`` array beside the scales), and every chunk of every coarser scale the 2x2
    mean of the scale below (the function that wrote it).
    """
    from pssr.io import volumes

    ts = remote.require("tensorstore", f"verifying {path!r}")
    where = path[len("precomputed://") :] if path.lower().startswith("precomputed://") else path
    where = where.rstrip("/")
    kv = volumes.kvstore(where)
    try:
        kvs = remote.retry(lambda: ts.KvStore.open(kv).result(), where)

        def read_json(key: str) -> Any:
            r = remote.retry(lambda: kvs.read(key).result(), f"{where}/{key}")
            return json.loads(bytes(r.value)) if r.state == "value" else None

        info, prov = read_json("info"), read_json("provenance")
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{where!r}: its info or provenance is not valid JSON ({e}).") from e
    if not isinstance(info, dict) or not info.get("scales"):
        raise IntegrityError(f"{where!r} is not a Neuroglancer precomputed volume (no info with scales).")
    rec = (prov or {}).get("pssr") if isinstance(prov, dict) else None
    if not allow_running and (not isinstance(rec, dict) or rec.get("status") != "complete"):
        raise IntegrityError(
            f"{where!r} is not a complete pssr output (its provenance, written last, "
            f"{'is missing' if prov is None else 'does not say complete'}); run the same command again."
        )
    ctx = ts.Context(volumes.context_spec())
    vols = []
    for i in range(len(info["scales"])):
        spec = {
            "driver": "neuroglancer_precomputed",
            "kvstore": kv,
            "scale_index": i,
            "recheck_cached_data": "open",
        }
        try:
            t = remote.retry(lambda spec=spec: ts.open(spec, read=True, context=ctx).result(), where)
        except Exception as e:
            raise IntegrityError(f"{where!r}: scale {i} cannot be opened ({type(e).__name__}: {e}).") from e
        vols.append(volumes.LazyVolume(t[ts.d["channel"][0]].translate_to[0, 0, 0], f"{where} scale {i}"))
    n_blocks = _check_precomputed_blocks(where, vols[0], rec or {}, progress) if rec else 0
    n_chunks = 0
    for k in range(1, len(vols)):
        below, above = vols[k - 1], vols[k]
        chunk = tuple(int(c) for c in reversed(info["scales"][k]["chunk_sizes"][0]))
        regions = list(pyramid.chunk_regions(above.shape, chunk))

        def check(region, below=below, above=above, k=k) -> None:
            try:
                got = above[region]
                want = pyramid.downsample2(below[pyramid.source_region(region)], above.dtype)
            except Exception as e:
                raise IntegrityError(
                    f"{where!r}: scale {k} at {_fmt(region)} cannot be read ({type(e).__name__}: {e})."
                ) from e
            if want.shape != got.shape or not np.array_equal(want, got):
                raise IntegrityError(
                    f"{where!r}: precomputed scale {k} at {_fmt(region)} (ZYX) is not the 2x2 mean of scale "
                    f"{k - 1}; restore again with --overwrite."
                )

        with _bar(len(regions), progress, f"verify scale {k}") as bar:
            for _ in thread_map(check, regions):
                bar.update(1)
                n_chunks += 1
    return {"path": where, "kind": "precomputed", "blocks": n_blocks, "chunks": n_chunks, "levels": len(vols)}


def _check_precomputed_blocks(where: str, vol: Any, rec: dict[str, Any], progress: bool) -> int:
    """Scale 0 of a pssr precomputed output against the block checksums beside it."""
    job = rec.get("job") or {}
    try:
        scale, tile, halo = int(job["scale"]), int(job["tile"]), int(job["halo"])
        ck = zarr.open_array(store.array_at(where, rec["checksums"]), mode="r")
        names = list(ck.attrs["pssr"]["arrays"])
        skipped = int(ck.attrs["pssr"].get("skipped", 0))
    except Exception as e:
        raise IntegrityError(
            f"{where!r}: its block checksums ({rec.get('checksums')}) are missing or unreadable "
            f"({type(e).__name__}: {e}); the output cannot be verified: restore it again."
        ) from e
    two_d = "Z" not in str(job.get("input_axes", "ZYX"))
    hr = vol.shape[1:] if two_d else vol.shape
    lr_shape = (*hr[:-2], hr[-2] // scale, hr[-1] // scale)
    grid = block_grid(lr_shape, tile)
    total = math.prod(grid)
    if tuple(ck.shape) != (total, len(names), 16):
        raise IntegrityError(
            f"{where!r}: {ck.shape[0]} block checksums recorded for {total} blocks; the output was changed "
            "after the run: restore it again."
        )
    j = names.index(store.OUT_ARRAY)
    rows = []
    for c in sorted(stored_chunks(ck)):
        r0 = c[0] * ck.chunks[0]
        sums = np.asarray(ck[r0 : min(total, r0 + ck.chunks[0])])
        rows += [(r0 + int(r), sums[r, j]) for r in np.flatnonzero(sums.reshape(len(sums), -1).any(axis=1))]

    def check(item) -> None:
        i, want = item
        b = block_at(lr_shape, tile, halo, tuple(int(v) for v in np.unravel_index(i, grid)))
        region = b.out_slices(scale)
        try:
            got = vol[(0, *region)] if two_d else vol[region]
        except Exception as e:
            raise IntegrityError(
                f"{where!r}: the block at {b.where()} cannot be read ({type(e).__name__}: {e})."
            ) from e
        if digest(np.ascontiguousarray(got)) != want.tobytes().hex():
            raise IntegrityError(
                f"{where!r}: the block at {b.where()} does not match the checksum recorded when it was "
                "written; the volume was changed or corrupted after the run: restore it again."
            )

    with _bar(len(rows), progress, "verify blocks") as bar:
        for _ in thread_map(check, rows):
            bar.update(1)
    if len(rows) + skipped != total:
        raise IntegrityError(
            f"{where!r}: {total - skipped - len(rows)} block checksums are missing; the output cannot be "
            "trusted: restore it again."
        )
    return len(rows)


def _bar(total: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not progress, unit="chunk", desc=desc)


def _record_or_none(path: Path) -> dict[str, Any] | None:
    """The pssr record of a TIFF beside an output; None when it is missing or unreadable."""
    try:
        return io.tiff_record(path) if path.is_file() else None
    except Exception:
        return None


def _verify_tiff(p: Path, progress: bool) -> dict[str, Any]:
    """Every block of a pssr TIFF against the checksums it carries, and its side files' (same run)."""
    import hashlib

    import tifffile

    try:
        rec = io.tiff_record(p)
    except Exception as e:
        raise IntegrityError(f"{str(p)!r} is not a readable TIFF ({type(e).__name__}: {e}).") from e
    if rec is None:
        io.check_tiff(p)  # "not a pssr output: nothing to verify against"
    assert rec is not None
    files = rec.get("files") if isinstance(rec.get("files"), dict) else {}
    main = p.with_name(str(files.get("s0", p.name)))
    checked = [p]
    if main != p:  # a side file: it must belong to the output beside it
        main_rec = _record_or_none(main)
        if main_rec is None or main_rec.get("run") != rec.get("run"):
            raise IntegrityError(
                f"{str(p)!r} is a side file of {str(main)!r} but "
                + ("that output is missing" if main_rec is None else "belongs to another run of it")
                + "; restore it again."
            )
    else:  # the output: its side files, written in the same run
        for name, fname in files.items():
            side = p.with_name(str(fname))
            if side == p:
                continue
            side_rec = _record_or_none(side)
            if side_rec is None or side_rec.get("run") != rec.get("run"):
                raise IntegrityError(
                    f"{str(p)!r}: its {name} file {str(side)!r} "
                    + ("is missing or unreadable" if side_rec is None else "comes from another run")
                    + "; restore it again."
                )
            checked.append(side)
        fj = rec.get("fidelity_json")
        if isinstance(fj, dict):
            jp = p.with_name(str(fj.get("name")))
            got = hashlib.sha256(jp.read_bytes()).hexdigest() if jp.is_file() else None
            if got != fj.get("sha256"):
                raise IntegrityError(
                    f"{str(p)!r}: its fidelity summary {str(jp)!r} is "
                    + ("missing" if got is None else "not the one written with it (changed after the run)")
                    + "; restore it again."
                )
    n = 0
    with tifffile.TiffFile(p) as tif:
        pages = len(tif.pages)
    with _bar(pages * len(checked), progress, "verify") as bar:
        for f in checked:
            n += io.check_tiff(f, progress=bar.update)
    return {"path": str(p), "kind": "tiff", "blocks": n, "chunks": n, "levels": 1, "files": len(checked)}


def _schema_check(p: Path, g: zarr.Group) -> None:
    from ome_zarr_models.v05 import Image

    try:
        Image.from_zarr(g)
    except Exception as e:
        first = " ".join(str(e).split())[:400]
        raise IntegrityError(
            f"{str(p)!r} does not validate as OME-Zarr 0.5 (ome-zarr-models): {first}"
        ) from e


def _verify_zarr(p: Path, progress: bool, allow_running: bool = False, group: Any = None) -> dict[str, Any]:
    try:
        g = group if group is not None else zarr.open_group(str(p), mode="r")
    except Exception as e:
        raise IntegrityError(f"{str(p)!r} is not a zarr group ({type(e).__name__}: {e}).") from e
    attrs = dict(g.attrs).get("pssr")
    status = attrs.get("status") if isinstance(attrs, dict) else None
    if status == "running" and not allow_running:
        raise IntegrityError(
            f"{str(p)!r} is an interrupted restoration (status running); run the same command again "
            "to finish it."
        )
    _schema_check(p, g)
    ms = (dict(g.attrs).get("ome") or {}).get("multiscales") or [{}]
    levels = [d["path"] for d in ms[0].get("datasets", [])]
    n_blocks = 0
    if isinstance(attrs, dict) and attrs.get("checksums"):
        n_blocks = _check_blocks(p, g, attrs, progress)
    n_chunks = _check_levels(p, g, levels, progress, first_read=n_blocks > 0)
    if not isinstance(attrs, dict):
        # Not a pssr output: make sure every other array decodes too.
        for name, arr in io.members(g, "arrays"):
            if name not in levels:
                n_chunks += _read_all(p, name, arr, progress)
    return {"path": str(p), "kind": "ome-zarr", "blocks": n_blocks, "chunks": n_chunks, "levels": len(levels)}


def _check_blocks(p: Path, g: zarr.Group, attrs: dict[str, Any], progress: bool) -> int:
    """Every restored block against its checksum; skipped blocks (no row) must have no data.

    The checksums array is read a stored chunk of rows at a time, and only its non-zero rows are
    blocks to check: a sparse output is verified in the time and memory of its restored blocks.
    A run records how many blocks it skipped on purpose (input all fill value, or masked out); a
    row missing beyond that count is a lost checksum, and a stored ``s0`` chunk of a block without
    a checksum is data that no run restored.
    """
    try:
        job = attrs["job"]
        scale, tile, halo = int(job["scale"]), int(job["tile"]), int(job["halo"])
        ck = store.open_checksums(p, attrs["checksums"], group=g)
        names = list(ck.attrs["pssr"]["arrays"])
        skipped = int(ck.attrs["pssr"].get("skipped", 0))
    except Exception as e:
        raise IntegrityError(
            f"{str(p)!r}: its block checksums ({attrs.get('checksums')}) are missing or unreadable "
            f"({type(e).__name__}: {e}); the output cannot be verified: restore it again."
        ) from e
    s0 = g["s0"]
    lr_shape = (*s0.shape[:-2], s0.shape[-2] // scale, s0.shape[-1] // scale)
    grid = block_grid(lr_shape, tile)
    total = math.prod(grid)
    arrays = store.open_arrays(p, group=g)

    if tuple(ck.shape) != (total, len(names), 16):
        raise IntegrityError(
            f"{str(p)!r}: {ck.shape[0]} block checksums recorded for {total} blocks; the output "
            "was changed after the run: restore it again."
        )
    try:
        row_chunks = sorted(c[0] for c in stored_chunks(ck))
    except Exception:  # not a listable store: every chunk of rows
        row_chunks = list(range(-(-total // ck.chunks[0])))

    def check(item: tuple[int, np.ndarray]) -> None:
        i, sums = item
        b = block_at(lr_shape, tile, halo, tuple(int(v) for v in np.unravel_index(i, grid)))
        for j, name in enumerate(names):
            region = b.lr_slices() if name == "fidelity" else b.out_slices(scale)
            if name not in arrays:
                raise IntegrityError(f"{str(p)!r}: the array {name!r} recorded for its blocks is missing.")
            want = sums[j].tobytes().hex()
            if (
                sums[j].any()
                and want == fill_digest(arrays[name], region)
                and not chunk_stored(arrays[name], region)
            ):
                continue  # restored as all fill value: zarr stored no chunk, nothing to decode
            try:
                got = digest(np.asarray(arrays[name][region]))
            except Exception as e:
                raise IntegrityError(
                    f"{str(p)!r}: the {name} block at {b.where()} cannot be read "
                    f"({type(e).__name__}: {e}); restore it again (or rerun with --overwrite)."
                ) from e
            if not sums[j].any():
                raise IntegrityError(
                    f"{str(p)!r}: the checksum of the {name} block at {b.where()} is missing (a chunk "
                    f"of {attrs['checksums']} was lost); the output cannot be trusted: restore it again."
                )
            if got != want:
                raise IntegrityError(
                    f"{str(p)!r}: the {name} block at {b.where()} does not match the checksum "
                    f"recorded when it was written (block {i} of {attrs['checksums']}); the block or its "
                    "recorded checksum was changed or corrupted after the run: restore it again."
                )

    def rows():
        for c in row_chunks:
            r0 = c * ck.chunks[0]
            sums = np.asarray(ck[r0 : min(total, r0 + ck.chunks[0])])
            for r in np.flatnonzero(sums.reshape(len(sums), -1).any(axis=1)):
                yield r0 + int(r), sums[r]

    checked: set[int] = set()
    with _bar(total - skipped, progress, "verify blocks") as bar:
        batch: list[tuple[int, np.ndarray]] = []
        for item in itertools.chain(rows(), [None]):
            if item is not None:
                batch.append(item)
                checked.add(item[0])
            if len(batch) >= 4096 or (item is None and batch):
                for _ in thread_map(check, batch):  # the first bad block in order is reported
                    bar.update(1)
                batch = []
    if len(checked) + skipped != total:
        lost = total - skipped - len(checked)
        raise IntegrityError(
            f"{str(p)!r}: {lost} block checksums are missing ({len(checked)} recorded, {skipped} blocks "
            f"skipped on purpose, {total} in all: a chunk of {attrs['checksums']} was lost); the output "
            "cannot be trusted: restore it again."
        )
    if skipped:  # data where no block was restored: not what the run wrote
        for c in stored_chunks(s0):
            i = int(np.ravel_multi_index(tuple(c), grid))
            if i not in checked:
                b = block_at(lr_shape, tile, halo, tuple(c))
                raise IntegrityError(
                    f"{str(p)!r}: s0 holds data at {b.where()}, a block the run skipped (its input was all "
                    "fill value or masked out) and has no checksum for; the output was changed after the "
                    "run: restore it again."
                )
    return len(checked)


def _check_levels(p: Path, g: zarr.Group, levels: list[str], progress: bool, first_read: bool) -> int:
    n = 0
    if levels and not first_read:
        n += _read_all(p, levels[0], g[levels[0]], progress)
    for lo, hi in zip(levels, levels[1:], strict=False):
        below, arr = g[lo], g[hi]
        regions = pyramid.regions_to_check(below, arr)

        def check(region, below=below, arr=arr, lo=lo, hi=hi) -> None:
            try:
                got = np.asarray(arr[region])
            except Exception as e:
                raise IntegrityError(
                    f"{str(p)!r}: level {hi} chunk at {_fmt(region)} cannot be read "
                    f"({type(e).__name__}: {e})."
                ) from e
            want = pyramid.downsample2(np.asarray(below[pyramid.source_region(region)]), arr.dtype)
            if want.shape != got.shape or not np.array_equal(want, got, equal_nan=True):
                bad = int(np.sum(want != got)) if want.shape == got.shape else got.size
                raise IntegrityError(
                    f"{str(p)!r}: pyramid level {hi} at {_fmt(region)} is not the 2x2 mean of {lo} "
                    f"({bad} of {got.size} pixels differ); restore again with --overwrite."
                )

        if below.fill_value != arr.fill_value and len(regions) < math.prod(
            -(-n // c) for n, c in zip(arr.shape, arr.chunks, strict=True)
        ):
            raise IntegrityError(
                f"{str(p)!r}: pyramid levels {lo} and {hi} have different fill values "
                f"({below.fill_value} and {arr.fill_value}); restore again with --overwrite."
            )
        with _bar(len(regions), progress, f"verify {hi}") as bar:
            for _ in thread_map(check, regions):
                bar.update(1)
                n += 1
    return n


def _read_all(p: Path, name: str, arr: Any, progress: bool) -> int:
    try:  # a missing chunk reads as the fill value: only the stored ones can fail to decode
        regions = [pyramid.chunk_region(c, arr.shape, arr.chunks) for c in sorted(stored_chunks(arr))]
    except Exception:  # not a listable zarr array: every chunk
        regions = list(pyramid.chunk_regions(arr.shape, arr.chunks))

    def read(region) -> None:
        try:
            np.asarray(arr[region])
        except Exception as e:
            raise IntegrityError(
                f"{str(p)!r}: array {name} chunk at {_fmt(region)} cannot be read ({type(e).__name__}: {e})."
            ) from e

    with _bar(len(regions), progress, f"verify {name}") as bar:
        for _ in thread_map(read, regions):
            bar.update(1)
    return len(regions)


def _fmt(region: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"
