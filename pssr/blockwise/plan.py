"""The plan of a restoration: the :class:`Job` every worker gets, and what a block reads.

A job is plain JSON (no torch), so it travels to dask workers and is stored with an output to
decide whether a rerun resumes it.  :func:`block_reads` / :func:`read_block` say which input
regions a block is computed from (its halo and neighbour frames); :func:`input_digest` is their
checksum, recorded when the block is done and checked on resume.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import numpy as np

from pssr.blockwise.integrity import digest
from pssr.blockwise.tiling import (
    BORDER,
    BORDERS,
    Block,
    block_at,
    block_grid,
    border_padding,
    frame_indices,
    grid_box,
    plan_blocks,
)
from pssr.errors import PredictError
from pssr.util import chunk_grid, stored_chunks

__all__ = [
    "Job",
    "Mask",
    "WorkPlan",
    "block_padding",
    "block_reads",
    "input_digest",
    "pad_block",
    "padded_crop",
    "read_block",
    "work_blocks",
]


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
    # "torch" or "onnxruntime" (pssr.nn.onnx_backend); jobs written before the field existed read as torch.
    backend: str = "torch"
    # A mask restricting the work (--mask): its path and identity ("" for none).
    mask: str = ""
    # A region of the input ((start, stop) input pixels per axis, Y and X on the block grid): only
    # its blocks are restored, into an output of the region's size, or (full_output) into an
    # output of the input's size that other jobs fill region by region (pssr.blockwise.regions).
    region: list[list[int]] | None = None
    full_output: bool = False
    # --frames auto (pssr.blockwise.frames): {"fallback": single-frame model, "fallback_sha256",
    # "register": method, "threshold": disagreement above which a block falls back}; {} for off.
    frames_auto: dict[str, Any] = field(default_factory=dict)
    # What a block reads beyond the image's edges (:data:`pssr.blockwise.tiling.BORDERS`), by the
    # halo: numpy's / bioimage.io's padding mode.  Jobs written before the field existed read "zero"
    # (the network's own zero padding at the edge), so such an output is never resumed with another.
    border: str = BORDER

    def to_json(self) -> str:
        """JSON text."""
        return json.dumps(asdict(self), sort_keys=True)

    # Where and by what the work runs and where the output now lies do not change the work (a GPU
    # job can be finished on a CPU node, a torch run by ONNX Runtime: within 1e-6 of the output
    # range; an interrupted output can be moved before it is resumed).
    _NOT_WORK = ("device", "backend", "out")

    def differences(self, other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Settings that differ from an existing output's job: ``{name: (then, now)}``.

        A setting an older job does not record reads as its default (what that version did).
        """
        a = asdict(self)
        then = {f.name: other.get(f.name, _OLD.get(f.name, _default(f))) for f in fields(self)}
        skip = set(self._NOT_WORK)
        if self.full_output and then["full_output"]:
            skip.add("region")  # jobs filling one full-size output region by region do the same work
        diff = {k: (then[k], a[k]) for k in a if k not in skip and a[k] != then[k]}
        if "model" in diff and "model_sha256" not in diff and a.get("model_sha256"):
            # the same model file (by its sha256) under another path, e.g. a relative --model given from
            # another working directory: the same work
            del diff["model"]
        return diff

    def same_work(self, other: dict[str, Any]) -> bool:
        """Whether an existing output was made by the same job (so it can be resumed)."""
        return not self.differences(other)


# What a job written before a field existed did (where that differs from the field's default).
_OLD = {"border": "zero"}


def _default(f: Any) -> Any:
    """A dataclass field's default (None for a field without one)."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


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
    """The block's input ``(frames, h, w)`` as float32, as stored (its read region, inside the image).

    :func:`pad_block` then adds what the job's border rule puts beyond the image's edges.
    """
    return np.stack([np.asarray(arr[idx], np.float32) for idx in block_reads(tuple(arr.shape), job, block)])


def block_padding(job: Job, block: Block) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` pixels the job's border rule adds to a block's read."""
    return (0, 0, 0, 0) if job.border == "zero" else border_padding(block, job.halo)


def pad_block(raw: np.ndarray, job: Job, block: Block) -> np.ndarray:
    """A block's read ``(frames, h, w)`` with the job's border beyond the image's edges.

    A padding mode (``reflect``: the image mirrored, the edge pixel not repeated) extends every block
    to its core plus the halo on each side, so a block at an edge sees the padded image where the
    network would otherwise see its own zero padding; the whole image is then restored as the
    network restores the image padded by the halo, which a bioimage.io package declares (its
    ``pad`` and the halo) and bioimage.io consumers reproduce, whole or tiled.
    """
    top, bottom, left, right = block_padding(job, block)
    if not (top or bottom or left or right):
        return raw
    if job.border not in BORDERS:
        raise PredictError(f"border={job.border!r} must be one of {', '.join(BORDERS)}.")
    return np.pad(raw, ((0, 0), (top, bottom), (left, right)), mode=job.border)


def padded_crop(job: Job, block: Block) -> tuple[slice, slice]:
    """Slices of the block's core inside its padded read (:func:`pad_block`)."""
    cy, cx = block.crop()
    top, _, left, _ = block_padding(job, block)
    return slice(cy.start + top, cy.stop + top), slice(cx.start + left, cx.stop + left)


def input_digest(arr: Any, job: Job, block: Block) -> str:
    """Checksum of what a block is computed from (recorded when done, checked on resume)."""
    return digest(read_block(arr, job, block))


@dataclass
class WorkPlan:
    """The blocks a run restores (plan order) out of the ``total`` of the input's grid.

    The others are skipped: their input is entirely fill value (no stored chunk under their read
    region, halo and neighbour frames included) or the mask is 0 over them.  Skipped blocks are
    never listed: a declared (1000, 200000, 200000) volume with a few stored chunks is planned in
    milliseconds and a few kB.
    """

    blocks: list[Block]
    total: int

    @property
    def skipped(self) -> int:
        """Blocks not restored (missing input or masked out); their output chunks stay missing."""
        return self.total - len(self.blocks)


def _factors(m: int, n: int) -> tuple[int, int] | None:
    """The whole factors ``f`` (smallest, largest) to read a mask of ``m`` pixels for ``n`` input pixels by.

    ``m == floor(n / f)`` or ``ceil(n / f)``:
    ``floor(n / f) == m`` for ``f`` in ``n // (m + 1) + 1 .. n // m``; ``ceil(n / f) == m`` for ``f`` in
    ``ceil(n / m) .. ceil(n / (m - 1)) - 1`` (any ``f >= n`` for ``m == 1``, which is ``n``); the two
    ranges touch, so every factor between the two ends fits too.  Where several fit, ``n / m`` if
    whole, else the one power of two among them, else all of them (see :class:`Mask`).
    """
    lo1, hi1 = max(1, n // (m + 1) + 1), n // m
    lo2, hi2 = -(-n // m), (-(-n // (m - 1)) - 1 if m > 1 else n)
    ranges = [(a, b) for a, b in ((lo1, hi1), (lo2, hi2)) if a <= b]
    if not ranges:
        return None
    lo, hi = min(a for a, _ in ranges), max(b for _, b in ranges)
    if lo == hi:
        return lo, hi
    if n % m == 0:  # an exact downsample
        return n // m, n // m
    twos = [1 << k for k in range(hi.bit_length() + 1) if lo <= 1 << k <= hi]
    if len(twos) == 1:  # a pyramid level
        return twos[0], twos[0]
    return lo, hi


class Mask:
    """A mask (e.g. a tissue mask) at the input's resolution or a lower one, on the input's block grid.

    Its YX (and, for a mask with as many dimensions as the input, leading) axes are the input's
    downsampled by a whole factor ``f`` per axis, as a pyramid level is: ``m`` mask pixels for
    ``n`` input pixels with ``m = floor(n / f)`` or ``ceil(n / f)``, ``f`` being ``floor(n / m)``
    or else ``ceil(n / m)``.  Mask pixel ``i`` covers input pixels ``i*f .. (i+1)*f`` (the last one
    also the remainder).  Any other shape is refused: stretched by its shape ratio, the mask of
    another image would be applied silently wrong.  A block is kept when any mask pixel under its
    core is non-zero.

    Several factors can explain one shape (a 32-pixel mask of 2000 pixels: f = 61 to 64, the
    coarse levels of a pyramid).  Then the factor is ``n / m`` where that is whole (an exact
    downsample), else the one power of two among them where there is exactly one (pyramids halve),
    else the mask is read conservatively: a block is kept when a mask pixel under its core for *any*
    of them is non-zero, so no block of tissue is skipped whichever factor made the mask (at most
    blocks a few input pixels past a tissue border are restored too).  ``candidates`` holds the
    smallest and largest factor read per axis, ``factors`` the smallest.
    """

    def __init__(self, data: Any, shape: tuple[int, ...], where: str = "the mask") -> None:
        mshape = tuple(int(n) for n in data.shape)
        if len(mshape) not in (2, len(shape)):
            raise PredictError(
                f"{where} has shape {mshape}; for an input of shape {tuple(shape)} it must be 2D (one YX "
                f"mask for every plane) or have {len(shape)} dimensions, at the same or a lower resolution."
            )
        if any(m > n for m, n in zip(mshape[::-1], tuple(shape)[::-1], strict=False)) or min(mshape) < 1:
            raise PredictError(
                f"{where} has shape {mshape}, larger than the input {tuple(shape)} along some axis; give "
                "a mask at the input's resolution or lower (downsampled by a whole factor per axis)."
            )
        self.data, self.shape, self.input_shape = data, mshape, tuple(int(n) for n in shape)
        self.where = where
        self.factors: list[int] = []
        self.candidates: list[tuple[int, int]] = []  # per axis: the smallest and largest whole factor
        for k, (m, n) in enumerate(zip(mshape[::-1], self.input_shape[::-1], strict=False)):
            fs = _factors(m, n)
            f = fs[0] if fs else None
            if f is None:
                g = max(1, round(n / m))
                sizes = " or ".join(str(v) for v in sorted({n // g, -(-n // g)}))
                raise PredictError(
                    f"{where} has shape {mshape}: its {m} pixels along axis {len(mshape) - 1 - k} are not "
                    f"the input's {n} (shape {self.input_shape}) divided by a whole factor; a mask must be "
                    f"the input downsampled by an integer factor f per axis (a pyramid level: floor or ceil "
                    f"of {n}/f pixels, e.g. {sizes} for f={g}). Resample it to such a shape "
                    "(nearest neighbour), or give the mask that belongs to this input."
                )
            self.factors.insert(0, f)
            self.candidates.insert(0, fs)  # type: ignore[arg-type]

    def covers(self, block: Block) -> bool:
        """Whether the mask is non-zero anywhere under the block's core."""

        def span(a: int, b: int, f: tuple[int, int], m: int) -> slice:
            # the mask pixels under input pixels a..b for every candidate factor f[0]..f[1]: their hull
            start = min(a // f[1], m - 1)
            return slice(start, min(m, max(start + 1, -(-b // f[0]))))

        (fy, fx), (mh, mw) = self.candidates[-2:], self.shape[-2:]
        y0, y1, x0, x1 = block.core
        region = [span(y0, y1, fy, mh), span(x0, x1, fx, mw)]
        lead: list[Any] = []
        if len(self.shape) > 2:
            lead = [
                span(p, p + 1, f, m)
                for p, f, m in zip(block.plane, self.candidates[:-2], self.shape[:-2], strict=True)
            ]
        values = np.asarray(self.data[(*lead, *region)])
        if values.dtype.kind == "f" and np.isnan(values).any():
            raise PredictError(
                f"{self.where} holds NaN under the block at {block.where()}; a mask must be 0 (skip) or "
                "non-zero (restore) everywhere: replace NaN with 0 or 1 first (e.g. np.nan_to_num)."
            )
        return bool(np.any(values))


def work_blocks(
    arr: Any, job: Job, multiple: int = 1, mask: Mask | None = None, *, whole: bool = False
) -> WorkPlan:
    """The blocks to restore: every block of the grid, less those without data and those masked out.

    For a zarr input the stored chunks are listed (:func:`pssr.util.stored_chunks`) and mapped to
    the blocks that read them; a block that reads no stored chunk is all fill value and skipped.
    Inputs that cannot say which chunks exist (numpy, TIFF, dask) are dense.  Only the blocks of
    ``job.region`` (all of them with ``whole``); ``total`` counts that region's grid.
    """
    shape = tuple(int(n) for n in arr.shape)
    grid = block_grid(shape, job.tile)
    region = None if whole else job.region
    box = grid_box(region, job.tile, grid)
    total = math.prod(b - a for a, b in box)
    idxs = _stored_block_indices(arr, job, grid, region)
    if idxs is None:
        blocks = plan_blocks(shape, job.tile, job.halo, multiple, region=region)
    else:
        plan_blocks((1, 1), job.tile, job.halo, multiple)  # the same checks of tile and halo
        inside = (i for i in idxs if all(a <= v < b for v, (a, b) in zip(i, box, strict=True)))
        blocks = [block_at(shape, job.tile, job.halo, i) for i in sorted(inside)]
    if mask is not None:
        blocks = [b for b in blocks if mask.covers(b)]
    return WorkPlan(blocks, total)


def _listable(arr: Any) -> bool:
    """A zarr array in a zarr store (tifffile's TIFF-as-zarr stores list every chunk, stored or not)."""
    import zarr
    import zarr.storage

    if not isinstance(arr, zarr.Array):
        return False
    st = arr.store_path.store
    if isinstance(st, zarr.storage.WrapperStore):  # pssr's retrying store around obstore / fsspec
        st = st._store
    return type(st).__module__.startswith("zarr")


def _lead_prefixes(arr: Any, job: Job, region: Any) -> list[tuple[int, ...]] | None:
    """The leading chunk indices (planes of chunks) a run reads, to list them one prefix each; None: all.

    Only for zarr keys with folders (zarr v3's default ``c/z/y/x``, or v2 with ``/``), where a
    plane's chunks share a key prefix.  With a region, only the planes under it (and the neighbour
    frames a multi-frame model reads); otherwise every plane, listed side by side.
    """
    shape = tuple(int(n) for n in arr.shape)
    if len(shape) < 3:
        return None
    try:
        sep = _key_separator(arr)
    except Exception:
        return None
    if sep != "/":
        return None
    ck = chunk_grid(arr)
    ranges = []
    for ax, (n, c) in enumerate(zip(shape[:-2], ck[:-2], strict=True)):
        a, b = (int(region[ax][0]), int(region[ax][1])) if region else (0, n)
        if job.frames > 1 and job.context_axis == ax:
            a, b = max(0, a - job.frames // 2), min(n, b + job.frames // 2)
        ranges.append(range(a // c, -(-b // c)))
    return list(itertools.product(*ranges))


def _key_separator(arr: Any) -> str:
    from pssr.util import chunk_key_separator

    return chunk_key_separator(arr)


def _stored_block_indices(
    arr: Any, job: Job, grid: tuple[int, ...], region: Any = None
) -> set[tuple[int, ...]] | None:
    """Grid indices of the blocks whose reads touch a stored chunk; None when every chunk is stored.

    The stored chunks are listed one plane of chunks at a time, 16 planes side by side, and only the
    planes a ``region`` reads: on object storage a LIST request returns 1000 keys, so a run lists
    (stored chunks of its planes) / 1000 requests, not the whole array's.
    """
    if not _listable(arr):
        return None
    shape = tuple(int(n) for n in arr.shape)
    ck = chunk_grid(arr)
    n_chunks = math.prod(-(-n // c) for n, c in zip(shape, ck, strict=True))
    tile, halo = job.tile, job.halo
    *lead_n, h, w = shape
    ny, nx = grid[-2:]
    ctx = job.context_axis if job.frames > 1 else None
    out: set[tuple[int, ...]] = set()
    count = 0
    try:
        leads = _lead_prefixes(arr, job, region)
        if leads is None:
            listed: Any = stored_chunks(arr)
        else:
            from pssr.util import thread_map

            listed = itertools.chain.from_iterable(
                thread_map(lambda lead: list(stored_chunks(arr, lead=lead)), leads, threads=16)
            )
            n_chunks = len(leads) * math.prod(-(-n // c) for n, c in zip(shape[-2:], ck[-2:], strict=True))
        for c in listed:
            count += 1
            y0, y1 = c[-2] * ck[-2], min(h, (c[-2] + 1) * ck[-2])
            x0, x1 = c[-1] * ck[-1], min(w, (c[-1] + 1) * ck[-1])
            bys = range(max(0, -(-(y0 - halo - tile + 1) // tile)), min(ny - 1, (y1 - 1 + halo) // tile) + 1)
            bxs = range(max(0, -(-(x0 - halo - tile + 1) // tile)), min(nx - 1, (x1 - 1 + halo) // tile) + 1)
            lead_ranges = [
                range(ci * k, min(n, (ci + 1) * k)) for ci, k, n in zip(c[:-2], ck[:-2], lead_n, strict=True)
            ]
            for plane in itertools.product(*lead_ranges):
                for p in _planes_reading(plane, ctx, job.frames, lead_n):
                    out.update((*p, by, bx) for by in bys for bx in bxs)
    except (OSError, NotImplementedError):  # a store that cannot be listed: every block
        return None
    return None if count >= n_chunks else out


def _planes_reading(plane: tuple[int, ...], ctx: int | None, frames: int, lead_n: list[int]):
    """The block planes whose reads include ``plane`` (itself, and with neighbour frames, those around it)."""
    if ctx is None:
        return [plane]
    n, t = lead_n[ctx], plane[ctx]
    k = frames // 2
    cands = range(n) if n <= 4 * k + 1 else range(max(0, t - 2 * k), min(n, t + 2 * k + 1))
    return [(*plane[:ctx], u, *plane[ctx + 1 :]) for u in cands if t in frame_indices(u, n, frames)]
