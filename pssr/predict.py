"""Run a model over images and volumes, block by block: local, out-of-core, resumable.

``restore`` is the one entry point for arrays and files.  The work is a list of blocks
(:mod:`pssr.tiling`); each block is read (with halo and, for multi-frame models, its
neighbouring frames), normalised with statistics of the whole input, restored
(optionally with 8-fold test-time augmentation), cropped to its core and written
straight into its own chunk of the output zarr array.  A small marker file is written
only after the chunk, so a killed run restarted with the same command redoes at most
the blocks that were in flight.  The same ``process_block`` runs in-process or as dask
tasks (:mod:`pssr.distributed`).

Fidelity (``fidelity=True``): each restored block is degraded again with the
deterministic part of the model's acquisition model (blur and undersampling) and
compared with the measured low-resolution input, in units of the expected noise sigma
at that intensity; the map is written at input resolution beside the result.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from scipy import ndimage

from pssr import io, pyramid
from pssr.crappify import CrappifierConfig, full_scale_of, lr_noise_variance, undersample
from pssr.data import _strided_sample, percentile_norm
from pssr.devices import describe, resolve_device, resolve_precision
from pssr.errors import PssrError
from pssr.integrity import IntegrityError, OutputLock, check_distinct, digest, zarr_sources
from pssr.modelfile import LoadedModel, load_model, resolve_model
from pssr.tiling import Block, choose_tile, frame_indices, group_blocks, plan_blocks

logger = logging.getLogger(__name__)

__all__ = ["Job", "Predictor", "RestoreResult", "fidelity_map", "restore"]

DONE_DIR = ".pssr_done"
OUT_ARRAY = "s0"
FID_ARRAY = "fidelity"
UNC_ARRAY = "uncertainty"
FIDELITY_WINDOW = 3


class PredictError(PssrError):
    """The data, model or output do not fit together; the message says how to fix it."""


# --------------------------------------------------------------------------------- job
@dataclass
class Job:
    """Everything a worker needs to process any block (JSON-serialisable)."""

    input: str
    input_axes: str
    input_array: str | None
    model: str
    scale: int
    frames: int
    context_axis: int | None
    lo: float
    hi: float
    full_scale: float
    tile: int
    halo: int
    out: str
    out_dtype: str
    tta: bool = False
    empty_threshold: float = 0.0
    fidelity: bool = False
    noise: dict[str, float] = field(default_factory=dict)
    batch: int = 4
    device: str = "cpu"
    precision: str = "float32"
    input_id: str = ""
    model_sha256: str = ""

    def to_json(self) -> str:
        """JSON text."""
        return json.dumps(asdict(self), sort_keys=True)

    # Where the work runs and where the output now lies do not change the work (a GPU job can be
    # finished on a CPU node; an interrupted output can be moved before it is resumed).
    _NOT_WORK = ("device", "out")

    def differences(self, other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Settings that differ from an existing output's job: ``{name: (then, now)}``."""
        a = asdict(self)
        return {k: (other.get(k), a[k]) for k in a if k not in self._NOT_WORK and a[k] != other.get(k)}

    def same_work(self, other: dict[str, Any]) -> bool:
        """Whether an existing output was made by the same job (so it can be resumed)."""
        return not self.differences(other)


# --------------------------------------------------------------------------- predictor
def _dihedral_t(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    if not inverse:
        if k >= 4:
            x = x.flip(-1)
        return torch.rot90(x, k % 4, dims=(-2, -1))
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


class Predictor:
    """A loaded model on a device, run on normalised ``(B, C, h, w)`` float32 batches."""

    def __init__(
        self,
        model: LoadedModel,
        device: str | torch.device = "cpu",
        tta: bool = False,
        precision: str = "float32",
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.net = model.net.to(self.device).eval()
        self.tta = tta
        self.precision = precision

    def _net(self, t: torch.Tensor) -> torch.Tensor:
        if self.precision == "float32":
            return self.net(t)
        with torch.autocast(self.device.type, dtype=getattr(torch, self.precision)):
            return self.net(t).float()

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Restore a batch; returns ``(mean, spread)`` (spread: std over TTA, or None)."""
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)
        if not self.tta:
            return self._net(t)[:, 0].float().cpu().numpy(), None
        outs = [_dihedral_t(self._net(_dihedral_t(t, k)), k, inverse=True)[:, 0] for k in range(8)]
        s = torch.stack(outs)
        return s.mean(0).float().cpu().numpy(), s.std(0).float().cpu().numpy()


# ------------------------------------------------------------------------- block I/O
def block_reads(shape: tuple[int, ...], job: Job, block: Block) -> list[tuple]:
    """The input regions a block reads: its plane (and neighbour frames), halo included."""
    y0, y1, x0, x1 = block.read
    if job.frames == 1 or job.context_axis is None:
        planes = [block.plane]
    else:
        ax = job.context_axis
        planes = []
        for t in frame_indices(block.plane[ax], shape[ax], job.frames):
            p = list(block.plane)
            p[ax] = t
            planes.append(tuple(p))
    return [(*p, slice(y0, y1), slice(x0, x1)) for p in planes]


def read_block(arr: Any, job: Job, block: Block) -> np.ndarray:
    """The block's input ``(frames, h, w)`` as float32 (neighbour frames edge-replicated)."""
    return np.stack([np.asarray(arr[idx], np.float32) for idx in block_reads(tuple(arr.shape), job, block)])


def _key(idx: tuple) -> tuple:
    return tuple((i.start, i.stop) if isinstance(i, slice) else i for i in idx)


class _Prefetch:
    """The input, with the next batch's regions read in a background thread.

    ``start(i)`` (before batch ``i`` runs) takes batch ``i``'s regions, read while batch ``i-1``
    computed, and starts reading batch ``i+1``: reading overlaps computing, at most one batch
    ahead (bounded memory), and the network sees exactly the same data (bit-identical output).
    """

    def __init__(self, arr: Any, job: Job, batches: list[list[Block]]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.arr, self.job, self.batches = arr, job, batches
        self.shape, self.dtype, self.ndim = tuple(arr.shape), arr.dtype, len(arr.shape)
        self._cache: dict[tuple, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pssr-prefetch")
        self._next = None

    def _read(self, i: int) -> dict[tuple, np.ndarray]:
        out = {}
        for b in self.batches[i]:
            for idx in block_reads(self.shape, self.job, b):
                out[_key(idx)] = np.asarray(self.arr[idx])
        return out

    def start(self, i: int) -> None:
        """Batch ``i`` is about to run."""
        self._cache = self._next.result() if self._next is not None else {}
        self._next = self._pool.submit(self._read, i + 1) if i + 1 < len(self.batches) else None

    def __getitem__(self, idx: tuple) -> np.ndarray:
        hit = self._cache.pop(_key(idx), None)
        return hit if hit is not None else self.arr[idx]

    def close(self) -> None:
        """Stop reading ahead."""
        self._pool.shutdown(wait=True, cancel_futures=True)


_cast = pyramid.cast


def _raise_nonfinite(raw: np.ndarray, job: Job, block: Block, shape: tuple[int, ...]) -> None:
    """Name the first NaN/inf input pixel of a block (every block is checked as it is read)."""
    f, y, x = (int(v) for v in np.argwhere(~np.isfinite(raw))[0])
    y0, _, x0, _ = block.read
    plane = list(block.plane)
    if job.context_axis is not None and job.frames > 1:
        ax = job.context_axis  # the neighbour frame that holds it
        plane[ax] = frame_indices(block.plane[ax], shape[ax], job.frames)[f]
    where = ", ".join(f"{a}={v}" for a, v in zip(job.input_axes[:-2], plane, strict=True))
    raise PredictError(
        f"input contains NaN or infinite values ({float(raw[f, y, x])} at {where + ', ' if where else ''}"
        f"y={y0 + y}, x={x0 + x}); replace them first (e.g. np.nan_to_num), nothing was written "
        "for this block."
    )


def _degrade(y_hr: np.ndarray, cfg: CrappifierConfig) -> np.ndarray:
    """The deterministic part of the acquisition model (blur + undersampling)."""
    p = cfg.full_params()
    if cfg.kind == "em":
        return undersample(y_hr, cfg.scale, mode=p["mode"], blur_sigma=p["probe_sigma"])
    if cfg.kind == "fluo":
        return undersample(y_hr, cfg.scale, mode=p["mode"], blur_sigma=p["psf_sigma"])
    return undersample(y_hr, cfg.scale, mode="linear")


def process_blocks(arr: Any, predictor: Predictor, job: Job, blocks: list[Block]) -> list[dict[str, Any]]:
    """Restore blocks of identical read shape in one forward pass.

    Returns one dict per block: ``out`` (HR core in ``job.out_dtype``), optional
    ``fidelity`` (LR core, z-scores) and ``uncertainty`` (HR core), and ``stats``.
    """
    s = job.scale
    rng_ = job.hi - job.lo
    xs, ins = [], []
    for b in blocks:
        raw = read_block(arr, job, b)
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            _raise_nonfinite(raw, job, b, tuple(arr.shape))
        xs.append((raw - job.lo) / rng_)
        ins.append(digest(raw))  # what this block was computed from (checked on resume)
    results: list[dict[str, Any] | None] = [None] * len(blocks)
    run_idx = []
    for i, (b, x) in enumerate(zip(blocks, xs, strict=True)):
        cy, cx = b.crop()
        core = x[job.frames // 2, cy, cx]
        if job.empty_threshold > 0 and float(np.ptp(core)) <= job.empty_threshold:
            val = float(core.mean()) * rng_ + job.lo
            h, w = core.shape
            res: dict[str, Any] = {
                "out": _cast(np.full((h * s, w * s), val, np.float32), job.out_dtype),
                "stats": {"empty": True, "input": ins[i]},
            }
            if job.fidelity:
                res["fidelity"] = np.zeros((h, w), np.float32)
                res["stats"].update({"frac_3sigma": 0.0, "max_abs_z": 0.0})
            if job.tta:
                res["uncertainty"] = np.zeros((h * s, w * s), np.float32)
            results[i] = res
        else:
            run_idx.append(i)
    if run_idx:
        batch = np.stack([xs[i] for i in run_idx])
        ys, spread = predictor(batch)
        for j, i in enumerate(run_idx):
            b = blocks[i]
            cy, cx = b.crop()
            hy, hx = slice(cy.start * s, cy.stop * s), slice(cx.start * s, cx.stop * s)
            y_full = ys[j] * rng_ + job.lo
            res = {"out": _cast(y_full[hy, hx], job.out_dtype), "stats": {"empty": False, "input": ins[i]}}
            if job.tta and spread is not None:
                res["uncertainty"] = (spread[j][hy, hx] * rng_).astype(np.float32)
            if job.fidelity:
                lr_in = xs[i][job.frames // 2] * rng_ + job.lo
                z = fidelity_z(y_full, lr_in, job.noise, job.full_scale)[cy, cx]
                res["fidelity"] = z
                res["stats"].update(
                    {"frac_3sigma": float(np.mean(np.abs(z) > 3)), "max_abs_z": float(np.abs(z).max())}
                )
            results[i] = res
    return results  # type: ignore[return-value]


def fidelity_map(
    restored: np.ndarray,
    lr: np.ndarray,
    crappifier: CrappifierConfig,
    *,
    full_scale: float,
    noise: dict[str, float] | None = None,
) -> np.ndarray:
    """Fidelity z-map of an existing 2D restoration against its measured input.

    ``noise`` = ``{"gain": g, "sigma": s}`` (fractions of ``full_scale``); by default the
    crappifier's own noise model.  See :func:`fidelity_z`.
    """
    return fidelity_z(
        np.asarray(restored, np.float32),
        np.asarray(lr, np.float32),
        {"crappifier": crappifier.to_dict(), **(noise or {})},
        float(full_scale),
    )


def fidelity_z(y_hr: np.ndarray, lr: np.ndarray, noise: dict[str, Any], full_scale: float) -> np.ndarray:
    """z-score of the measured LR against the re-degraded restoration.

    ``(lr - D(y)) / sigma(D(y))`` with ``D`` the blur + undersampling of the acquisition
    model and ``sigma`` the expected noise at that intensity, averaged over
    ``FIDELITY_WINDOW``-pixel squares and rescaled so that a faithful restoration gives
    a standard normal map (about 0.27 % of pixels beyond 3).  ``noise`` holds the
    ``crappifier`` dict and optionally a fitted ``gain``/``sigma`` (fractions of ``full_scale``).
    """
    cfg = CrappifierConfig.from_dict(noise["crappifier"])
    d = _degrade(y_hr, cfg)[: lr.shape[0], : lr.shape[1]]
    if "gain" in noise:
        m = np.clip(d / full_scale, 0, None)
        var = (noise["gain"] * m + noise["sigma"] ** 2) * full_scale**2
    else:
        var = lr_noise_variance(cfg, d, full_scale)
    var = np.maximum(var, (1e-3 * full_scale) ** 2)
    z = (lr[: d.shape[0], : d.shape[1]] - d) / np.sqrt(var)
    # Pool over 3x3 input pixels and rescale to unit variance: invented structure spans
    # several pixels, pixel noise does not, so this is 3x more sensitive than single
    # pixels while a faithful restoration still gives z ~ N(0, 1).
    k = FIDELITY_WINDOW
    return (ndimage.uniform_filter(z, k, mode="reflect") * k).astype(np.float32)


# ------------------------------------------------------------------------ output store
def _done_dir(out: str) -> Path:
    return Path(out) / DONE_DIR


def mark_done(out: str, block: Block, stats: dict[str, Any]) -> None:
    """Record a block as done (after its chunk write returned)."""
    d = _done_dir(out)
    tmp = d / f".{block.key}.tmp"
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, d / block.key)


def done_blocks(out: str) -> dict[str, dict[str, Any]]:
    """Blocks recorded as done, with their stats."""
    d = _done_dir(out)
    if not d.is_dir():
        return {}
    res = {}
    for f in d.iterdir():
        if f.name.startswith("."):
            continue
        try:
            rec = json.loads(f.read_text() or "{}")
        except (OSError, json.JSONDecodeError):  # a marker cut by a crash: redo that block
            continue
        if isinstance(rec, dict):
            res[f.name] = rec
    return res


def write_block(out_group: zarr.Group, job: Job, block: Block, res: dict[str, Any]) -> None:
    """Write a block's results into its chunks, then mark it done with their checksums."""
    out_group[OUT_ARRAY][block.out_slices(job.scale)] = res["out"]
    parts = {OUT_ARRAY: res["out"]}
    if "fidelity" in res:
        out_group[FID_ARRAY][block.lr_slices()] = res["fidelity"]
        parts[FID_ARRAY] = res["fidelity"]
    if "uncertainty" in res:
        out_group[UNC_ARRAY][block.out_slices(job.scale)] = res["uncertainty"]
        parts[UNC_ARRAY] = res["uncertainty"]
    mark_done(job.out, block, {**res["stats"], "digest": {k: digest(v) for k, v in parts.items()}})


def block_regions(job: Job, block: Block) -> dict[str, tuple[slice, ...]]:
    """Where a block's data lies in each array of the work store."""
    reg = {OUT_ARRAY: block.out_slices(job.scale)}
    if job.fidelity:
        reg[FID_ARRAY] = block.lr_slices()
    if job.tta:
        reg[UNC_ARRAY] = block.out_slices(job.scale)
    return reg


def check_block(arrays: dict[str, Any], job: Job, block: Block, record: dict[str, Any]) -> str | None:
    """Why a block recorded as done is not intact in ``arrays`` (unreadable, checksum differs), or None."""
    want = record.get("digest")
    if not isinstance(want, dict):
        return "its done marker has no checksum"
    for name, region in block_regions(job, block).items():
        if name not in arrays:
            continue
        try:
            got = digest(np.asarray(arrays[name][region]))
        except Exception as e:  # a truncated or corrupt chunk fails to decode
            msg = str(e).splitlines()[0] if str(e) else ""
            return f"its {name} chunk cannot be read ({type(e).__name__}: {msg})"
        if got != want.get(name):
            return f"its {name} data does not match the checksum recorded when it was written"
    return None


def verified_done(
    group: zarr.Group, job: Job, blocks: list[Block], done: dict[str, Any], arr: Any = None
) -> dict[str, Any]:
    """The done blocks whose chunks read back intact; the others are logged and will be redone.

    With ``arr`` (when resuming), each done block's input region is read again and compared with
    the checksum of what it was computed from: an input rewritten in place is redone, not mixed.
    """
    by_key = {b.key: b for b in blocks}
    good = {}
    for key, rec in done.items():
        b = by_key.get(key)
        why = None if b is None else check_block(group, job, b, rec)  # type: ignore[arg-type]
        if b is not None and why is None and arr is not None:
            if rec.get("input") != digest(read_block(arr, job, b)):
                why = "its input changed since it was restored (or its marker predates input checksums)"
        if b is not None and why is None:
            good[key] = rec
        elif b is not None:
            logger.warning("block %s will be redone: %s", b.where(), why)
            (_done_dir(job.out) / key).unlink(missing_ok=True)
    return good


def open_input(job: Job) -> Any:
    """The input as a lazily sliceable array (zarr) or an in-memory array (TIFF/PNG)."""
    if job.input_array:
        return zarr.open_array(job.input, path=job.input_array, mode="r")
    return io.read_image(job.input, axes=job.input_axes).data


# ------------------------------------------------------------------------------ restore
@dataclass
class RestoreResult:
    """What a restoration produced."""

    output: Any
    axes: str
    scale: dict[str, float]
    unit: str | None
    fidelity: Any = None
    uncertainty: Any = None
    summary: dict[str, Any] = field(default_factory=dict)


DEFAULT_MEMORY = 2e9  # bytes for one batch of blocks in the network (per process / dask worker)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_memory(memory: float | str | None) -> float:
    """Bytes from ``2e9``, ``"2GB"``, ``"512MiB"`` (None: the default, 2 GB)."""
    if memory is None:
        return DEFAULT_MEMORY
    if isinstance(memory, int | float) and not isinstance(memory, bool):
        value = float(memory)
    else:
        import re

        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(memory).lower())
        if not m:
            raise PredictError(f"memory={memory!r} is not a size; give bytes or e.g. '2GB', '512MiB'.")
        value = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if not value >= 64e6:
        raise PredictError(f"memory={memory!r} is below the 64 MB that one batch of the smallest tile needs.")
    return value


def _available_memory() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency
        return 4e9


def _bytes_per_lr_px(model: LoadedModel) -> float:
    widths = model.config.widths if model.config.arch == "srunet" else (256,) * 4
    return 4.0 * (8 * widths[0] + 3 * 16 * model.scale**2 + 2 * model.frames)


def _infer_axes(shape: tuple[int, ...], axes: str | None) -> str:
    if axes:
        axes = axes.upper()
        if (
            len(axes) != len(shape)
            or not axes.endswith("YX")
            or not set(axes) <= set("TZYX")
            or len(set(axes)) != len(axes)
        ):
            raise PredictError(
                f"axes={axes!r} does not fit data of shape {shape}: one letter per dimension "
                "from TZYX, each at most once, ending in YX."
            )
        return axes
    default = io._guess_axes(len(shape))
    if not default:
        raise PredictError(
            f"data of shape {shape} has {len(shape)} dimensions; pssr restores 2D images, 3D "
            "stacks/timelapses and TZYX volumes. Select a channel or position first."
        )
    return default


def _context_axis(axes: str, frames: int) -> int | None:
    if frames == 1:
        return None
    lead = axes[:-2]
    if "T" in lead:
        return lead.index("T")
    if "Z" in lead:
        return lead.index("Z")
    raise PredictError(
        f"the model takes {frames} frames (t-k..t+k) but the input (axes {axes}) has no time or "
        "z axis; give a timelapse/stack, or use a single-frame model."
    )


def _validate_data(shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype.kind not in "uifb":
        raise PredictError(f"input dtype {dtype} is not numeric; give a grayscale uint8/uint16/float image.")
    h, w = shape[-2:]
    if h < 2 or w < 2:
        raise PredictError(f"input of {h}x{w} pixels is too small to restore (needs at least 2x2).")


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
    memory: float | str | None = None,
    batch: int = 4,
    progress: bool = True,
    callback=None,
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
    callback : callable, optional
        ``callback(done, total)`` after each block; returning ``False`` cancels (the
        partial output is removed unless it is a resumable OME-Zarr file output).

    Returns
    -------
    RestoreResult
    """
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    budget = parse_memory(memory)
    logger.info("device: %s, precision: %s", describe(device), precision)
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    model_path = lm.path or str(resolve_model(model))  # type: ignore[arg-type]
    in_memory_input = not isinstance(data, str | os.PathLike)
    staged: Path | None = None
    out_path = Path(output) if output is not None else None
    if out_path is not None:
        name = out_path.name.lower()
        if not name.endswith(io.TIFF_EXT + io.ZARR_EXT):
            raise PredictError(f"output {str(out_path)!r} must end in .tif/.tiff or .zarr / .ome.zarr.")

    # ---- input
    if in_memory_input:
        arr = data
        in_axes = _infer_axes(tuple(arr.shape), axes)
        in_scale: dict[str, float] = {}
        unit = None
        in_path, in_array = None, None
    else:
        img = io.read_image(data, axes=axes)
        arr, in_axes, in_scale, unit = img.data, img.axes, img.scale, img.unit
        if "C" in in_axes:
            raise PredictError(
                f"input has a channel axis (axes {in_axes}, shape {tuple(arr.shape)}); restore one channel "
                "at a time, or pass --axes (e.g. ZYX or TYX) if that axis is really a stack or a timelapse."
            )
        in_axes = _infer_axes(tuple(arr.shape), in_axes)
        in_path = str(Path(data).resolve())
        in_array = None
        if isinstance(arr, zarr.Array):
            # Store root and array path inside it (e.g. "s0" of an OME-Zarr group).
            in_path, in_array = str(Path(data).resolve()), arr.path or None
    shape = tuple(int(n) for n in arr.shape)
    _validate_data(shape, np.dtype(arr.dtype))
    ctx = _context_axis(in_axes, lm.frames)

    # ---- normalisation and noise (from a strided sample, never the whole volume)
    sample = _strided_sample(arr if len(shape) != 4 else _Flat4(arr))
    if not np.all(np.isfinite(sample)):
        raise PredictError("input contains NaN or infinite values; replace them first (e.g. np.nan_to_num).")
    lo, hi = percentile_norm(sample, lm.normalization)
    fs = float(np.iinfo(arr.dtype).max) if np.dtype(arr.dtype).kind in "ui" else full_scale_of(sample)
    noise_spec = _noise_spec(fidelity, noise, lm, arr, shape)

    out_dtype = np.dtype(arr.dtype).name if dtype == "input" else dtype
    if out_dtype not in ("uint8", "uint16", "float32", "float64", "int16", "int32"):
        out_dtype = "float32"
    halo = lm.halo
    m = lm.config.multiple
    # ---- work store: the output zarr itself, a hidden work zarr beside a TIFF, or a temp dir
    final_zarr = out_path is not None and out_path.name.lower().endswith(io.ZARR_EXT)
    if out_path is None:
        work = None
    elif final_zarr:
        work = out_path.resolve()
    else:
        work = out_path.resolve().with_name(f".{out_path.name}.pssr-work.zarr")
    if out_path is not None:
        # Never write into, over or around the input (an OME-Zarr's s0, a napari layer's store).
        sources = [in_path] if not in_memory_input else [str(p) for p in zarr_sources(data)]
        check_distinct(sources, [out_path, work, *_side_files(out_path, fidelity=fidelity, tta=tta)])
    if tile is None:
        # Resuming: keep the stored plan (the free memory the default tile comes from changes).
        # A fresh run: the largest tile whose batch fits the memory budget (and half of what is free).
        avail = min(budget, 0.5 * _available_memory())
        tile = _stored_tile(work) or choose_tile(
            avail, _bytes_per_lr_px(lm), halo, m, batch=batch, fraction=1.0
        )
    if tile < m or tile % m:
        raise PredictError(f"tile={tile} must be a positive multiple of {m} for this model.")
    if work is None:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="pssr-restore-")) / "work.zarr"

    if in_memory_input and (workers or scheduler):
        staged = work.with_name(work.name + ".input.zarr")
        _stage(arr, staged)
        in_path, in_array = str(staged), None
        arr = zarr.open_array(str(staged), mode="r")
    if in_path is None:
        in_path = "<memory>"

    job = Job(
        input=in_path,
        input_axes=in_axes,
        input_array=in_array,
        model=str(model_path),
        scale=lm.scale,
        frames=lm.frames,
        context_axis=ctx,
        lo=lo,
        hi=hi,
        full_scale=fs,
        tile=int(tile),
        halo=int(halo),
        out=str(work),
        out_dtype=out_dtype,
        tta=tta,
        empty_threshold=float(empty_threshold),
        fidelity=fidelity,
        noise=noise_spec,
        batch=batch,
        device=device,
        precision=precision,
        input_id=_input_id(data, in_path, in_array),
        model_sha256=_file_sha256(lm.path),
    )
    run = _Run(arr, lm, job, shape, in_axes, in_scale, unit, out_path, staged, device, workers, scheduler)
    if out_path is None:
        return run.in_memory(progress, callback)
    _check_parent(out_path)
    with OutputLock(out_path):
        side = _side_files(out_path, fidelity=fidelity, tta=tta)
        with contextlib.ExitStack() as locks:
            for p in side:  # side files are outputs too: one writer each
                locks.enter_context(OutputLock(p))
            _prepare_output(out_path, work, job, shape, overwrite=overwrite, resume=resume, side=side)
            return run.to_file(progress, callback)


def _input_id(data: Any, in_path: str | None, in_array: str | None) -> str:
    """What identifies the input's content for resuming.

    Size and mtime of its file (of the zarr array's metadata), or the checksum of an in-memory
    numpy array.
    """
    if isinstance(data, np.ndarray):
        return "blake2b:" + digest(data)
    if hasattr(data, "dask") and hasattr(data, "name"):
        return "dask:" + str(data.name)  # dask's deterministic token of the graph (content for numpy)
    if in_path is None or in_path == "<memory>":
        return ""
    p = Path(in_path) / (in_array or "")
    p = p / "zarr.json" if p.is_dir() else p
    try:
        st = p.stat()
    except OSError:
        return ""
    return f"{p.name}:{st.st_size}:{st.st_mtime_ns}"


def _file_sha256(path: str | None) -> str:
    if not path or not Path(path).is_file():
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _side_files(out: Path, *, fidelity: bool, tta: bool) -> list[Path]:
    """The files a TIFF output writes beside itself (OME-Zarr outputs keep them inside)."""
    if out.name.lower().endswith(io.ZARR_EXT):
        return []
    side = []
    if fidelity:
        side += [out.with_name(_stem(out) + ".fidelity.tif"), out.with_name(_stem(out) + ".fidelity.json")]
    if tta:
        side.append(out.with_name(_stem(out) + ".uncertainty.tif"))
    return side


def _stored_tile(work: Path | None) -> int | None:
    """The tile of an interrupted run at ``work`` (so "the same command" resumes), or None."""
    if work is None or not (work / "zarr.json").is_file():
        return None
    try:
        attrs = dict(zarr.open_group(str(work), mode="r").attrs).get("pssr", {})
    except Exception:  # not a pssr output: _prepare_output reports it
        return None
    if not isinstance(attrs, dict) or attrs.get("status") != "running":
        return None
    tile = (attrs.get("job") or {}).get("tile")
    return int(tile) if isinstance(tile, int) and tile > 0 else None


@dataclass
class _Run:
    """One restoration: execute the pending blocks, check them, finish the output."""

    arr: Any
    lm: LoadedModel
    job: Job
    shape: tuple[int, ...]
    axes: str
    in_scale: dict[str, float]
    unit: str | None
    out_path: Path | None
    staged: Path | None
    device: str
    workers: int | None
    scheduler: str | None

    @property
    def work(self) -> Path:
        return Path(self.job.out)

    @property
    def out_scale(self) -> dict[str, float]:
        return {a: (v / self.lm.scale if a in "XY" else v) for a, v in self.in_scale.items()}

    def execute(self, progress: bool, callback) -> dict[str, Any]:
        """Run every block not done and intact; returns the done records and timing summary."""
        job = self.job
        group = zarr.open_group(job.out, mode="r+")
        blocks = plan_blocks(self.shape, job.tile, job.halo, self.lm.config.multiple)
        t0 = time.monotonic()
        done = done_blocks(job.out)
        if done:  # resuming: done blocks must read back intact and come from the same input
            done = verified_done(group, job, blocks, done, arr=self.arr)
            logger.info("resuming: %d of %d blocks already done and intact", len(done), len(blocks))
        for _ in range(2):  # a block that does not read back intact after the run is redone once
            pending = [g for g in group_blocks(blocks, job.batch) if any(b.key not in done for b in g)]
            if not pending:
                break
            cancelled = _execute(
                self.arr, self.lm, job, pending, set(done), group, len(blocks), self.device,
                progress, callback, self.workers, self.scheduler,
            )  # fmt: skip
            if cancelled:
                raise InterruptedError("restoration cancelled; nothing was written as complete.")
            done = verified_done(group, job, blocks, done_blocks(job.out))
        missing = [b for b in blocks if b.key not in done]
        if missing:
            raise PredictError(
                f"{len(missing)} of {len(blocks)} blocks did not finish intact (e.g. {missing[0].where()}); "
                "the output is incomplete. Run the same command again to resume."
            )
        return {"done": done, "blocks": blocks, "summary": _summary(done, blocks, job, time.monotonic() - t0)}

    def in_memory(self, progress: bool, callback) -> RestoreResult:
        """Restore into a temporary store and return numpy arrays."""
        _create_store(self.work, self.job, self.shape)
        try:
            res = self.execute(progress, callback)
            g = zarr.open_group(self.job.out, mode="r")
            return RestoreResult(
                np.asarray(g[OUT_ARRAY][...]),
                self.axes,
                self.out_scale,
                self.unit,
                np.asarray(g[FID_ARRAY][...]) if self.job.fidelity else None,
                np.asarray(g[UNC_ARRAY][...]) if self.job.tta else None,
                res["summary"],
            )
        finally:
            shutil.rmtree(self.work.parent, ignore_errors=True)
            if self.staged:
                shutil.rmtree(self.staged, ignore_errors=True)

    def to_file(self, progress: bool, callback) -> RestoreResult:
        """Restore into the output's store; on failure say what was kept and how to go on."""
        try:
            res = self.execute(progress, callback)
            if self.out_path is not None and self.out_path.name.lower().endswith(io.ZARR_EXT):
                return self._finish_zarr(res)
            return self._finish_tiff(res)
        except BaseException as e:
            self._after_failure(e)
            raise
        finally:
            if self.staged:
                shutil.rmtree(self.staged, ignore_errors=True)

    def _after_failure(self, e: BaseException) -> None:
        work, final_zarr = (
            self.work,
            self.out_path is not None and self.out_path.name.lower().endswith(io.ZARR_EXT),
        )
        n_done = len(done_blocks(str(work))) if work.exists() else 0
        if isinstance(e, InterruptedError) and not final_zarr or (n_done == 0 and not final_zarr):
            shutil.rmtree(work, ignore_errors=True)  # nothing worth keeping
            return
        if not work.exists() or not hasattr(e, "add_note"):
            return
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            e.add_note(
                f"the disk holding {str(work.parent)!r} is full: free space there (or choose another output)."
            )
        if final_zarr:
            e.add_note(
                f"the output {str(work)!r} is incomplete ({n_done} blocks done, marked running); run the "
                "same command again to resume, or pass --overwrite to start over."
            )
        else:
            e.add_note(
                f"partial work ({n_done} blocks) is kept in {str(work)!r}; run the same command again to "
                "resume, or delete that folder to free its space."
            )

    def _finish_zarr(self, res: dict[str, Any]) -> RestoreResult:
        from pssr.verify import verify_output

        _finalize_zarr(self.work, self.job, self.axes, self.in_scale, self.unit, res["summary"], res["done"])
        # The same check `pssr verify` runs, before the output may call itself complete.
        verify_output(self.work, progress=False, allow_running=True)
        _mark_complete(self.work)
        g = zarr.open_group(str(self.work), mode="r")
        fid = g[FID_ARRAY] if self.job.fidelity else None
        unc = g[UNC_ARRAY] if self.job.tta else None
        return RestoreResult(g[OUT_ARRAY], self.axes, self.out_scale, self.unit, fid, unc, res["summary"])

    def _finish_tiff(self, res: dict[str, Any]) -> RestoreResult:
        """Stream the checked work arrays into atomic TIFFs, compare them back, drop the work store."""
        out, job, group = self.out_path, self.job, zarr.open_group(self.job.out, mode="r")
        assert out is not None
        targets = [(out, OUT_ARRAY, self.out_scale)]
        if job.fidelity:
            targets.append((out.with_name(_stem(out) + ".fidelity.tif"), FID_ARRAY, self.in_scale))
        if job.tta:
            targets.append((out.with_name(_stem(out) + ".uncertainty.tif"), UNC_ARRAY, self.out_scale))
        for path, _, _ in targets:
            # A run killed while writing leaves hidden partial files; we hold the lock, so they are stale.
            for stale in path.parent.glob(f".{path.name}.*.partial"):
                stale.unlink(missing_ok=True)
        for path, name, scale in targets:
            io.write_tiff(path, group[name], axes=self.axes, scale=scale, unit=self.unit, overwrite=True)
            _compare_tiff(path, group[name], job, res["blocks"], res["done"], name)
        summary = res["summary"]
        if job.fidelity:
            sp = out.with_name(_stem(out) + ".fidelity.json")
            sp.write_text(json.dumps(summary, indent=2))
        shutil.rmtree(self.work, ignore_errors=True)
        extras = {name: str(p) for p, name, _ in targets}
        return RestoreResult(
            str(out),
            self.axes,
            self.out_scale,
            self.unit,
            extras.get(FID_ARRAY),
            extras.get(UNC_ARRAY),
            summary,
        )


def _compare_tiff(
    path: Path, src: Any, job: Job, blocks: list[Block], done: dict[str, Any], name: str
) -> None:
    """Read a written TIFF back plane by plane and compare it with the (checksum-verified) blocks.

    ImageJ TIFFs hold uint8, uint16 or float32: other dtypes are compared after the same
    conversion the writer made.
    """
    import tifffile

    lead = src.shape[:-2]
    by_plane: dict[tuple[int, ...], list[Block]] = {}
    for b in blocks:
        by_plane.setdefault(b.plane, []).append(b)
    with tifffile.TiffFile(path) as tif:
        for i, idx in enumerate(np.ndindex(*lead)):
            plane = tif.pages[i].asarray().reshape(src.shape[-2:])
            same_dtype = plane.dtype == src.dtype
            ref = None if same_dtype else np.asarray(src[idx] if lead else src[...]).astype(plane.dtype)
            for b in by_plane.get(tuple(idx), []):
                region = block_regions(job, b)[name][-2:]
                ok = (
                    digest(plane[region]) == done[b.key]["digest"].get(name)
                    if same_dtype
                    else np.array_equal(plane[region], ref[region], equal_nan=True)
                )
                if not ok:
                    path.unlink(missing_ok=True)
                    raise IntegrityError(
                        f"the written TIFF {str(path)!r} differs from the restored data at {b.where()}; "
                        "it was removed. Run the same command again (the restored blocks are kept)."
                    )


def _stem(p: Path) -> str:
    n = p.name
    for ext in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if n.lower().endswith(ext):
            return n[: -len(ext)]
    return p.stem


class _Flat4:
    """View a TZYX array as (T*Z, Y, X) for sampling."""

    def __init__(self, a: Any) -> None:
        self.a = a
        self.shape = (a.shape[0] * a.shape[1], *a.shape[2:])
        self.ndim = 3

    def __getitem__(self, idx: Any) -> np.ndarray:
        if idx is Ellipsis:
            return np.asarray(self.a[...]).reshape(self.shape)
        p, rest = idx[0], idx[1:]
        n = self.a.shape[1]
        planes = range(*p.indices(self.shape[0])) if isinstance(p, slice) else [p]
        return np.stack([np.asarray(self.a[(q // n, q % n, *rest)]) for q in planes])


def _stage(arr: Any, dst: Path) -> None:
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


def _noise_spec(fidelity: bool, noise: Any, lm: LoadedModel, arr: Any, shape) -> dict[str, Any]:
    if not fidelity:
        return {}
    cfg = lm.crappifier
    if cfg is None:
        raise PredictError(
            "fidelity needs the model's acquisition model (crappifier), and this model has none "
            "(it was trained on real pairs). Retrain with --preset, or pass noise={'gain': g, "
            "'sigma': s} together with a model that records its degradation."
        )
    spec: dict[str, Any] = {"crappifier": cfg.to_dict()}
    if isinstance(noise, dict):
        spec.update({"gain": float(noise["gain"]), "sigma": float(noise["sigma"])})
    elif noise == "fit":
        from pssr.crappify import estimate_noise

        plane = np.asarray(arr[(0,) * (len(shape) - 2)], np.float32)
        try:
            fit = estimate_noise(
                plane, full_scale=float(np.iinfo(arr.dtype).max) if np.dtype(arr.dtype).kind in "ui" else None
            )
            spec.update({"gain": fit["gain"], "sigma": fit["sigma"], "source": "fit"})
        except ValueError as e:
            logger.warning("noise fit failed (%s); using the model's crappifier noise", e)
            spec["source"] = "model"
    elif noise == "model":
        spec["source"] = "model"
    else:
        raise PredictError(f"noise={noise!r} must be 'fit', 'model' or a dict with gain and sigma.")
    return spec


def _create_store(work: Path, job: Job, shape: tuple[int, ...]) -> None:
    s = job.scale
    lead = shape[:-2]
    h, w = shape[-2:]
    hr_shape = (*lead, h * s, w * s)
    ck_hr = (*(1 for _ in lead), job.tile * s, job.tile * s)
    ck_lr = (*(1 for _ in lead), job.tile, job.tile)
    g = zarr.open_group(str(work), mode="w")
    arrays = [(OUT_ARRAY, hr_shape, ck_hr, job.out_dtype)]
    if job.fidelity:
        arrays.append((FID_ARRAY, shape, ck_lr, "float32"))
    if job.tta:
        arrays.append((UNC_ARRAY, hr_shape, ck_hr, "float32"))
    for name, shp, ck, dt in arrays:
        # One chunk per block: every block writes its own chunk, never another's.
        chunks = tuple(min(c, n) for c, n in zip(ck, shp, strict=True))
        dims = list(job.input_axes.lower())
        g.create_array(name, shape=shp, chunks=chunks, dtype=dt, fill_value=0, dimension_names=dims)
    g.attrs["pssr"] = {"status": "running", "job": json.loads(job.to_json())}
    _done_dir(str(work)).mkdir(exist_ok=True)


def _check_parent(out: Path) -> None:
    parent = out.resolve().parent
    if not parent.is_dir():
        raise PredictError(f"output folder {str(parent)!r} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise PredictError(f"output folder {str(parent)!r} is not writable; choose another output.")


def _prepare_output(
    out: Path, work: Path, job: Job, shape, *, overwrite: bool, resume: bool, side: list[Path]
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
    hidden = work != out  # the work store of a TIFF output, ours to manage
    if status == "running" and isinstance(old_job, dict) and not overwrite:
        diff = job.differences(old_job)
        if not diff:
            _check_store(work, job)
            # Same command again: continue. A TIFF already in place came from a finish that was cut
            # short (its side files may be missing): it is written again from the checked blocks.
            g = zarr.open_group(str(work), mode="r+")
            g.attrs["pssr"] = {**dict(g.attrs["pssr"]), "job": json.loads(job.to_json())}
            return
        what = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in sorted(diff.items()))
        raise PredictError(
            f"cannot resume {str(out)!r}: the interrupted run there used other settings or inputs "
            f"({what}). Run it with the same settings, or pass --overwrite to start over."
        )
    existing = [p for p in (out, *side) if p.exists()]
    if work.exists() and hidden and status is None:
        shutil.rmtree(work, ignore_errors=True)  # a work store cut short while being created
    elif work.exists() and hidden:
        existing.append(work)
    if existing and not overwrite:
        done = " and is complete" if status == "complete" else ""
        raise PredictError(
            f"{str(existing[0])!r} already exists{done}; pass --overwrite to replace "
            + ("it." if len(existing) == 1 else f"it and {', '.join(repr(str(p)) for p in existing[1:])}.")
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if resume:
        logger.info("nothing to resume at %s; starting a new run", out)
    try:
        _create_store(work, job, shape)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # never a half-created store left behind
        raise


def _check_store(work: Path, job: Job) -> None:
    """An interrupted store must still have its arrays; otherwise say how to start over."""
    g = zarr.open_group(str(work), mode="r")
    want = [OUT_ARRAY] + ([FID_ARRAY] if job.fidelity else []) + ([UNC_ARRAY] if job.tta else [])
    missing = [n for n in want if n not in g]
    if missing:
        raise PredictError(
            f"the interrupted output {str(work)!r} is damaged (array {missing[0]!r} is missing) and "
            "cannot be resumed; pass --overwrite to start over."
        )
    _done_dir(str(work)).mkdir(exist_ok=True)


def _summary(
    done: dict[str, dict[str, Any]], blocks: list[Block], job: Job, elapsed: float
) -> dict[str, Any]:
    n_empty = sum(1 for b in blocks if done.get(b.key, {}).get("empty"))
    summ: dict[str, Any] = {
        "blocks": len(blocks),
        "empty_blocks": n_empty,
        "seconds": round(elapsed, 2),
        "device": job.device,
        "precision": job.precision,
    }
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


CHECKSUMS = "pssr_checksums"


def _finalize_zarr(
    work: Path,
    job: Job,
    axes: str,
    in_scale: dict[str, float],
    unit: str | None,
    summary: dict[str, Any],
    done: dict[str, dict[str, Any]],
) -> None:
    """Pyramid levels from s0 (one task per target chunk), NGFF metadata, checksums, status complete."""
    from ome_zarr.writer import write_multiscales_metadata

    g = zarr.open_group(str(work), mode="r+")
    s = job.scale
    base = g[OUT_ARRAY]
    hr_px = {a: (in_scale.get(a, 1.0) / s if a in "XY" else in_scale.get(a, 1.0)) for a in axes}
    # Output pixel j is centred on input coordinate (j - (s-1)/2) / s: shift by -(s-1)/2 HR px.
    t0 = {a: (-(s - 1) / 2 * hr_px[a] if a in "XY" else 0.0) for a in axes}
    datasets = []
    below = base
    for k, shape in enumerate(pyramid.level_shapes(tuple(base.shape))):
        f = 2**k
        if k:
            arr = g.create_array(
                f"s{k}",
                shape=shape,
                dtype=base.dtype,
                chunks=tuple(min(c, n) for c, n in zip(base.chunks, shape, strict=True)),
                fill_value=0,
                dimension_names=list(axes.lower()),
                overwrite=True,
            )
            pyramid.write_level(below, arr)
            below = arr
        datasets.append(
            {
                "path": f"s{k}",
                "coordinateTransformations": [
                    {"type": "scale", "scale": [hr_px[a] * (f if a in "XY" else 1) for a in axes]},
                    {
                        "type": "translation",
                        "translation": [t0[a] + ((f - 1) / 2 * hr_px[a] if a in "XY" else 0.0) for a in axes],
                    },
                ],
            }
        )
    write_multiscales_metadata(
        g,
        datasets,
        axes=[_axis_meta(a, unit) for a in axes],
        name="pssr restoration",
    )
    # The per-block checksums stay with the output (``pssr verify`` checks them), as a zarr array
    # (blocks in plan order x arrays x 16 bytes) so that readers see nothing foreign in the group.
    names = [n for n in (OUT_ARRAY, FID_ARRAY, UNC_ARRAY) if n in g]
    blocks = plan_blocks(
        g[OUT_ARRAY].shape[:-2] + tuple(n // s for n in g[OUT_ARRAY].shape[-2:]), job.tile, job.halo
    )
    sums = np.zeros((len(blocks), len(names), 16), np.uint8)
    for i, b in enumerate(blocks):
        for j, n in enumerate(names):
            sums[i, j] = np.frombuffer(bytes.fromhex(done[b.key]["digest"][n]), np.uint8)
    ck = g.create_array(
        CHECKSUMS,
        shape=sums.shape,
        dtype="uint8",
        chunks=(min(len(blocks), 65536), len(names), 16),
        dimension_names=["block", "array", "byte"],
        overwrite=True,
    )
    ck[...] = sums
    ck.attrs["pssr"] = {"arrays": names, "digest": "blake2b-128 of each block's C-order bytes, plan order"}
    pssr_attrs = dict(g.attrs.get("pssr", {}))
    pssr_attrs.update({"summary": summary, "checksums": CHECKSUMS})
    g.attrs["pssr"] = pssr_attrs


def _mark_complete(work: Path) -> None:
    """The last step, after verification: status complete, done markers no longer needed."""
    g = zarr.open_group(str(work), mode="r+")
    g.attrs["pssr"] = {**dict(g.attrs.get("pssr", {})), "status": "complete"}
    shutil.rmtree(_done_dir(str(work)), ignore_errors=True)


def _axis_meta(a: str, unit: str | None) -> dict[str, str]:
    kind = {"T": "time", "C": "channel"}.get(a, "space")
    d = {"name": a.lower(), "type": kind}
    if unit and kind == "space":
        d["unit"] = unit
    return d


def run_group(arr, pred: Predictor, job: Job, blocks: list[Block], skip: set[str], group) -> list[dict]:
    """Restore one fixed batch of blocks; write (and mark) only those not in ``skip``."""
    results = process_blocks(arr, pred, job, blocks)
    stats = []
    for b, r in zip(blocks, results, strict=True):
        if b.key in skip:
            continue
        write_block(group, job, b, r)
        stats.append({"key": b.key, "voxels": int(r["out"].size), **r["stats"]})
    return stats


def _execute(
    arr, lm, job, pending, done, group, n_total, device, progress, callback, workers, scheduler
) -> bool:
    """Run the pending batches locally or on dask; True when cancelled."""
    if scheduler or workers:
        from pssr.distributed import run_distributed

        return run_distributed(
            job,
            pending,
            done,
            n_total=n_total,
            workers=workers,
            scheduler=scheduler,
            progress=progress,
            callback=callback,
        )
    return _run_local(arr, lm, job, pending, done, group, n_total, device, progress, callback)


def _run_local(
    arr,
    lm: LoadedModel,
    job: Job,
    pending: list[list[Block]],
    done: set[str],
    group,
    n_total: int,
    device: str,
    progress: bool,
    callback,
) -> bool:
    """Process the pending batches in this process; True when cancelled."""
    from tqdm.auto import tqdm

    pred = Predictor(lm, device=device, tta=job.tta, precision=job.precision)
    count = len(done)
    bar = tqdm(total=n_total, initial=count, disable=not progress, unit="block", desc="restore")
    vox, t0 = 0, time.monotonic()
    reader = _Prefetch(arr, job, pending)
    try:
        for i, blocks in enumerate(pending):
            reader.start(i)
            for st in run_group(reader, pred, job, blocks, done, group):
                count += 1
                vox += st["voxels"]
                bar.update(1)
                if callback is not None and callback(count, n_total) is False:
                    return True
            bar.set_postfix_str(f"{vox / max(time.monotonic() - t0, 1e-9) / 1e6:.2f} Mvox/s")
    finally:
        reader.close()
        bar.close()
    return False
