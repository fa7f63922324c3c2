"""Restore an image, stack, timelapse or volume: :func:`restore` wires the parts together.

The work is a list of blocks (:mod:`pssr.blockwise.tiling`); the engine
(:mod:`pssr.blockwise.engine`) reads each
fixed batch (halo and neighbour frames included), normalises it with statistics of the whole
input, restores it (optionally with 8-fold test-time augmentation) and writes each block's core
straight into its own chunk of the work store (:mod:`pssr.blockwise.store`), then a marker with its
checksums, so a killed run restarted with the same command redoes at most the blocks in flight.
A runner drives the batches: :mod:`pssr.blockwise.runners` in this process,
:mod:`pssr.blockwise.distributed` as
dask tasks.  The store is then finished to memory, to an OME-Zarr (pyramid, metadata,
checksums, verified before it is marked complete) or to TIFF.  Optionally a fidelity map
(:mod:`pssr.blockwise.fidelity`) and an uncertainty map (TTA spread) are written beside the result.

Dependencies run one way: ``predict`` -> ``runners``/``distributed`` -> ``engine`` -> ``store``,
``fidelity``; nothing below imports ``predict``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pssr.blockwise import inputs, store
from pssr.blockwise.engine import Predictor
from pssr.blockwise.fidelity import fidelity_map, noise_spec
from pssr.blockwise.inputs import Input
from pssr.blockwise.integrity import OutputLock, RegionClaims, check_distinct, digest, zarr_sources
from pssr.blockwise.plan import Job, Mask, input_digest, work_blocks
from pssr.blockwise.publish import Target
from pssr.blockwise.regions import describe as describe_region
from pssr.blockwise.regions import parse_region, parse_world_region, snap
from pssr.blockwise.runners import run_local
from pssr.blockwise.tiling import Block, block_at, block_grid, choose_tile, group_blocks, plan_blocks
from pssr.errors import PredictError, PssrError
from pssr.io import formats as io
from pssr.io import pyramid, remote
from pssr.nn.devices import describe, resolve_device, resolve_precision
from pssr.nn.modelfile import LoadedModel, load_model, resolve_model
from pssr.nn.onnx_backend import BackendError, OnnxNetwork, resolve_backend
from pssr.util import file_sha256, io_threads

logger = logging.getLogger(__name__)

__all__ = ["Job", "PredictError", "Predictor", "RestoreResult", "fidelity_map", "parse_memory", "restore"]


@dataclass
class RestoreResult:
    """What a restoration produced.

    ``output`` (and ``fidelity``, ``uncertainty`` when asked for) depends on where it went: a
    numpy array without ``output``; the zarr array ``s0`` of an OME-Zarr output (read lazily); the
    path of a TIFF output.  ``path`` is the output file or folder (None in memory), whatever the
    kind.  ``scale`` is the output pixel size per axis; ``origin`` where the centre of its pixel 0
    lies (the input's origin shifted by -(s-1)/2 output pixels along Y and X; in input pixels
    where the input has no pixel size), as the output file's translation (OME-Zarr) or ImageJ
    origin (TIFF, calibrated axes only) says; ``summary`` the blocks, time, device and (with
    fidelity) the fraction of the map beyond 3 sigma.
    """

    output: Any
    axes: str
    scale: dict[str, float]
    unit: str | None
    fidelity: Any = None
    uncertainty: Any = None
    summary: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    origin: dict[str, float] = field(default_factory=dict)


DEFAULT_MEMORY = 2e9  # bytes for one batch of blocks in the network (per process / dask worker)
# On a GPU the budget is device memory, which nothing else in the process uses: a larger default.
# Measured on an H100 (docs/benchmarks/gpu.md): the 2 GB default gave 212-px tiles and 5.1 s for a
# 2048^2 -> 8192^2 restore; 512-px tiles 3.3 s (fewer blocks: less per-block overhead).
DEFAULT_GPU_MEMORY = 8e9
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_memory(memory: float | str | None) -> float:
    """Bytes from ``2e9``, ``"2GB"``, ``"512MiB"`` (None: the default, 2 GB)."""
    if memory is None:
        return DEFAULT_MEMORY
    if isinstance(memory, int | float) and not isinstance(memory, bool):
        value = float(memory)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e\+?[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(memory).lower())
        if not m:
            raise PredictError(f"memory={memory!r} is not a size; give bytes or e.g. '2GB', '512MiB'.")
        value = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if value != value or value in (float("inf"), float("-inf")):
        raise PredictError(f"memory={memory!r} is not a size; give bytes or e.g. '2GB', '512MiB'.")
    if not value >= 64e6:
        raise PredictError(
            f"memory={memory!r} is below 64 MB; give at least '64MB' (the smallest tile, 64 px, can need "
            "more for a large model: a warning then says how much)."
        )
    return value


def auto_tile(lm: LoadedModel, device: str, budget: float, batch: int) -> int:
    """The largest tile whose batch fits ``budget`` and half of the device's free memory.

    On the CPU the engine runs a batch's blocks through the network one at a time
    (:class:`pssr.blockwise.engine.Predictor`), so only one block's transient must fit; on a GPU the
    whole batch does, in GPU memory.
    """
    avail = min(budget, 0.5 * _device_memory(device))
    on_cpu = str(device).startswith("cpu")
    per_px, n = _bytes_per_lr_px(lm), 1 if on_cpu else batch
    tile = choose_tile(avail, per_px, lm.halo, lm.config.multiple, batch=n, fraction=1.0)
    need = n * per_px * (tile + 2 * lm.halo) ** 2
    if need > avail:
        logger.warning(
            "memory budget %.0f MB is below what the smallest tile (%d px) needs, about %.0f MB: using it "
            "anyway; give --memory %.0fMB or more (or a smaller --batch on a GPU)",
            avail / 1e6, tile, need / 1e6, need / 1e6,
        )  # fmt: skip
    return tile


def _device_memory(device: str) -> float:
    """Free memory of a CUDA device (bytes); host memory for any other device."""
    if str(device).startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    return _available_memory()


def _available_memory() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency
        return 4e9


def _bytes_per_lr_px(model: LoadedModel) -> float:
    widths = model.config.widths if model.config.arch == "srunet" else (256,) * 4
    return 4.0 * (8 * widths[0] + 3 * 16 * model.scale**2 + 2 * model.frames)


def _explain_object_store_errors(fn):
    """A 403/401/404 from the object store anywhere in a run: one line naming the URL and status."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        given = sig.bind_partial(*args, **kwargs).arguments
        with remote.explained(
            *(u if isinstance(u, str) else None for u in (given.get("output"), given.get("data")))
        ):
            return fn(*args, **kwargs)

    return run


@_explain_object_store_errors
def restore(
    data: Any,
    *,
    model: str | os.PathLike | LoadedModel = "em",
    output: str | os.PathLike | None = None,
    axes: str | None = None,
    tile: int | None = None,
    tta: bool = False,
    dtype: str = "input",
    empty_threshold: float = 0.01,
    fidelity: bool = False,
    noise: str | dict[str, float] = "fit",
    overwrite: bool = False,
    resume: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    memory: float | str | None = None,
    batch: int = 4,
    mask: Any = None,
    progress: bool = True,
    callback=None,
    storage_options: dict[str, Any] | str | None = None,
    region: str | Any = None,
    region_world: str | None = None,
    full_output: bool = False,
    dry_run: bool = False,
    disk_check: bool = True,
    frames: str = "model",
) -> RestoreResult:
    """Restore (super-resolve) an image, stack, timelapse or volume.

    Parameters
    ----------
    data : array-like or path
        numpy/dask/zarr array (returns an in-memory array unless ``output`` is given) or
        a TIFF / PNG / zarr / OME-Zarr path.
    model : str, path or LoadedModel
        Built-in name (``em``, ``fluo``, ``fluo-mf``) or a ``.safetensors`` file.
    output : path, optional
        ``.ome.zarr`` (out-of-core, resumable, with a pyramid) or ``.tif``.
    axes : str, optional
        Axes of ``data`` (``YX``, ``ZYX``, ``TYX``, ``TZYX``); read from file metadata or
        guessed from the number of dimensions otherwise.
    tile : int, optional
        Core block size in LR pixels; chosen from available memory when omitted.
    device, precision : str
        ``auto``: CUDA, then MPS, then CPU; float16 autocast on CUDA (measured within 1/1000 of the
        output range of float32), float32 elsewhere.
    backend : {"auto", "torch", "onnxruntime"}
        What runs the network.  ``auto``: ONNX Runtime when the device is the CPU, the precision
        float32 and it is installed (``pip install 'pssr-toolkit[onnx]'``; measured faster at
        equal output: docs/benchmarks/backend.md), torch otherwise, and torch (with one warning)
        when this model cannot be exported to ONNX; resuming, the backend the run started with.
    memory : float or str, optional
        Budget for one batch in the network, for the automatic tile (bytes or "4GB"): host memory on
        the CPU (default 2 GB), device memory on CUDA (default 8 GB); also at most half of what is free.
    tta : bool
        Average the 8 dihedral transforms; also yields an uncertainty map (their std).
    dtype : {"input", "float32", "uint8", "uint16"}
        Output dtype; ``input`` keeps the input's integer dtype (rounded, clipped).
    empty_threshold : float
        Blocks whose normalised range is at most this are filled with their mean
        without running the network (0 disables).
    fidelity : bool
        Also compute the consistency map (see module docstring).
    noise : "fit", "model" or dict
        Noise model for the fidelity map: fitted on the input, the model's crappifier,
        or ``{"gain": g, "sigma": s}`` in fractions of full scale.
    overwrite, resume : bool
        Replace an existing output / continue an interrupted one.
    workers : int, optional
        Run blocks on a dask LocalCluster with this many worker processes.
    scheduler : str, optional
        Address of an existing dask scheduler (``tcp://host:8786``).
    mask : path or array, optional
        Restore only the blocks where this mask (e.g. a tissue mask; a TIFF/zarr path or an
        array, 2D or with the input's dimensions, at the input's resolution or lower by a whole
        factor per axis, as a pyramid level: :class:`~pssr.blockwise.plan.Mask`; any other shape
        is refused) is non-zero; the other blocks are skipped like blocks without input data
        (their output chunks stay missing, i.e. the fill value).
    region : str or sequence of (start, stop), optional
        Restore only this region of the input, in input pixels: ``"z0:z1,y0:y1,x0:x1"`` (the
        last axes; open ends allowed) or one ``(start, stop)`` pair per axis.  Y and X grow
        outward to the block grid (so the result is byte for byte the same crop of a whole run);
        see :mod:`pssr.blockwise.regions`.
    region_world : str, optional
        The region in the input's world coordinates, e.g. ``"z=1000:2000,y=4um:8um"``.
    full_output : bool
        Write the region into an output of the whole input's size (an ``.ome.zarr``) that other
        runs fill region by region, at the same time if their regions do not overlap; the run
        that completes the last block finishes the output (pyramid, checksums, verification).
        Without it, the output is the region's size, placed by its translation (OME-Zarr) or
        origin (TIFF) where the region lies in the input.
    dry_run : bool
        Plan only (``pssr plan``): return a result whose ``summary`` is the plan (blocks total,
        populated, skipped and done; output and disk size; peak memory and time from restoring a
        few real blocks here), writing nothing.  A real run with an output checks the same disk
        estimate first and is refused, before any work, when the output cannot fit
        (``disk_check=False``: the estimate is uncompressed, an output that compresses well may fit).
    frames : {"model", "auto"}
        ``model``: a multi-frame model gets all its frames.  ``auto`` (PSSR-MF models only, see
        :mod:`pssr.blockwise.frames`): each block's neighbour frames are registered to its centre
        frame by optical flow first, and where they still disagree with it by more than the model's
        threshold (the most it saw in training) the block is restored from its centre frame alone
        by the single-frame fallback model (``fluo`` for ``fluo-mf``); ``summary["single_frame_blocks"]``
        counts them.  Safer on fast-moving or dividing cells, slower (the registration), and it
        costs a little on movies like the training ones (docs/models/fluo-mf.md).
    callback : callable, optional
        ``callback(done, total)`` after each block; returning ``False`` cancels (the
        partial output is removed unless it is a resumable OME-Zarr file output).
    storage_options : dict or JSON str, optional
        fsspec options for an input URL (``endpoint_url``, ``key``, ``secret``, ``anon``, ...);
        by default the SDKs' environment/profile chain.  Never printed, logged or stored with the
        output (dask workers get them beside the job, not in it).

    Returns
    -------
    RestoreResult

    Examples
    --------
    In memory (a numpy array back), then out-of-core into an OME-Zarr with a pyramid; ``bilinear:4``
    is the baseline that needs no weights, ``model="em"`` the built-in EM network:

    >>> import numpy as np
    >>> lr = np.random.default_rng(0).integers(0, 255, (2, 32, 32), dtype=np.uint8)
    >>> result = restore(lr, model="bilinear:4", axes="ZYX", progress=False)
    >>> result.output.shape, result.output.dtype, result.axes
    ((2, 128, 128), dtype('uint8'), 'ZYX')
    >>> result = restore(lr, model="bilinear:4", axes="ZYX", output="restored.ome.zarr", progress=False)
    >>> result.output.shape, result.summary["blocks"] >= 1
    ((2, 128, 128), True)
    """
    if not (isinstance(empty_threshold, int | float) and 0 <= empty_threshold <= 1):  # NaN fails too
        raise PredictError(
            f"empty_threshold={empty_threshold!r} must be a number from 0 (never skip a block) to 1."
        )
    retries0 = remote.retry_count()
    storage_options = remote.parse_storage_options(storage_options)
    # An output URL is, holds or lies inside an input URL: refused before anything is read or deleted
    urls = [u if isinstance(u, str) and remote.is_url(u) else None for u in (data, output)]
    check_distinct(urls[:1], urls[1:], storage_options)
    target, out_path, work = _destination(output, storage_options, overwrite)
    stored = store.stored_job(work)  # an interrupted run there: the same command resumes it as it ran
    device, precision, budget = _settings(device, precision, memory, stored)
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    requested, backend = backend, resolve_backend(backend, device, precision, lm, stored)
    model_path = lm.path or str(resolve_model(model))  # type: ignore[arg-type]
    auto, halo = _frames_auto(frames, lm, model_path)
    src, ctx = _open(data, axes, storage_options, lm, out_path, work, fidelity=fidelity, tta=tta)
    tile = _tile(tile, stored, lm, device, budget, batch)
    box = _box(src, region, region_world, tile, full_output, out_path, target)
    if backend == "onnxruntime":
        backend = _prepare_onnx(lm, src.shape, tile, tta, explicit=str(requested).lower() != "auto")
    logger.info("device: %s, precision: %s, backend: %s", describe(device), precision, backend)
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="pssr-restore-")) / "work.zarr"
    staged = None
    if src.path is None and (workers or scheduler):  # an in-memory input, staged for dask workers to read
        beside = Path(tempfile.mkdtemp(prefix="pssr-input-")) / "work.zarr" if store.is_remote(work) else work
        staged = src.stage(beside)
    lo, hi, fs = src.normalisation(lm)
    mask_arr, mask_id = _open_mask(mask, src.shape)
    job = Job(
        input=src.path or "<memory>",
        input_axes=src.axes,
        input_array=src.array,
        model=str(Path(model_path).resolve()) if Path(model_path).is_file() else str(model_path),
        scale=lm.scale,
        frames=lm.frames,
        context_axis=ctx,
        lo=lo,
        hi=hi,
        full_scale=fs,
        tile=tile,
        halo=halo,
        out=str(work),
        out_dtype=_out_dtype(dtype, src.arr.dtype),
        tta=tta,
        empty_threshold=float(empty_threshold),
        fidelity=fidelity,
        noise=noise_spec(noise, lm.crappifier, src.arr) if fidelity else {},
        batch=batch,
        device=device,
        precision=precision,
        input_id=src.input_id,
        model_sha256=file_sha256(lm.path),
        backend=backend,
        region=[list(r) for r in box] if box is not None else None,
        full_output=bool(full_output),
        mask=mask_id,
        frames_auto=auto,
    )
    run = _Run(
        src, lm, job, out_path, staged, workers, scheduler, storage_options, retries0=retries0, mask=mask_arr
    )
    planned = _preflight(run, target, dry_run=dry_run, disk_check=disk_check)
    if planned is not None:
        return planned
    if out_path is None:
        return run.in_memory(progress, callback)
    go = dict(overwrite=overwrite, resume=resume, progress=progress, callback=callback)
    return _to_remote(run, target, **go) if target is not None else _to_file(run, **go)


def _frames_auto(frames: str, lm: LoadedModel, model_path: str) -> tuple[dict[str, Any], int]:
    """The job's ``frames_auto`` settings ({} unless ``frames="auto"``) and the halo its blocks need."""
    if frames not in ("model", "auto"):
        raise PredictError(
            f"frames={frames!r} must be 'model' (the model's own frames) or 'auto' (fall back to a "
            "single-frame model where the frames disagree)."
        )
    if frames == "model":
        return {}, int(lm.halo)
    from pssr.blockwise.frames import auto_settings
    from pssr.errors import PssrError

    try:
        auto = auto_settings(lm.path or model_path, lm.meta, lm.frames)
    except PssrError as e:
        raise PredictError(str(e)) from None
    fb = load_model(auto["fallback"])
    if fb.frames != 1 or fb.scale != lm.scale or fb.normalization != lm.normalization:
        raise PredictError(
            f"--frames auto: the fallback {auto['fallback']} must be a single-frame model of the same scale "
            f"and normalisation as the model (it has {fb.frames} frame(s), scale {fb.scale}, "
            f"{fb.normalization}; the model scale {lm.scale}, {lm.normalization}); fix the model's "
            "'frames_auto' metadata."
        )
    return auto, max(int(lm.halo), int(fb.halo))


def _destination(
    output: str | os.PathLike | None, storage_options: dict[str, Any], overwrite: bool
) -> tuple[Target | None, Path | None, Path | None]:
    """Where the result goes: a remote target (object storage, precomputed), the output file, its work store.

    An OME-Zarr on object storage is its own work store (written in place, its URL); a precomputed
    output is computed into an OME-Zarr work store beside it (on the same object store, or on the
    local disk), then converted (:mod:`pssr.blockwise.publish`).
    """
    target = Target.of(output, storage_options)
    if target is not None and target.remote:
        # Written straight into the object store (a precomputed output: an OME-Zarr work store beside
        # it there, converted at the end): local disk holds no more than the blocks in flight.
        remote.set_storage_options(target.output, storage_options)
        staging = str(target.staging)
        return target, Path(staging.rsplit("/", 1)[-1]), staging  # type: ignore[return-value]
    if target is not None:
        output = target.staging
    out_path = _output_path(output)
    work = _work_path(out_path, overwrite and target is None)  # a local precomputed output's staging
    return target, out_path, work


def _settings(device: str, precision: str, memory: float | str | None, stored) -> tuple[str, str, float]:
    """Device, precision (a resumed run keeps its own) and the memory budget of one batch."""
    device = resolve_device(device)
    precision = _precision(precision, device, stored)
    budget = DEFAULT_GPU_MEMORY if memory is None and str(device).startswith("cuda") else parse_memory(memory)
    try:
        io_threads()  # a bad $PSSR_IO_THREADS is refused before any output exists
    except ValueError as e:
        raise PredictError(str(e)) from None
    return device, precision, budget


def _open(
    data: Any,
    axes,
    storage_options,
    lm: LoadedModel,
    out_path: Path | None,
    work: Path | None,
    *,
    fidelity,
    tta,
) -> tuple[Input, int | None]:
    """The input, opened lazily, and the axis the model's frames come from; refuse what cannot be written."""
    src = Input.open(data, axes, storage_options)
    ctx = inputs.context_axis(src.axes, lm.frames, lm.meta.get("context_axis"))
    if ctx is not None and src.shape[ctx] == 1:
        logger.warning(
            "the model takes %d frames along %s but the input has one plane there: its neighbours are the "
            "plane itself (a single-frame model such as em or fluo suits a single plane better)",
            lm.frames, src.axes[ctx],
        )  # fmt: skip
    if out_path is None:
        return src, ctx
    if "C" in src.axes and not _is_zarr(out_path):
        raise PredictError(
            f"the input's axes are {src.axes} (a single channel kept as an axis, as in 5D OME-Zarr): "
            f"a TIFF output cannot hold them in that order; write an .ome.zarr output (it keeps "
            f"{src.axes})."
        )
    canonical = "".join(a for a in "TCZYX" if a in src.axes)
    if src.axes != canonical:
        raise PredictError(
            f"the input's axes are {src.axes}, but a file output (OME-Zarr or ImageJ TIFF) needs them in "
            f"the order {canonical} (time, channel, then space); reorder the array (e.g. np.moveaxis) or "
            "write it to a new file in that order, or restore it in memory (no output path)."
        )
    # Never write into, over or around the input (an OME-Zarr's s0, a napari layer's store).
    sources = [src.path] if src.path else [str(p) for p in zarr_sources(data)]
    sources = [io.local_file(p) for p in sources if not remote.is_url(p)]
    if not store.is_remote(work):
        check_distinct(sources, [out_path, work, *store.side_files(out_path, fidelity=fidelity, tta=tta)])
    return src, ctx


def _tile(tile: int | None, stored, lm: LoadedModel, device: str, budget: float, batch: int) -> int:
    """The core block size: given, the interrupted run's (free memory changes), or from the budget."""
    if tile is None:
        tile = store.stored_tile(stored) or auto_tile(lm, device, budget, batch)
    if tile < lm.config.multiple or tile % lm.config.multiple:
        raise PredictError(f"tile={tile} must be a positive multiple of {lm.config.multiple} for this model.")
    return int(tile)


def _box(src: Input, region, region_world, tile: int, full_output: bool, out_path, target):
    """The region to restore (None: all of it), snapped to the block grid."""
    if full_output and target is not None and target.kind != "ome-zarr":
        raise PredictError(
            f"--full-output fills an OME-Zarr output (local, on a shared filesystem or on object storage) "
            f"region by region; {target.output!r} is a precomputed volume: restore each region into its "
            "own output, or fill a full-size OME-Zarr."
        )
    return _region(src, region, region_world, tile, full_output, out_path)


def _preflight(run: _Run, target, *, dry_run: bool, disk_check: bool) -> RestoreResult | None:
    """The plan: returned as the result of a dry run; otherwise a run whose output cannot fit is refused."""
    out_path, src = run.out_path, run.src
    if target is not None and target.remote:
        disk_check = False  # blocks go straight to the object store: no local disk to fill
    elif target is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]  # the local staging
    elif out_path is not None:
        store.check_parent(out_path)
    if not (dry_run or (out_path is not None and disk_check)):
        return None
    plan = run.plan(calibrate_batches=3 if dry_run else 0)
    if dry_run:
        if run.staged:
            shutil.rmtree(run.staged, ignore_errors=True)
        return RestoreResult(None, src.axes, run.out_scale, src.unit, summary=plan, origin=run.out_origin,
                             path=str(out_path) if out_path else None)  # fmt: skip
    if disk_check and plan["disk_needed_bytes"] > plan["disk_free_bytes"]:
        raise PredictError(
            f"the output {str(out_path)!r} needs up to {plan['disk_needed_bytes'] / 1e9:.3g} GB "
            f"({plan['blocks_to_do']} blocks to write, uncompressed, pyramid included) but "
            f"{plan['disk_free_dir']!r} has {plan['disk_free_bytes'] / 1e9:.3g} GB free; free space, "
            "choose an output on a larger disk, or restore a --region at a time (pssr plan shows "
            "the sizes; --no-disk-check runs anyway: the estimate is uncompressed). Nothing was written."
        )
    return None


def _to_remote(
    run: _Run, target: Target, *, overwrite: bool, resume: bool, progress, callback
) -> RestoreResult:
    """Write in place on object storage under the output's lease, or into a local staging store (locked).

    Then publish what needs it: a precomputed output, converted from its OME-Zarr work store.
    """
    out_path, job, src = run.out_path, run.job, run.src
    assert out_path is not None
    if job.full_output:
        return _to_remote_regions(run, target, overwrite=overwrite, progress=progress, callback=callback)
    with OutputLock(out_path) if not target.remote else contextlib.nullcontext():
        target.begin(overwrite=overwrite, axes=src.axes, maps=job.fidelity or job.tta)
        led = store.ledger(str(run.work)) if target.remote else None
        try:
            if led is not None:  # every block write and done record checks this run still holds the lease
                led.guard = target.lease  # type: ignore[attr-defined]
            run.target = target
            if target.staged_complete(job) and not overwrite:
                logger.info("%s was computed and verified before; publishing it", target.output)
                return run.publish_only()
            shape = store.out_lr_shape(job, src.shape)
            if target.remote:
                resumed = store.prepare_remote(str(run.work), job, shape, overwrite=overwrite, fill=run.fill)
                if resume and not resumed:
                    logger.info("nothing to resume at %s; starting a new run", target.output)
            else:
                store.prepare_output(
                    out_path, run.work, job, shape, overwrite=overwrite, resume=resume, side=[],
                )  # fmt: skip
            return run.to_file(progress, callback)
        finally:
            if led is not None:
                led.guard = None  # type: ignore[attr-defined]
            target.end()


def _to_remote_regions(run: _Run, target: Target, *, overwrite: bool, progress, callback) -> RestoreResult:
    """A --full-output run on object storage: its region claimed, then restored and finished.

    The region is claimed and the output created (or checked) under the output's lease, held only
    for that moment (and to finish), as :func:`_to_file` does with the lock file of a local
    output; runs over other regions go on meanwhile.
    """
    job, src = run.job, run.src
    url = target.output
    claims = remote.Claims(target.store(), url)
    mutex = remote.Lease(target.store(), url)
    try:
        mutex.acquire(wait=MUTEX_WAIT)
    except PssrError:
        raise
    except Exception as e:  # a missing bucket, a 403, an unreachable endpoint: one line
        raise remote.explain(url, e, "write") from None
    try:
        target.begin(overwrite=overwrite, axes=src.axes, maps=job.fidelity or job.tta, held=True)
        whole = [[0, n] for n in src.shape]
        claim = claims.claim(
            job.region or whole, full_output=True, overwrite=overwrite,
            describe=lambda r: describe_region(r, src.axes),
        )  # fmt: skip
        try:
            shape = store.out_lr_shape(job, src.shape)
            store.prepare_remote(str(run.work), job, shape, overwrite=overwrite, fill=run.fill)
        except BaseException:
            claims.release(claim)
            raise
    finally:
        mutex.release()
    return run.to_file(progress, callback, claims, claim, mutex)  # type: ignore[arg-type]


def _to_file(run: _Run, *, overwrite: bool, resume: bool, progress, callback) -> RestoreResult:
    """Claim this run's region, create (or check) the output under its lock, then run and finish.

    The output's lock is held only to claim this run's blocks and to create (or check) the output,
    then to finish it: runs over other regions of a --full-output output go on meanwhile.
    """
    out_path, job, src = run.out_path, run.job, run.src
    assert out_path is not None
    side = store.side_files(out_path, fidelity=job.fidelity, tta=job.tta)
    claims = RegionClaims(out_path)
    mutex = OutputLock(out_path)
    with contextlib.ExitStack() as locks:
        for p in side:  # side files are outputs too: one writer each
            locks.enter_context(OutputLock(p))
        mutex.acquire(wait=MUTEX_WAIT)
        try:
            whole = [[0, n] for n in src.shape]
            claim = claims.claim(
                job.region or whole, full_output=job.full_output, overwrite=overwrite,
                describe=lambda r: describe_region(r, src.axes),
            )  # fmt: skip
            try:
                out_shape = store.out_lr_shape(job, src.shape)
                store.prepare_output(
                    out_path, run.work, job, out_shape, overwrite=overwrite, resume=resume, side=side,
                    fill=run.fill,
                )  # fmt: skip
            except BaseException:
                claims.release(claim)
                raise
        finally:
            mutex.release()
        return run.to_file(progress, callback, claims, claim, mutex)


MUTEX_WAIT = 120.0  # seconds a run waits for another to finish claiming its region or creating the output


def _region(src: Input, region: Any, world: str | None, tile: int, full_output: bool, out: Path | None):
    """The checked region of this run (snapped to the block grid), or None for the whole input."""
    if full_output and (out is None or not _is_zarr(out)):
        raise PredictError(
            "full_output (--full-output) writes regions into one OME-Zarr output of the input's size: "
            f"give an .ome.zarr output (got {str(out) if out else 'none: in memory'!r})."
        )
    if region is not None and world is not None:
        raise PredictError("give the region once: --region (input pixels) or --region-world, not both.")
    if region is None and world is None:
        return None
    if world is not None:
        box = parse_world_region(world, src.axes, src.shape, src.scale, src.origin, src.unit)
    elif isinstance(region, str):
        box = parse_region(region, src.axes, src.shape)
    else:
        pairs = [(r.start, r.stop) if isinstance(r, slice) else tuple(r) for r in region]
        text = ",".join(f"{'' if a is None else a}:{'' if b is None else b}" for a, b in pairs)
        box = parse_region(text, src.axes, src.shape)
    snapped = snap(box, tile, src.shape)
    if snapped != box:
        logger.info(
            "region %s grown to the block grid (tile %d): %s",
            describe_region(box, src.axes), tile, describe_region(snapped, src.axes),
        )  # fmt: skip
    return snapped


def _open_mask(mask: Any, shape: tuple[int, ...]) -> tuple[Mask | None, str]:
    """The mask as a :class:`Mask` over an input of ``shape``, and what identifies it in the job."""
    if mask is None:
        return None, ""
    if isinstance(mask, str | os.PathLike):
        path = Path(mask)
        if not path.exists():
            raise PredictError(
                f"mask {str(path)!r} does not exist; --mask takes a TIFF or zarr (any lower resolution) "
                "whose non-zero pixels mark where to restore."
            )
        data = io.read_image(path).data
        st = path.resolve() / ("zarr.json" if path.is_dir() else "")
        ident = f"{path.resolve()}:{st.stat().st_size}:{st.stat().st_mtime_ns}" if st.exists() else str(path)
        return Mask(data, shape, where=f"mask {str(path)!r}"), ident
    data = np.asarray(mask)
    return Mask(data, shape), "blake2b:" + digest(np.ascontiguousarray(data))


def _prepare_onnx(lm: LoadedModel, shape: tuple[int, ...], tile: int, tta: bool, explicit: bool) -> str:
    """Export (or load from the cache and check) the ONNX graphs this restoration's reads need.

    Done here, once, before any block runs: workers then find them in the cache, and a model the
    exporter cannot handle is known up front.  Returns the backend to use: ``onnxruntime``, or
    ``torch`` when ``auto`` chose it and it failed (one warning); an explicit request raises.
    """
    plan_blocks((1, 1), tile, lm.halo, lm.config.multiple)  # the checks of tile and halo
    # Every read shape occurs among the blocks a halo (plus two) from each end of each axis (the
    # others all read tile + 2 halo): found without listing the plane's blocks (611 k at 200000^2).
    ny, nx = block_grid(tuple(shape[-2:]), tile)
    k = lm.halo // tile + 2
    rows = sorted({*range(min(k + 1, ny)), *range(max(0, ny - k - 1), ny)})
    cols = sorted({*range(min(k + 1, nx)), *range(max(0, nx - k - 1), nx)})
    blocks = [block_at(tuple(shape[-2:]), tile, lm.halo, (by, bx)) for by in rows for bx in cols]
    # Every block reads its core plus the halo on each side (the image mirrored beyond its edges).
    shapes = {
        (lm.config.input_channels, b.core[1] - b.core[0] + 2 * lm.halo, b.core[3] - b.core[2] + 2 * lm.halo)
        for b in blocks
    }
    if tta:  # rotated blocks: height and width swap
        shapes |= {(c, w, h) for c, h, w in shapes}
    try:
        OnnxNetwork(lm).prepare(shapes)
    except Exception as e:
        if explicit:
            if isinstance(e, BackendError):
                raise
            raise BackendError(
                f"backend='onnxruntime': ONNX Runtime could not run this model ({type(e).__name__}: {e}); "
                "use --backend torch."
            ) from e
        logger.warning("ONNX Runtime is not used for this model (%s); running it with torch", e)
        return "torch"
    return "onnxruntime"


def _precision(precision: str, device: str, stored: dict[str, Any] | None) -> str:
    """The precision of this run: ``auto`` continues an interrupted run in the precision it started with.

    An output started on a GPU with the defaults (float16) can so be finished on a CPU node, in
    float16 autocast there (slower; the CPU's own default is float32), as "the same command" promises.
    """
    started = (stored or {}).get("precision")
    if str(precision).lower() == "auto" and started in ("float32", "bfloat16", "float16"):
        if started == "float16" and device == "cpu":
            logger.info("resuming in float16 as the run started (on a GPU); float16 autocast on the CPU")
            return started
        return resolve_precision(started, device)
    return resolve_precision(precision, device)


def _output_path(output: str | os.PathLike | None) -> Path | None:
    if output is None:
        return None
    out = Path(output)
    if not out.name.lower().endswith(io.TIFF_EXT + io.ZARR_EXT):
        raise PredictError(f"output {str(out)!r} must end in .tif/.tiff or .zarr / .ome.zarr.")
    return out


def _is_zarr(out: Path | None) -> bool:
    return out is not None and out.name.lower().endswith(io.ZARR_EXT)


def _work_path(out: Path | None, overwrite: bool = False) -> Path | None:
    """The work store (None: in memory).

    A hidden zarr beside a TIFF output or beside an OME-Zarr that ``overwrite`` replaces (swapped in
    when complete), else the output OME-Zarr itself.
    """
    if out is None:
        return None
    r = out.resolve()
    hidden = r.with_name(f".{r.name}{io.WORK_SUFFIX}")
    if _is_zarr(out) and not (overwrite and (r.exists() or hidden.exists())):
        return r
    return hidden


def _out_dtype(dtype: str, in_dtype: Any) -> str:
    out = np.dtype(in_dtype).name if dtype == "input" else dtype
    return out if out in ("uint8", "uint16", "float32", "float64", "int16", "int32") else "float32"


@dataclass
class _Run:
    """One restoration: execute the pending blocks, check them, finish the output."""

    src: Input
    lm: LoadedModel
    job: Job
    out_path: Path | None
    staged: Path | None
    workers: int | None
    scheduler: str | None
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # secrets: never shown
    counters: dict[str, int] = field(default_factory=dict)
    retries0: int = 0  # pssr.io.remote.retry_count() when the restoration started (opening the input)
    target: Target | None = None  # where a staged output is published
    mask: Mask | None = None

    @property
    def fill(self) -> float:
        """The output's fill value: the input's, in the output dtype (what a skipped block reads as)."""
        f = getattr(self.src.arr, "fill_value", None)
        f = 0.0 if f is None or not np.isfinite(float(f)) else float(f)
        return pyramid.cast(np.float32(f), self.job.out_dtype).item()

    @property
    def work(self) -> Path:
        return self.job.out if store.is_remote(self.job.out) else Path(self.job.out)  # type: ignore[return-value]

    @property
    def out_scale(self) -> dict[str, float]:
        return {a: (v / self.lm.scale if a in "XY" else v) for a, v in self.src.scale.items()}

    def plan(self, calibrate_batches: int = 0) -> dict[str, Any]:
        """Blocks (total, populated, skipped, done), output and disk size, memory and time estimates."""
        from pssr.blockwise import estimate

        job, src = self.job, self.src
        wp = work_blocks(src.arr, job, self.lm.config.multiple, self.mask)  # the run's own plan
        pop = wp.blocks
        done = (
            store.done_blocks(job.out)
            if self.out_path is not None and (store.is_remote(job.out) or Path(job.out).is_dir())
            else {}
        )
        todo = [b for b in pop if b.key not in done]
        lr_out = store.out_lr_shape(job, src.shape)
        hr_out = (*lr_out[:-2], lr_out[-2] * job.scale, lr_out[-1] * job.scale)
        n_levels = len(pyramid.level_shapes(hr_out)) if _is_zarr(self.out_path) else 1
        # (an OME-Zarr with a single level counts once: the work store is the output)
        where = (
            self.out_path.resolve().parent
            if self.out_path is not None and not store.is_remote(job.out)
            else Path(tempfile.gettempdir())
        )
        per_px, n = _bytes_per_lr_px(self.lm), 1 if str(job.device).startswith("cpu") else job.batch
        plan: dict[str, Any] = {
            "input_shape": list(src.shape),
            "axes": src.axes,
            "region": job.region,
            "full_output": job.full_output,
            "tile": job.tile,
            "halo": job.halo,
            "scale": job.scale,
            "output_shape": list(hr_out),
            "output_dtype": job.out_dtype,
            "pyramid_levels": n_levels,
            "blocks": wp.total,
            "blocks_populated": len(pop),
            "blocks_skipped": wp.total - len(pop),
            "blocks_done": sum(1 for b in pop if b.key in done),
            "blocks_to_do": len(todo),
            # a TIFF output is written from its work store: both exist at the end
            "disk_needed_bytes": estimate.disk_needed(job, todo, n_levels) * (1 if n_levels > 1 else 2),
            "disk_free_bytes": shutil.disk_usage(where).free,
            "disk_free_dir": str(where),
            "network_memory_bytes": n * per_px * (job.tile + 2 * job.halo) ** 2,
            "device": job.device,
            "backend": job.backend,
            "precision": job.precision,
        }
        if calibrate_batches and todo:
            cal = estimate.calibrate(src.arr, self.lm, job, todo, calibrate_batches)
            plan.update(cal)
            plan["estimated_seconds"] = cal["seconds_per_block"] * len(todo)
        return plan

    @property
    def in_origin(self) -> dict[str, float]:
        """Where the output's LR pixel 0 lies: the input's origin, moved to a cropped region's start."""
        src, off = self.src, store.out_offset(self.job)
        if off is None:
            return src.origin
        org = dict(src.origin)
        for a, o in zip(src.axes, off, strict=True):
            if o and a != "C":
                org[a] = src.origin.get(a, 0.0) + o * src.scale.get(a, 1.0)
        return org

    @property
    def out_origin(self) -> dict[str, float]:
        src, org = self.src, self.in_origin
        _, t0 = store.output_geometry(src.axes, src.scale, org, self.lm.scale)
        return {a: v for a, v in t0.items() if a != "C" and (v or a in org)}

    def execute(self, progress: bool, callback) -> dict[str, Any]:
        """Run every block not done and intact; returns the done records and timing summary."""
        job = self.job
        group = store.open_arrays(job.out, mode="r+")
        t0 = time.monotonic()
        plan = work_blocks(self.src.arr, job, self.lm.config.multiple, self.mask)
        blocks = plan.blocks
        if plan.skipped:
            logger.info(
                "%d of %d blocks skipped (input all fill value%s)",
                plan.skipped, plan.total, " or masked out" if self.mask is not None else "",
            )  # fmt: skip
        done = store.done_blocks(job.out)
        if done:  # resuming: done blocks must read back intact and come from the same input
            done = store.verified_done(group, job, blocks, done, lambda b: input_digest(self.src.arr, job, b))
            logger.info("resuming: %d of %d blocks already done and intact", len(done), len(blocks))
        # OME-Zarr outputs: pyramid chunks are computed as soon as the blocks under them are written.
        builder = (
            store.pyramid_builder(self.work, job, blocks, done, sparse=plan.skipped > 0)
            if _is_zarr(self.out_path)
            else None
        )
        by_key = {b.key: b for b in blocks}

        def written(keys: list[str]) -> None:
            for k in keys:
                builder.written(store.out_slices(job, by_key[k]))  # type: ignore[union-attr]

        try:
            for _ in range(2):  # a block that does not read back intact after the run is redone once
                pending = [g for g in group_blocks(blocks, job.batch) if any(b.key not in done for b in g)]
                if not pending:
                    break
                on = written if builder is not None else None
                if self._run_blocks(pending, set(done), len(blocks), progress, callback, on):
                    raise InterruptedError("restoration cancelled; nothing was written as complete.")
                done = store.verified_done(group, job, blocks, store.done_blocks(job.out))
            if builder is not None and not job.full_output and all(b.key in done for b in blocks):
                builder.close()  # what is left above blocks done by an earlier run
        finally:
            if builder is not None:
                builder.abort()
        missing = [b for b in blocks if b.key not in done]
        if missing:
            raise PredictError(
                f"{len(missing)} of {len(blocks)} blocks did not finish intact (e.g. {missing[0].where()}); "
                "the output is incomplete. Run the same command again to resume."
            )
        summary = store.run_summary(done, blocks, self.job, time.monotonic() - t0, total=plan.total)
        # transient failures of remote reads retried (and counted) by pssr.io.remote, here and on workers
        summary["retries"] = remote.retry_count() - self.retries0 + self.counters.get("retries", 0)
        return {"done": done, "blocks": blocks, "summary": summary}

    def _run_blocks(
        self, pending: list[list[Block]], done: set[str], n_total: int, progress, callback, on_written
    ) -> bool:
        """The pending batches on dask (workers/scheduler given) or in this process; True when cancelled."""
        if self.scheduler or self.workers:
            from pssr.blockwise.distributed import run_distributed

            return run_distributed(
                self.job, pending, done, n_total=n_total, workers=self.workers, scheduler=self.scheduler,
                progress=progress, callback=callback, on_written=on_written,
                storage_options=self.storage_options, counters=self.counters,
            )  # fmt: skip
        return run_local(
            self.src.arr, self.lm, self.job, pending, done, n_total=n_total, progress=progress,
            callback=callback, on_written=on_written,
        )  # fmt: skip

    def in_memory(self, progress: bool, callback) -> RestoreResult:
        """Restore into a temporary store and return numpy arrays."""
        store.create_store(self.work, self.job, store.out_lr_shape(self.job, self.src.shape), self.fill)
        try:
            res = self.execute(progress, callback)
            g = store.open_arrays(self.job.out)
            return RestoreResult(
                np.asarray(g[store.OUT_ARRAY][...]),
                self.src.axes,
                self.out_scale,
                self.src.unit,
                np.asarray(g[store.FID_ARRAY][...]) if self.job.fidelity else None,
                np.asarray(g[store.UNC_ARRAY][...]) if self.job.tta else None,
                res["summary"],
                origin=self.out_origin,
            )
        finally:
            shutil.rmtree(self.work.parent, ignore_errors=True)
            if self.staged:
                shutil.rmtree(self.staged, ignore_errors=True)

    def to_file(
        self,
        progress: bool,
        callback,
        claims: RegionClaims | None = None,
        claim: Path | None = None,
        mutex: OutputLock | None = None,
    ):
        """Restore this run's blocks into the output's store, then finish it (or leave it to another run).

        On failure say what was kept and how to go on.  The output's lock is taken again to
        finish: a --full-output run that finds other runs still writing leaves the output to the
        last of them.
        """
        zarr_out = _is_zarr(self.out_path)
        # A --full-output run on object storage: its region claim (a lease) guards its block writes,
        # then the output's lease, taken again to finish, guards the finish.
        led = store.ledger(str(self.work)) if store.is_remote(self.work) and claims is not None else None
        if led is not None:
            led.guard = claim  # type: ignore[attr-defined]
        try:
            try:
                res = self.execute(progress, callback)
            except BaseException as e:
                if claims is not None:
                    claims.release(claim)
                store.after_failure(e, self.work, final_zarr=zarr_out)
                raise
            if mutex is not None:
                mutex.acquire(wait=MUTEX_WAIT)
            try:
                if claims is not None:
                    claims.release(claim)
                if led is not None:
                    led.guard = mutex  # type: ignore[attr-defined]
                if self.job.full_output:
                    return self._finish_full(res, others=bool(claims.live()) if claims is not None else False)
                if not zarr_out:
                    return self._finish_tiff(res)
                out = self._finish_zarr(res)
                return self._publish(out) if self.target is not None else out
            except BaseException as e:
                store.after_failure(e, self.work, final_zarr=zarr_out)
                raise
            finally:
                if mutex is not None:
                    mutex.release()
        finally:
            if led is not None:
                led.guard = None  # type: ignore[attr-defined]
            if self.staged:
                shutil.rmtree(self.staged, ignore_errors=True)

    def publish_only(self) -> RestoreResult:
        """Publish a staging output that a cut-short run had computed and verified."""
        g = store.open_group(self.work, mode="r")
        summary = dict(dict(g.attrs).get("pssr", {}).get("summary") or {})
        out = RestoreResult(
            None, self.src.axes, self.out_scale, self.src.unit, summary=summary, origin=self.out_origin
        )
        return self._publish(out)

    def _publish(self, out: RestoreResult) -> RestoreResult:
        assert self.target is not None
        t = self.target
        out.summary = {**out.summary, "published": t.publish(self.job.to_json())}
        out.summary["retries"] = remote.retry_count() - self.retries0 + self.counters.get("retries", 0)
        out.path = t.output
        if t.kind == "ome-zarr":
            g = zarr.open_group(remote.zarr_store(t.output, storage_options=self.storage_options), mode="r")
            arrays = store.open_arrays(t.output, group=g)
            out.output = arrays[store.OUT_ARRAY]
            out.fidelity = arrays.get(store.FID_ARRAY)
            out.uncertainty = arrays.get(store.UNC_ARRAY)
        else:
            out.output, out.fidelity, out.uncertainty = t.output, None, None
        return out

    def _finish_full(self, res: dict[str, Any], others: bool) -> RestoreResult:
        """A --full-output run's end: finish the output if every block is done and no run is writing.

        Otherwise (other runs still writing, or regions never run) the pyramid chunks whose blocks
        are all done are computed (when no other run is writing) and the output stays ``running``.
        """
        job = self.job
        wp = work_blocks(self.src.arr, job, self.lm.config.multiple, self.mask, whole=True)
        every = wp.blocks  # every block of the output that holds data (skipped ones stay missing)
        done = store.done_blocks(job.out)
        n_done = sum(1 for b in every if b.key in done)
        if not others:
            builder = store.pyramid_builder(
                self.work, job, every, done, sparse=len(every) < wp.total, whole=True
            )
            try:
                builder.close(only_ready=n_done < len(every))
            finally:
                builder.abort()
        if n_done == len(every) and not others:
            summary = store.run_summary(done, every, job, res["summary"]["seconds"], total=wp.total)
            summary["region_blocks"] = len(res["blocks"])
            return self._finish_zarr({"done": done, "blocks": every, "summary": summary})
        summary = {
            **res["summary"],
            "complete": False,
            "output_blocks": len(every),
            "output_blocks_done": n_done,
            "other_runs_writing": others,
        }
        g = store.open_group(self.work, mode="r")
        return RestoreResult(
            g[store.OUT_ARRAY], self.src.axes, self.out_scale, self.src.unit, None, None, summary,
            str(self.work), origin=self.out_origin,
        )  # fmt: skip

    def _finish_zarr(self, res: dict[str, Any]) -> RestoreResult:
        from pssr.blockwise.verify import verify_output

        src = self.src
        # On object storage: this run still holds the lease (renewed now) and owns the output; a run
        # that lost it (stalled past its expiry, taken over) never builds, checksums or marks it.
        store.check_owner(self.work)
        store.finish_zarr(
            self.work, self.job, src.axes, src.scale, src.unit, res["summary"], res["done"], built=True,
            in_origin=self.in_origin, time_unit=src.time_unit, blocks=res["blocks"],
        )  # fmt: skip
        # The same check `pssr verify` runs, before the output may call itself complete.
        verify_output(self.work, progress=False, allow_running=True)
        store.mark_complete(self.work)
        if store.is_remote(self.work):  # written in place on object storage: nothing to move
            out: Any = self.work
        else:
            out = self.out_path.resolve()  # type: ignore[union-attr]
            if self.work != out:  # --overwrite: the new output, complete and verified, replaces the old one
                io.replace_path(self.work, out)
        g = store.open_arrays(out)
        fid = g[store.FID_ARRAY] if self.job.fidelity else None
        unc = g[store.UNC_ARRAY] if self.job.tta else None
        return RestoreResult(
            g[store.OUT_ARRAY], src.axes, self.out_scale, src.unit, fid, unc, res["summary"], str(out),
            origin=self.out_origin,
        )  # fmt: skip

    def _finish_tiff(self, res: dict[str, Any]) -> RestoreResult:
        assert self.out_path is not None
        scales = {
            store.OUT_ARRAY: self.out_scale,
            store.FID_ARRAY: self.src.scale,
            store.UNC_ARRAY: self.out_scale,
        }
        out_origin = self.out_origin
        origins = {store.OUT_ARRAY: out_origin, store.FID_ARRAY: self.in_origin, store.UNC_ARRAY: out_origin}
        paths = store.finish_tiff(
            self.out_path, self.job, axes=self.src.axes, scales=scales, unit=self.src.unit,
            blocks=res["blocks"], done=res["done"], summary=res["summary"], origins=origins,
            time_unit=self.src.time_unit,
        )  # fmt: skip
        return RestoreResult(
            paths[store.OUT_ARRAY],
            self.src.axes,
            self.out_scale,
            self.src.unit,
            paths.get(store.FID_ARRAY),
            paths.get(store.UNC_ARRAY),
            res["summary"],
            paths[store.OUT_ARRAY],
            origin=self.out_origin,
        )
