"""The work store: an output's zarr group while blocks are written, then finished.

Layout: the image group holds only what OME-Zarr readers expect: ``s0`` (the restoration, one
chunk per block), the pyramid levels ``s1``.. and ``attrs["pssr"]`` with the job and the status
``running``.  pssr's own files live in the hidden folder ``.pssr`` inside it, which is not a zarr
node of the group (it has no ``zarr.json`` of its own, so napari's built-in reader, which opens
every array and the first subgroup of a group, does not see it): the optional ``fidelity`` and
``uncertainty`` arrays, ``done/`` with the done records (:mod:`pssr.blockwise.ledger`: one
append-only log per writer process; per block its stats, the checksum of its input and of each
array's region) and, once finished, the ``checksums`` array.  Outputs of
pssr 0.1 kept these in the group (``fidelity``, ``uncertainty``, ``pssr_checksums``,
``.pssr_done``): they are read as they are, and moved into ``.pssr`` when such a run is resumed.

:func:`prepare_output` resumes the same job, replaces with ``overwrite`` or
refuses; :func:`verified_done` re-reads what a done record claims; :func:`finish_zarr` adds the
pyramid (:mod:`pssr.io.pyramid`), the NGFF metadata and the checksums array; :func:`finish_tiff`
streams the checked arrays into TIFFs and reads them back.  Only :func:`mark_complete`, after
verification, sets the status ``complete``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from pssr.blockwise.integrity import IntegrityError, digest
from pssr.blockwise.ledger import Ledger, Records, ledger_for
from pssr.blockwise.tiling import Block, block_grid, block_index, grid_box, plan_blocks
from pssr.errors import LockedError, PredictError
from pssr.io import formats as io
from pssr.io import ngff, pyramid, remote
from pssr.io.geometry import finer
from pssr.util import check_folder, io_threads, replaceable, thread_map

if TYPE_CHECKING:
    from pssr.blockwise.plan import Job

logger = logging.getLogger(__name__)

BOOK = io.BOOKKEEPING  # pssr's bookkeeping folder inside an output (not a zarr node of the image group)
DONE_DIR = f"{BOOK}/done"
OUT_ARRAY = "s0"
FID_ARRAY = "fidelity"
UNC_ARRAY = "uncertainty"
SIDE_ARRAYS = (FID_ARRAY, UNC_ARRAY)
CHECKSUMS = f"{BOOK}/checksums"
CHECKSUM_ROWS = 65536  # blocks per chunk of the checksums array
# Where pssr 0.1 kept them, inside the image group (napari's built-in reader then failed on it).
OLD_DONE_DIR, OLD_CHECKSUMS = ".pssr_done", "pssr_checksums"


def out_offset(job: Job | dict[str, Any]) -> tuple[int, ...] | None:
    """Where a cropped output's pixel 0 lies in the input (LR pixels per axis); None: not cropped."""
    get = job.get if isinstance(job, dict) else lambda k, d=None: getattr(job, k, d)
    region = get("region")
    if not region or get("full_output", False):
        return None
    return tuple(int(r[0]) for r in region)


def shift(slices: tuple, off: tuple[int, ...] | None, scale: int) -> tuple:
    """Slices in the input's (``scale``-times) coordinates moved to an output starting at ``off``."""
    if off is None:
        return slices
    *lead, ys, xs = slices
    oy, ox = off[-2] * scale, off[-1] * scale
    return (
        *(p - o for p, o in zip(lead, off[:-2], strict=True)),
        slice(ys.start - oy, ys.stop - oy),
        slice(xs.start - ox, xs.stop - ox),
    )


def out_slices(job: Job, block: Block) -> tuple:
    """Where a block's HR result lies in the output (shifted into a cropped output)."""
    return shift(block.out_slices(job.scale), out_offset(job), job.scale)


def lr_slices(job: Job, block: Block) -> tuple:
    """Where a block's LR-sized result (fidelity) lies in the output's arrays."""
    return shift(block.lr_slices(), out_offset(job), 1)


def out_lr_shape(job: Job, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output's shape in LR pixels: the region's for a cropped output, else the input's."""
    if job.region and not job.full_output:
        return tuple(b - a for a, b in job.region)
    return tuple(in_shape)


def grid_offset(job: Job) -> tuple[int, ...]:
    """Where a cropped output's block grid starts in the input's (block indices; zeros otherwise)."""
    off = out_offset(job)
    if off is None:
        return (0,) * (len(job.input_axes))
    return (*off[:-2], off[-2] // job.tile, off[-1] // job.tile)


def is_remote(out: str | Path | None) -> bool:
    """Whether a work store (an output) lives on object storage (``s3://``, ``gs://``)."""
    return out is not None and remote.is_url(str(out))


def open_group(out: str | Path, mode: str = "r") -> zarr.Group:
    """The zarr group of a work store or output: a local folder, or a URL (written through obstore)."""
    if is_remote(out):
        return zarr.open_group(store=remote.writable_store(str(out)), mode=mode)  # type: ignore[arg-type]
    return zarr.open_group(str(out), mode=mode)


def array_at(out: str | Path, rel: str) -> Any:
    """Where an array ``rel`` below an output is created: its folder, or a store at its URL."""
    if is_remote(out):
        return remote.writable_store(f"{str(out).rstrip('/')}/{rel}")
    return str(Path(out) / rel)


def _done_dir(out: str) -> Path | str:
    if is_remote(out):
        return f"{str(out).rstrip('/')}/{DONE_DIR}"
    old = Path(out) / OLD_DONE_DIR  # an output of pssr 0.1 not yet resumed (migrate_layout moves it)
    return old if old.is_dir() and not (Path(out) / DONE_DIR).exists() else Path(out) / DONE_DIR


def _sub(group: zarr.Group, rel: str, mode: str) -> Any:
    """The array at ``rel`` below ``group`` in the same store (local or remote), or None."""
    path = f"{group.path}/{rel}".lstrip("/")
    try:
        return zarr.open_array(store=group.store, path=path, mode=mode)  # type: ignore[arg-type]
    except FileNotFoundError:  # zarr's ArrayNotFoundError
        return None


def open_arrays(out: str | Path, mode: str = "r", *, group: zarr.Group | None = None) -> dict[str, Any]:
    """The arrays of a work store or output by name: ``s0`` and whichever side arrays it has.

    ``group``: the output's group when it is already open (e.g. on object storage).
    """
    g = group if group is not None else open_group(out, mode=mode)
    arrays = {OUT_ARRAY: g[OUT_ARRAY]} if OUT_ARRAY in g else {}
    for name in SIDE_ARRAYS:
        for rel in (f"{BOOK}/{name}", name):  # then where pssr 0.1 kept it
            arr = _sub(g, rel, mode)
            if arr is not None:
                arrays[name] = arr
                break
    return arrays


def open_checksums(out: str | Path, recorded: str, *, group: zarr.Group | None = None) -> Any:
    """The checksums array that an output's ``attrs["pssr"]["checksums"]`` names (new or old layout)."""
    g = group if group is not None else open_group(out, mode="r")
    arr = _sub(g, recorded, "r")
    if arr is None:
        raise FileNotFoundError(f"no array {recorded!r} in the output")
    return arr


def migrate_layout(out: str | Path) -> None:
    """Move the bookkeeping of an output written by pssr 0.1 out of its image group into ``.pssr``."""
    out = Path(out)
    (out / BOOK).mkdir(exist_ok=True)
    moves = [(out / OLD_DONE_DIR, out / DONE_DIR)] + [(out / n, out / BOOK / n) for n in SIDE_ARRAYS]
    for src, dst in moves:
        if src.is_dir() and not dst.exists():
            os.replace(src, dst)
    if (out / OLD_CHECKSUMS).is_dir():  # recomputed at the end of the run
        shutil.rmtree(out / OLD_CHECKSUMS)


def ledger(out: str | Path) -> Ledger:
    """The done records of the work store at ``out`` (this process's writer)."""
    return ledger_for(_done_dir(str(out)))


def mark_done(out: str, block: Block, stats: dict[str, Any]) -> None:
    """Record a block as done (after its chunk write returned)."""
    ledger(out).record([(block.key, stats)])


def done_blocks(out: str) -> Records:
    """Blocks recorded as done, with their stats (on object storage: those of the run owning the output)."""
    led = ledger(out)
    if is_remote(out) and getattr(led, "run", None) is None:  # a reader: the output's owner, as it is now
        led.run = output_run(out)  # type: ignore[attr-defined]
    return led.load()


def _zarr_json(out: str) -> tuple[dict[str, Any], str | None]:
    """The output's ``zarr.json`` on object storage and its ETag."""
    import obstore

    st = remote.raw_store(str(out))
    got = remote.retry(lambda: obstore.get(st, "zarr.json"), str(out))
    return json.loads(bytes(got.bytes())), got.meta.get("e_tag")


def output_run(out: str) -> str | None:
    """The id of the run that owns an output on object storage (made when it was created), or None."""
    try:
        doc, _ = _zarr_json(out)
        run = doc["attributes"]["pssr"].get("run")
    except (FileNotFoundError, KeyError, TypeError, AttributeError, ValueError):
        return None
    return run if isinstance(run, str) else None


def check_owner(out: str | Path) -> None:
    """Raise :class:`~pssr.errors.LockedError` unless this writer still owns the output on object storage.

    Its lease is renewed now, conditionally on its ETag (so no other run can take it for a lease's
    length), and the output's run id is still the one this writer started or resumed.
    """
    if not is_remote(out):
        return
    led = ledger(out)
    guard = getattr(led, "guard", None)
    if guard is not None:
        guard.confirm()
    mine = getattr(led, "run", None)
    if mine is not None and output_run(str(out)) != mine:
        raise LockedError(
            f"output {str(out)!r} now belongs to another run (it replaced this run's output after this "
            "run lost its lease); this run stops without touching it."
        )


def write_block(
    out_group: zarr.Group, job: Job, block: Block, res: dict[str, Any], *, mark: bool = True
) -> dict[str, Any]:
    """Write a block's results into its chunks, then (``mark``) record it done with their checksums.

    Returns the done record; with ``mark=False`` the caller records it (a batch at a time).
    """
    hr = out_slices(job, block)
    out_group[OUT_ARRAY][hr] = res["out"]
    parts = {OUT_ARRAY: res["out"]}
    if "fidelity" in res:
        out_group[FID_ARRAY][lr_slices(job, block)] = res["fidelity"]
        parts[FID_ARRAY] = res["fidelity"]
    if "uncertainty" in res:
        out_group[UNC_ARRAY][hr] = res["uncertainty"]
        parts[UNC_ARRAY] = res["uncertainty"]
    rec = {**res["stats"], "digest": {k: digest(v) for k, v in parts.items()}}
    if mark:
        mark_done(job.out, block, rec)
    return rec


def block_regions(job: Job, block: Block) -> dict[str, tuple[slice, ...]]:
    """Where a block's data lies in each array of the work store."""
    reg = {OUT_ARRAY: out_slices(job, block)}
    if job.fidelity:
        reg[FID_ARRAY] = lr_slices(job, block)
    if job.tta:
        reg[UNC_ARRAY] = reg[OUT_ARRAY]
    return reg


def check_block(arrays: dict[str, Any], job: Job, block: Block, record: dict[str, Any]) -> str | None:
    """Why a block recorded as done is not intact in ``arrays`` (unreadable, checksum differs), or None."""
    want = record.get("digest")
    if not isinstance(want, dict):
        return "its done record has no checksum"
    for name, region in block_regions(job, block).items():
        if name not in arrays:
            continue
        if want.get(name) == fill_digest(arrays[name], region) and not chunk_stored(arrays[name], region):
            continue  # all fill value, so zarr stored no chunk: intact without reading anything
        try:
            got = digest(np.asarray(arrays[name][region]))
        except Exception as e:  # a truncated or corrupt chunk fails to decode
            msg = str(e).splitlines()[0] if str(e) else ""
            return f"its {name} chunk cannot be read ({type(e).__name__}: {msg})"
        if got != want.get(name):
            return f"its {name} data does not match the checksum recorded when it was written"
    return None


def verified_done(
    group: zarr.Group,
    job: Job,
    blocks: list[Block],
    done: dict[str, Any],
    input_digest: Callable[[Block], str] | None = None,
) -> dict[str, Any]:
    """The done blocks whose chunks read back intact; the others are logged and will be redone.

    With ``input_digest`` (when resuming), each done block's input is checksummed again and
    compared with what it was computed from: an input rewritten in place is redone, not mixed.
    """
    by_key = {b.key: b for b in blocks}
    todo = [(key, by_key[key]) for key in done if key in by_key]  # records parsed one at a time
    arrays = group if isinstance(group, dict) else open_arrays(job.out)

    def why_not(item) -> str | None:
        key, b = item
        rec = done[key]
        why = check_block(arrays, job, b, rec)
        if why is None and input_digest is not None and rec.get("input") != input_digest(b):
            why = "its input changed since it was restored (or its marker predates input checksums)"
        return why

    good: Any = {}
    bad = []
    for (key, b), why in zip(todo, thread_map(why_not, todo), strict=True):
        if why is None:
            good[key] = None
        else:
            logger.warning("block %s will be redone: %s", b.where(), why)
            bad.append(key)
    # A pyramid chunk recorded above a block that is redone is stale: computed again.
    above = []
    for key in bad:
        b = by_key[key]
        *lead, ys, xs = block_regions(job, b)[OUT_ARRAY]
        ck = arrays[OUT_ARRAY].chunks
        cy, cx = ys.start // ck[-2], xs.start // ck[-1]
        above += [pyramid_key(k, (*lead, cy >> k, cx >> k)) for k in range(1, pyramid.MAX_LEVELS)]
    ledger(job.out).forget(bad + [k for k in above if k in done])
    return done.subset(good) if isinstance(done, Records) else {k: done[k] for k in good}


_FILL_DIGESTS: dict[tuple, str] = {}


def chunk_stored(arr: Any, region: tuple) -> bool:
    """Whether the chunk holding ``region`` (one block: one chunk) exists in ``arr``'s store.

    A missing chunk reads as the fill value: a block recorded with the fill value's checksum is
    intact if its chunk is missing, without reading or decoding anything (a file-existence test
    on a local store: microseconds, where zarr's read of a missing chunk costs about a millisecond).
    """
    idx = tuple(
        (r.start if isinstance(r, slice) else int(r)) // c for r, c in zip(region, arr.chunks, strict=True)
    )
    key = arr.metadata.encode_chunk_key(idx)
    sp = arr.store_path
    path = f"{sp.path}/{key}" if sp.path else key
    root = getattr(sp.store, "root", None)
    if root is not None:
        return os.path.exists(os.path.join(str(root), path))
    from zarr.core.sync import sync

    return bool(sync(sp.store.exists(path)))


def fill_digest(arr: Any, region: tuple) -> str:
    """The checksum of a region of ``arr`` that was never written (every value the fill value)."""
    shape = tuple(r.stop - r.start for r in region if isinstance(r, slice))
    fill = getattr(arr, "fill_value", None)
    fill = 0 if fill is None else fill
    key = (shape, np.dtype(arr.dtype).str, str(fill))
    d = _FILL_DIGESTS.get(key)
    if d is None:
        d = _FILL_DIGESTS[key] = digest(np.full(shape, fill, arr.dtype))
    return d


def create_store(work: Path, job: Job, shape: tuple[int, ...], fill: float = 0) -> None:
    """Create an empty work store for ``job`` (one chunk per block), marked running.

    ``fill`` is the restoration's fill value (the input's, in the output dtype): the value of the
    chunks of skipped blocks, which are never written.
    """
    s = job.scale
    lead = shape[:-2]
    h, w = shape[-2:]
    hr_shape = (*lead, h * s, w * s)
    ck_hr = (*(1 for _ in lead), job.tile * s, job.tile * s)
    ck_lr = (*(1 for _ in lead), job.tile, job.tile)
    if is_remote(work):  # prepare_remote found the prefix empty (or emptied it): nothing to clear
        g = open_group(work, mode="a")
    else:
        g = zarr.open_group(str(work), mode="w")
        (work / BOOK).mkdir()
    arrays = [(OUT_ARRAY, hr_shape, ck_hr, job.out_dtype)]
    if job.fidelity:
        arrays.append((FID_ARRAY, shape, ck_lr, "float32"))
    if job.tta:
        arrays.append((UNC_ARRAY, hr_shape, ck_hr, "float32"))
    for name, shp, ck, dt in arrays:
        # One chunk per block: every block writes its own chunk, never another's.
        chunks = tuple(min(c, n) for c, n in zip(ck, shp, strict=True))
        dims = list(job.input_axes.lower())
        fv = fill if name == OUT_ARRAY else 0
        kw = {"shape": shp, "chunks": chunks, "dtype": dt, "fill_value": fv, "dimension_names": dims}
        if name == OUT_ARRAY:
            g.create_array(name, **kw)
        else:  # beside the image, in the bookkeeping folder
            zarr.create_array(array_at(work, f"{BOOK}/{name}"), **kw)
    g.attrs["pssr"] = {"status": "running", "job": json.loads(job.to_json())}
    if not is_remote(work):
        Path(_done_dir(str(work))).mkdir()


def pyramid_key(k: int, idx: tuple[int, ...]) -> str:
    """The done record's key of pyramid chunk ``idx`` of level ``k`` (``s1/0.3.4``)."""
    return f"s{k}/" + ".".join(str(int(i)) for i in idx)


def _pyramid_records(done: dict[str, Any]):
    for key in done:
        if key.startswith("s") and "/" in key:
            lvl, idx = key[1:].split("/", 1)
            yield int(lvl), tuple(int(i) for i in idx.split("."))


def pyramid_builder(
    work: Path,
    job: Job,
    blocks: list[Block],
    done: dict[str, Any],
    *,
    sparse: bool = False,
    whole: bool = False,
) -> pyramid.Builder:
    """A builder of the pyramid levels while blocks are written, seeded with the blocks already done.

    ``sparse``: ``blocks`` are not the whole grid (skipped blocks' chunks stay missing).
    ``whole``: the blocks are every (populated) block of the output (the run that finishes a
    full-size output), not one region's.

    Only ``blocks`` (this job's) seed level 0: a pyramid chunk above blocks of another job is never
    computed here.  A full-size output filled by several jobs records each pyramid chunk in the
    ledger when written (and seeds those recorded), so the job that finishes the output computes
    only what no job could.
    """
    g = open_group(work, mode="r+")
    on_chunk = None
    if job.full_output:
        led = ledger(job.out)

        def on_chunk(k: int, idx: tuple[int, ...]) -> None:
            led.record([(pyramid_key(k, idx), {})])

    levels = [g[OUT_ARRAY], *ngff.create_levels(g, job.input_axes)]
    expected = {block_index(b, job.tile) for b in blocks} if sparse else None
    if expected is not None and out_offset(job) is not None:  # a cropped output's own grid
        off = grid_offset(job)
        expected = {tuple(i - o for i, o in zip(idx, off, strict=True)) for idx in expected}
    owned = None
    if job.full_output and job.region and not whole:
        owned = grid_box(
            job.region,
            job.tile,
            tuple(-(-n // c) for n, c in zip(g[OUT_ARRAY].shape, g[OUT_ARRAY].chunks, strict=True)),
        )
    builder = pyramid.Builder(levels, workers=io_threads(), expected=expected, owned=owned, on_chunk=on_chunk)
    for b in blocks:
        if b.key in done:
            builder.seed(out_slices(job, b))
    if job.full_output:
        for k, idx in _pyramid_records(done):
            if k < len(levels):
                builder.seed_level(k, [idx])
    return builder


def check_parent(out: Path) -> None:
    """The output's folder must exist and be writable."""
    check_folder(out, PredictError)


def prepare_output(
    out: Path,
    work: Path,
    job: Job,
    shape,
    *,
    overwrite: bool,
    resume: bool,
    side: list[Path],
    fill: float = 0,
) -> None:
    """Resume the same job, replace with --overwrite, or refuse; then create the work store."""
    out = out.resolve()
    status, old_job = None, None
    if work.exists():
        try:
            attrs = dict(zarr.open_group(str(work), mode="r").attrs).get("pssr", {})
            if isinstance(attrs, dict):
                status, old_job = attrs.get("status"), attrs.get("job")
        except Exception:  # not a pssr output, or a store whose creation was cut short
            pass
    hidden = work != out  # a TIFF's work store, or a new OME-Zarr beside the one it replaces: ours
    if status in RESUMABLE and isinstance(old_job, dict) and (hidden or not overwrite):
        diff = job.differences(old_job)
        if not diff:
            try:
                _check_store(work, job)
            except PredictError:
                if not overwrite:
                    raise
            else:
                # Same command again: continue (a 'finishing' store stays so until its files are in place).
                g = zarr.open_group(str(work), mode="r+")
                g.attrs["pssr"] = {**dict(g.attrs["pssr"]), "job": json.loads(job.to_json())}
                return
        elif not overwrite:
            what = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in sorted(diff.items()))
            model_file = (
                " The model file itself changed since that run (a pssr upgrade replaces the built-in "
                "models' files), so its blocks and the new ones would not match."
                if "model_sha256" in diff and "model" not in diff
                else ""
            )
            raise PredictError(
                f"cannot resume {str(out)!r}: the interrupted run there used other settings or inputs "
                f"({what}).{model_file} Run it with the same settings, or pass --overwrite to start over."
            )
    existing = [p for p in (out, *side) if p.exists()]
    if work.exists() and hidden:
        existing.append(work)
    if existing and not overwrite and not (hidden and status is None and existing == [work]):
        done = " and is complete" if status == "complete" else ""
        raise PredictError(
            f"{str(existing[0])!r} already exists{done}; pass --overwrite to replace "
            + ("it." if len(existing) == 1 else f"it and {', '.join(repr(str(p)) for p in existing[1:])}.")
        )
    for p in existing:
        if p.is_dir() and not _ours(p):
            raise PredictError(
                f"--overwrite would delete the folder {str(p)!r}, which is not a pssr output (no pssr "
                "record in its zarr.json, and it holds other files); pssr never deletes data it did not "
                "write: choose another output, or delete that folder yourself if you are sure."
            )
    # The previous output (and its side files) stay, intact and readable, until the new one replaces
    # them at the end of the run; only an earlier run's work store is dropped now.
    if work.exists() and hidden:
        shutil.rmtree(work)
    if resume:
        logger.info("nothing to resume at %s; starting a new run", out)
    try:
        create_store(work, job, shape, fill)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # never a half-created store left behind
        raise


def prepare_remote(url: str, job: Job, shape, *, overwrite: bool, fill: float = 0) -> bool:
    """Resume the same job's store at ``url`` (object storage), start over with ``overwrite``, or refuse.

    The caller holds the output's lease and has dealt with a complete output there
    (:meth:`pssr.blockwise.publish.Target.begin`).  Returns whether an interrupted run is resumed.
    """
    old = stored_job(url)
    if old is not None and not overwrite:
        diff = job.differences(old)
        if not diff:
            g = open_group(url, mode="r+")
            attrs = dict(g.attrs["pssr"])
            run = attrs.get("run") or uuid.uuid4().hex  # resumed: the same run (its done records count)
            g.attrs["pssr"] = {**attrs, "job": json.loads(job.to_json()), "run": run}
            ledger(url).run = run  # type: ignore[attr-defined]
            return True
        what = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in sorted(diff.items()))
        raise PredictError(
            f"cannot resume {url!r}: the interrupted run there used other settings or inputs ({what}). "
            "Run it with the same settings, or pass --overwrite to start over."
        )
    keys = remote_keys(url)
    if keys and not overwrite:
        raise PredictError(
            f"{url!r} already holds objects ({keys[0]!r}, ...) that are not an interrupted pssr run; pass "
            "--overwrite to replace them, or choose another output."
        )
    if keys and not all(k.split("/", 1)[0] in _OURS for k in keys):
        raise PredictError(
            f"--overwrite would delete objects below {url!r} that pssr did not write (e.g. "
            f"{next(k for k in keys if k.split('/', 1)[0] not in _OURS)!r}); pssr never deletes data it "
            "did not write: choose another output, or delete them yourself if you are sure."
        )
    if keys:
        delete_remote(url, keys)
    create_store(url, job, shape, fill)  # type: ignore[arg-type]
    g = open_group(url, mode="r+")
    run = uuid.uuid4().hex  # a new output: a new owner (the records of any other run are ignored)
    g.attrs["pssr"] = {**dict(g.attrs["pssr"]), "run": run}
    ledger(url).run = run  # type: ignore[attr-defined]
    return False


LEASE_KEY = ".pssr-lease"  # pssr.io.remote.Lease.KEY
CLAIMS_PREFIX = ".pssr-regions/"  # pssr.io.remote.Claims.PREFIX


def remote_keys(url: str) -> list[str]:
    """Every object below an output URL but its lease and region claims (relative keys)."""
    import obstore

    st = remote.raw_store(url)
    keys = remote.retry(lambda: [m["path"] for b in obstore.list(st, chunk_size=1000) for m in b], url)
    return [k for k in keys if k != LEASE_KEY and not k.startswith(CLAIMS_PREFIX)]


def delete_remote(url: str, keys: list[str] | None = None) -> None:
    """Delete objects below an output URL (all but its lease unless ``keys`` are given)."""
    import obstore

    st = remote.raw_store(url)
    keys = remote_keys(url) if keys is None else keys
    list(thread_map(lambda k: remote.retry(lambda: obstore.delete(st, k), k), keys, threads=16))


_OURS = {
    "zarr.json",
    OUT_ARRAY,
    BOOK,
    *SIDE_ARRAYS,
    OLD_CHECKSUMS,
    OLD_DONE_DIR,
    *(f"s{k}" for k in range(1, 10)),
}


def _ours(folder: Path) -> bool:
    """Whether ``--overwrite`` may delete a folder: empty, a pssr output, or a pssr store cut short."""
    return replaceable(folder, _OURS)


def _check_store(work: Path, job: Job) -> None:
    """An interrupted store must still have its arrays; otherwise say how to start over."""
    want = [OUT_ARRAY] + ([FID_ARRAY] if job.fidelity else []) + ([UNC_ARRAY] if job.tta else [])
    try:
        migrate_layout(work)  # an output interrupted under pssr 0.1
        have = open_arrays(work)
        missing = [n for n in want if n not in have]
    except Exception as e:  # unreadable metadata (a corrupt zarr.json): name it, say how to go on
        raise PredictError(
            f"the interrupted output {str(work)!r} is damaged ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}) and cannot be resumed; pass --overwrite to "
            "start over."
        ) from e
    if missing:
        raise PredictError(
            f"the interrupted output {str(work)!r} is damaged (array {missing[0]!r} is missing) and "
            "cannot be resumed; pass --overwrite to start over."
        )
    Path(_done_dir(str(work))).mkdir(exist_ok=True)


def run_summary(
    done: dict[str, dict[str, Any]], blocks: list[Block], job: Job, elapsed: float, total: int | None = None
) -> dict[str, Any]:
    """Blocks, skipped and empty blocks, time, device and (with fidelity) the fraction beyond 3 sigma.

    ``total``: the blocks of the whole grid when ``blocks`` (those restored) are fewer; the others
    were skipped (input all fill value, or masked out) and their output chunks stay missing.
    """
    n_empty = sum(1 for b in blocks if done.get(b.key, {}).get("empty"))
    total = len(blocks) if total is None else int(total)
    summ: dict[str, Any] = {
        "blocks": total,
        "skipped_blocks": total - len(blocks),
        "empty_blocks": n_empty,
        "seconds": round(elapsed, 2),
        "device": job.device,
        "precision": job.precision,
        "backend": job.backend,
    }
    if job.frames_auto:
        summ["single_frame_blocks"] = sum(1 for b in blocks if done.get(b.key, {}).get("single_frame"))
    if job.fidelity:
        fr = [(done[b.key].get("frac_3sigma", 0.0), b) for b in blocks]
        sizes = [(b.core[1] - b.core[0]) * (b.core[3] - b.core[2]) for _, b in fr]
        summ["fidelity"] = {
            "noise_source": job.noise.get("source", "model"),
            "frac_beyond_3sigma": float(np.average([f for f, _ in fr], weights=sizes)),
            "expected_frac_if_faithful": 0.0027,
            "worst_blocks": [
                {
                    "plane": list(b.plane),
                    "y": [b.core[0], b.core[1]],
                    "x": [b.core[2], b.core[3]],
                    "frac_beyond_3sigma": round(f, 5),
                    "max_abs_z": round(done[b.key].get("max_abs_z", 0.0), 2),
                }
                for f, b in sorted(fr, key=lambda t: -t[0])[:5]
            ],
        }
    return summ


def finish_zarr(
    work: Path,
    job: Job,
    axes: str,
    in_scale: dict[str, float],
    unit: str | None,
    summary: dict[str, Any],
    done: dict[str, dict[str, Any]],
    *,
    built: bool = False,
    in_origin: dict[str, float] | None = None,
    time_unit: str | None = None,
    blocks: list[Block] | None = None,
) -> None:
    """NGFF metadata and the checksums array of a work store whose blocks are all done.

    The pyramid levels were built while writing (``built``, :func:`pyramid_builder`); otherwise
    they are built here.  ``blocks``: those restored, when not the whole grid (the checksum rows of
    skipped blocks stay missing).  The status stays ``running``: :func:`mark_complete` follows
    verification.
    """
    g = open_group(work, mode="r+")
    s = job.scale
    base = g[OUT_ARRAY]
    hr_px, t0 = output_geometry(axes, in_scale, in_origin or {}, s)
    levels = ngff.create_levels(g, axes)
    if not built:  # levels not built while writing (an output interrupted by an older pssr): all of them now
        pyramid.Builder([base, *levels], workers=io_threads()).close()
    g.attrs["ome"] = ngff.image_attrs(
        axes, hr_px, t0, 1 + len(levels), unit=unit, time_unit=time_unit, name="pssr restoration"
    )
    # The side arrays are not NGFF images: their calibration as pssr attributes (pssr.io.formats reads them).
    arrays = open_arrays(work, mode="r+")
    lr_px = {a: in_scale.get(a, 1.0) for a in axes}
    for name, px, org in ((FID_ARRAY, lr_px, in_origin or {}), (UNC_ARRAY, hr_px, t0)):
        if name in arrays:
            arrays[name].attrs.update(
                {
                    "pssr_axes": axes,
                    "pssr_scale": {a: v for a, v in px.items() if a != "C"},
                    "pssr_origin": {a: v for a, v in org.items() if a != "C" and v},
                    **({"pssr_unit": unit} if unit else {}),
                    **({"pssr_time_unit": time_unit} if time_unit else {}),
                }
            )
    # The per-block checksums stay with the output (``pssr verify`` checks them), as a zarr array
    # (blocks in plan order x arrays x 16 bytes) in the bookkeeping folder, out of readers' way.
    names = [n for n in (OUT_ARRAY, FID_ARRAY, UNC_ARRAY) if n in arrays]
    lr_shape = base.shape[:-2] + tuple(n // s for n in base.shape[-2:])
    grid = block_grid(lr_shape, job.tile)
    if blocks is None:
        blocks = plan_blocks(lr_shape, job.tile, job.halo)
    off = grid_offset(job)  # a cropped output's grid starts at its region's first block
    total = int(np.prod(grid))
    rows = min(total, CHECKSUM_ROWS)
    if not is_remote(work):
        (work / BOOK).mkdir(exist_ok=True)
    ck = zarr.create_array(
        array_at(work, CHECKSUMS),
        shape=(total, len(names), 16),
        dtype="uint8",
        chunks=(rows, len(names), 16),
        dimension_names=["block", "array", "byte"],
        overwrite=True,
    )
    # Written a chunk of rows at a time, only where blocks were restored: memory and time follow
    # the restored blocks, not the grid (a skipped block's row stays missing, i.e. zero).
    by_chunk: dict[int, list[tuple[int, Block]]] = {}
    for b in blocks:
        i = int(
            np.ravel_multi_index(
                tuple(v - o for v, o in zip(block_index(b, job.tile), off, strict=True)), grid
            )
        )
        by_chunk.setdefault(i // rows, []).append((i, b))
    for c, items in sorted(by_chunk.items()):
        r0, r1 = c * rows, min(total, (c + 1) * rows)
        sums = np.zeros((r1 - r0, len(names), 16), np.uint8)
        for i, b in items:
            for j, n in enumerate(names):
                sums[i - r0, j] = np.frombuffer(bytes.fromhex(done[b.key]["digest"][n]), np.uint8)
        ck[r0:r1] = sums
    ck.attrs["pssr"] = {
        "arrays": names,
        "digest": "blake2b-128 of each block's C-order bytes, plan order",
        "blocks": len(blocks),
        "skipped": total - len(blocks),
    }
    pssr_attrs = dict(g.attrs.get("pssr", {}))
    pssr_attrs.update({"summary": summary, "checksums": CHECKSUMS})
    g.attrs["pssr"] = pssr_attrs


def mark_complete(work: Path) -> None:
    """The last step, after verification: status complete, done records no longer needed.

    On object storage the writer's lease is confirmed and ``zarr.json`` is rewritten only if it is
    still the one this run read (``If-Match`` on its ETag) and names this run: a run that lost the
    output can never mark another run's output complete.
    """
    if is_remote(work):
        _mark_remote(str(work))
        ledger(work).clear()
        return
    g = open_group(work, mode="r+")
    g.attrs["pssr"] = {**dict(g.attrs.get("pssr", {})), "status": "complete"}
    ledger(work).clear()


def _mark_remote(out: str) -> None:
    import obstore
    from obstore.exceptions import PreconditionError

    check_owner(out)
    doc, etag = _zarr_json(out)
    mine = getattr(ledger(out), "run", None)
    attrs = doc.setdefault("attributes", {}).setdefault("pssr", {})
    lost = LockedError(
        f"output {out!r} now belongs to another run (it replaced this run's output after this run lost its "
        "lease); this run stops without marking it complete."
    )
    if mine is not None and attrs.get("run") != mine:
        raise lost
    attrs["status"] = "complete"
    st = remote.raw_store(out)
    data = json.dumps(doc, indent=2).encode()
    try:
        remote.retry(lambda: obstore.put(st, "zarr.json", data, mode={"e_tag": etag}), out)
    except (PreconditionError, FileNotFoundError):
        raise lost from None


def output_geometry(
    axes: str, in_scale: dict[str, float], in_origin: dict[str, float], s: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Pixel size and origin (centre of pixel 0) per axis of an ``s``-times restored output.

    Output pixel j is centred on input coordinate (j - (s-1)/2) / s along Y and X: its origin is
    the input's shifted by -(s-1)/2 output pixels.  Uncalibrated axes count in input pixels.
    """
    hr_px, t0 = {}, {}
    for a in axes:
        size, origin = in_scale.get(a, 1.0), in_origin.get(a, 0.0)
        hr_px[a], t0[a] = finer(size, origin, s) if a in "XY" else (size, origin)
    return hr_px, t0


def stem(p: Path) -> str:
    """A TIFF path's name without its extension (``a.ome.tif`` -> ``a``)."""
    n = p.name
    for ext in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if n.lower().endswith(ext):
            return n[: -len(ext)]
    return p.stem


def stage_input(arr: Any, dst: Path) -> None:
    """Copy an in-memory array into a zarr at ``dst`` (one chunk per plane), for dask workers."""
    if dst.exists():
        shutil.rmtree(dst)
    z = zarr.create_array(
        str(dst),
        shape=arr.shape,
        dtype=arr.dtype,
        chunks=tuple(1 for _ in arr.shape[:-2]) + tuple(min(n, 1024) for n in arr.shape[-2:]),
    )
    for idx in np.ndindex(*arr.shape[:-2]):
        z[idx] = np.asarray(arr[idx])
    if arr.ndim == 2:
        z[...] = np.asarray(arr)


def side_files(out: Path, *, fidelity: bool, tta: bool) -> list[Path]:
    """The files a TIFF output writes beside itself (OME-Zarr outputs keep them inside)."""
    if out.name.lower().endswith(io.ZARR_EXT):
        return []
    side = []
    if fidelity:
        side += [out.with_name(stem(out) + ".fidelity.tif"), out.with_name(stem(out) + ".fidelity.json")]
    if tta:
        side.append(out.with_name(stem(out) + ".uncertainty.tif"))
    return side


def stored_job(work: Path | None) -> dict[str, Any] | None:
    """The job of an interrupted run at ``work`` (so "the same command" resumes it), or None."""
    if work is None or (not is_remote(work) and not (Path(work) / "zarr.json").is_file()):
        return None
    try:
        attrs = dict(open_group(work, mode="r").attrs).get("pssr", {})
    except Exception:  # not a pssr output: _prepare_output reports it
        return None
    if not isinstance(attrs, dict) or attrs.get("status") not in RESUMABLE:
        return None
    job = attrs.get("job")
    return job if isinstance(job, dict) else None


def stored_tile(job: dict[str, Any] | None) -> int | None:
    """The tile of an interrupted run's job (:func:`stored_job`), so "the same command" resumes, or None."""
    tile = (job or {}).get("tile")
    return int(tile) if isinstance(tile, int) and tile > 0 else None


RESUMABLE = ("running", "finishing")  # statuses of a work store "the same command" continues


def _staged(path: Path) -> Path:
    """Where a TIFF output's new file is written and checked before it replaces ``path``."""
    return path.with_name(f".{path.name}.pssr-new.tif")


def _tiff_sums(arr: Any, job: Job, blocks: list[Block], done: dict[str, Any], name: str):
    """``(grid, hex)``: each block's checksum as the TIFF will hold it.

    The verified blocks' own when the dtype is kept; else computed from the converted data, as the
    writer converts it.
    """
    g = job.tile * (1 if name == FID_ARRAY else job.scale)
    if np.dtype(arr.dtype) in (np.uint8, np.uint16, np.float32):
        return (g, g), "".join(done[b.key]["digest"][name] for b in blocks)
    hexes = []
    current, plane = None, None
    for idx, ys, xs in io.grid_cells(tuple(arr.shape), (g, g)):
        if idx != current:
            plane, current = np.asarray(arr[idx], np.float32), idx
        hexes.append(digest(plane[ys, xs]))  # type: ignore[index]
    return (g, g), "".join(hexes)


def _replaced_side_files(out: Path, keep: set[Path]) -> list[Path]:
    """Side files of the pssr TIFF at ``out`` (its own run's, as it lists them) that ``keep`` lacks."""
    if not out.is_file():
        return []
    try:
        rec = io.tiff_record(out) or {}
    except Exception:  # not a readable TIFF: nothing of its own to tidy
        return []
    names = [n for k, n in (rec.get("files") or {}).items() if k != OUT_ARRAY and isinstance(n, str)]
    if isinstance(rec.get("fidelity_json"), dict):
        names.append(str(rec["fidelity_json"].get("name")))
    found = []
    for n in names:
        p = out.with_name(Path(n).name)
        if p in keep or not p.is_file():
            continue
        try:
            mine = p.suffix == ".json" or (io.tiff_record(p) or {}).get("run") == rec.get("run")
        except Exception:
            mine = False
        if mine:
            found.append(p)
    return found


def finish_tiff(
    out: Path,
    job: Job,
    *,
    axes: str,
    scales: dict[str, dict[str, float]],
    unit: str | None,
    blocks: list[Block],
    done: dict[str, Any],
    summary: dict[str, Any],
    origins: dict[str, dict[str, float]] | None = None,
    time_unit: str | None = None,
) -> dict[str, str]:
    """Write the checked work arrays as TIFFs beside the output, check them, then move them into place.

    Each TIFF is written under a hidden name with its block checksums (the verified blocks'), read
    back and checked against them; only when every file is written does the work store say
    ``finishing`` and the files replace the output's (the previous output, if any, stays intact and
    readable until then), then the work store is dropped.  ``scales`` and ``origins`` give the pixel
    size and origin of each array (``s0``, ``fidelity``, ``uncertainty``); returns the path of each.
    """
    import hashlib
    import uuid

    group = open_arrays(job.out)
    targets = [(out, OUT_ARRAY)]
    if job.fidelity:
        targets.append((out.with_name(stem(out) + ".fidelity.tif"), FID_ARRAY))
    if job.tta:
        targets.append((out.with_name(stem(out) + ".uncertainty.tif"), UNC_ARRAY))
    fid_json = out.with_name(stem(out) + ".fidelity.json") if job.fidelity else None
    summary_bytes = json.dumps(summary, indent=2).encode()
    record: dict[str, Any] = {"run": uuid.uuid4().hex, "files": {name: p.name for p, name in targets}}
    if fid_json is not None:
        record["fidelity_json"] = {"name": fid_json.name, "sha256": hashlib.sha256(summary_bytes).hexdigest()}
    staged = []
    for path, name in targets:
        tmp = _staged(path)
        for stale in path.parent.glob(f".{path.name}.*.partial"):  # a killed finish's; we hold the lock
            stale.unlink(missing_ok=True)
        io.write_tiff(
            tmp, group[name], axes=axes, scale=scales[name], unit=unit, overwrite=True,
            origin=(origins or {}).get(name), time_unit=time_unit,
            sums=_tiff_sums(group[name], job, blocks, done, name), record={**record, "array": name},
        )  # fmt: skip
        try:
            io.check_tiff(tmp)  # read back: every block against the verified blocks' checksums
        except IntegrityError as e:
            tmp.unlink(missing_ok=True)
            raise IntegrityError(
                f"the written TIFF {str(path)!r} differs from the restored data ({e}); it was removed. "
                "Run the same command again (the restored blocks are kept)."
            ) from e
        staged.append((tmp, path))
    if fid_json is not None:
        tmp = fid_json.with_name(f".{fid_json.name}.pssr-new")
        tmp.write_bytes(summary_bytes)
        staged.append((tmp, fid_json))
    replaced = _replaced_side_files(out, {p for _, p in staged})
    w = zarr.open_group(job.out, mode="r+")  # from here a kill leaves a mix: readers refuse it until rerun
    w.attrs["pssr"] = {**dict(w.attrs.get("pssr", {})), "status": "finishing"}
    for tmp, path in staged:
        os.replace(tmp, path)
    for p in replaced:  # the previous output's side files that this run does not write
        p.unlink(missing_ok=True)
    shutil.rmtree(job.out, ignore_errors=True)
    return {name: str(path) for path, name in targets}


def after_failure(e: BaseException, work: Path | str, *, final_zarr: bool) -> None:
    """After a failed run: drop a work store with nothing worth keeping, or say what was kept."""
    if is_remote(work):  # kept as it is: the same command resumes it (the lease is released)
        if hasattr(e, "add_note") and not isinstance(e, InterruptedError | KeyboardInterrupt | LockedError):
            e.add_note(
                f"the output {str(work)!r} is incomplete (marked running); run the same command again to "
                "resume, or pass --overwrite to start over."
            )
        return
    work = Path(work)
    n_done = sum(1 for k in done_blocks(str(work)) if "/" not in k) if work.exists() else 0
    if isinstance(e, InterruptedError) and not final_zarr or (n_done == 0 and not final_zarr):
        shutil.rmtree(work, ignore_errors=True)  # nothing worth keeping
        return
    if not work.exists() or not hasattr(e, "add_note"):
        return
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        e.add_note(
            f"the disk holding {str(work.parent)!r} is full: free space there (or choose another output)."
        )
    if final_zarr and work.name.startswith(".") and work.name.endswith(io.WORK_SUFFIX):
        e.add_note(
            f"the new output is incomplete in {str(work)!r} ({n_done} blocks done); "
            f"{work.name[1 : -len(io.WORK_SUFFIX)]!r} is unchanged. Run the same command again to resume "
            "(the new output replaces the old one only when it is complete and verified)."
        )
    elif final_zarr:
        e.add_note(
            f"the output {str(work)!r} is incomplete ({n_done} blocks done, marked running); run the "
            "same command again to resume, or pass --overwrite to start over."
        )
    else:
        e.add_note(
            f"partial work ({n_done} blocks) is kept in {str(work)!r}; run the same command again to "
            "resume, or delete that folder to free its space."
        )
