"""The prediction engine: a job, a predictor, and one batch of blocks read, restored and written.

Everything here is shared by the two runners (:mod:`pssr.blockwise.runners`, in this process, and
:mod:`pssr.blockwise.distributed`, as dask tasks): a :class:`Job` (JSON-serialisable, so it travels to
workers) says what to do with any block; a :class:`Predictor` is a loaded model on a device;
:func:`process_blocks` reads a fixed batch of blocks (halo and neighbour frames included),
normalises them with the whole input's statistics, runs the network once and crops each result
to its core; :func:`run_group` writes the results into the work store (:mod:`pssr.blockwise.store`) and
marks the blocks done.  The same batch gives the same bytes whichever runner runs it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import zarr

from pssr.blockwise import store
from pssr.blockwise.fidelity import fidelity_z
from pssr.blockwise.integrity import digest
from pssr.blockwise.plan import Job, block_reads, input_digest, pad_block, padded_crop, read_block
from pssr.blockwise.tiling import Block, frame_indices
from pssr.errors import PredictError
from pssr.io import formats as io
from pssr.io import pyramid
from pssr.nn.model import pad_to_multiple
from pssr.nn.modelfile import LoadedModel
from pssr.util import thread_map

logger = logging.getLogger(__name__)

__all__ = [
    "Job",
    "Predictor",
    "block_reads",
    "input_digest",
    "open_input",
    "process_blocks",
    "read_block",
    "run_group",
    "write_group",
]


def _dihedral_t(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    if not inverse:
        if k >= 4:
            x = x.flip(-1)
        return torch.rot90(x, k % 4, dims=(-2, -1))
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


class Predictor:
    """A loaded model on a device, run on normalised ``(B, C, h, w)`` float32 batches.

    ``backend="onnxruntime"`` (CPU, float32) runs the network with ONNX Runtime
    (:mod:`pssr.nn.onnx_backend`); everything else (batching, TTA, normalisation) is the same.
    Inputs smaller than the model's multiple, which no exported graph covers, still run in torch.
    """

    def __init__(
        self,
        model: LoadedModel,
        device: str | torch.device = "cpu",
        tta: bool = False,
        precision: str = "float32",
        backend: str = "torch",
    ) -> None:
        if backend not in ("torch", "onnxruntime"):
            raise PredictError(
                f"backend={backend!r} must be 'torch' or 'onnxruntime' (resolved, not 'auto')."
            )
        if backend == "onnxruntime":
            from pssr.nn.onnx_backend import check_runs_here

            check_runs_here(str(device), precision)  # before the network moves anywhere
        self.model = model
        self.device = torch.device(device)
        self.net = model.net.to(self.device).eval()
        self.backend = backend
        self.onnx = None
        if backend == "onnxruntime":
            from pssr.nn.onnx_backend import OnnxNetwork

            self.onnx = OnnxNetwork(model)
        # channels_last (NHWC) on the CPU: oneDNN's convolutions run faster on it (1.09x measured,
        # output within 1.1e-7 of the range: docs/benchmarks/levers.md).  ONNX Runtime takes NCHW.
        on_cpu_torch = self.device.type == "cpu" and self.onnx is None
        self.memory_format = torch.channels_last if on_cpu_torch else torch.contiguous_format
        if self.memory_format is torch.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.tta = tta
        self.precision = precision
        self.overflowed = False  # a float16 batch overflowed and was recomputed in float32
        # --frames auto: the single-frame model for blocks whose frames disagree (see for_job)
        self.fallback: Predictor | None = None

    @classmethod
    def for_job(
        cls,
        model: LoadedModel,
        job: Job,
        device: str | torch.device | None = None,
        backend: str | None = None,
    ) -> Predictor:
        """The job's predictor on ``device`` (default the job's), with its fallback under --frames auto."""
        device = job.device if device is None else device
        backend = job.backend if backend is None else backend
        pred = cls(model, device=device, tta=job.tta, precision=job.precision, backend=backend)
        if job.frames_auto:
            from pssr.nn.modelfile import load_model

            fb = load_model(job.frames_auto["fallback"], device=str(device))
            pred.fallback = cls(fb, device=device, tta=job.tta, precision=job.precision, backend=backend)
        return pred

    def _net(self, t: torch.Tensor) -> torch.Tensor:
        if self.onnx is not None and self.onnx.covers(tuple(t.shape)):
            return torch.from_numpy(self.onnx(t.contiguous().numpy()))
        if self.precision == "float32":
            return self.net(t)
        with torch.autocast(self.device.type, dtype=getattr(torch, self.precision)):
            out = self.net(t).float()
        if self.precision == "float16" and not bool(torch.isfinite(out).all()):
            # float16 overflows past 65504: an unusual input can push an activation there.  Such a
            # batch is computed again in float32 rather than written as inf/NaN.
            if not self.overflowed:
                logger.warning("float16 overflowed on a batch: computing it again in float32")
            self.overflowed = True
            out = self.net(t)
        return out

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Restore a batch; returns ``(mean, spread)`` (spread: std over TTA, or None).

        On the CPU the blocks of a batch go through the network one at a time: the network's
        transient memory (its x``scale`` head holds several 16-channel HR tensors) is then that of
        one block, not ``batch`` blocks (a quarter at batch 4), at the same speed and with
        bit-identical output (measured: benchmarks/bench_memory.py, docs/benchmarks/predict.md).
        Accelerators keep the whole batch (there batching is what fills the device).
        """
        if self.device.type == "cpu" and len(x) > 1:
            parts = [self._batch(x[i : i + 1]) for i in range(len(x))]
            spread = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
            return np.concatenate([p[0] for p in parts]), spread
        return self._batch(x)

    @torch.no_grad()
    def _batch(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)
        t = t.contiguous(memory_format=self.memory_format)
        if not self.tta:
            return self._net(t)[:, 0].float().cpu().numpy(), None
        # Pad to the network's multiple *before* the transforms: padding inside the network would land
        # on the top/left of a flipped block, shifting its downsampling grid by the block's own size,
        # so an edge block of odd size and the whole image disagreed (0.1 of the range).
        h, w = t.shape[-2:]
        tp, sc = pad_to_multiple(t, self.model.config.multiple)[0], self.model.scale
        outs = [_dihedral_t(self._net(_dihedral_t(tp, k)), k, inverse=True)[:, 0] for k in range(8)]
        outs = [o[:, : h * sc, : w * sc] for o in outs]
        s = torch.stack(outs)
        return s.mean(0).float().cpu().numpy(), s.std(0).float().cpu().numpy()


_cast = pyramid.cast


F32_MAX = float(np.finfo(np.float32).max)


def bad_pixels(raw: np.ndarray) -> np.ndarray:
    """Where a block cannot be computed: NaN, infinite, or beyond the float32 range pssr computes in."""
    bad = ~np.isfinite(raw)
    if raw.dtype.kind == "f" and raw.dtype.itemsize > 4:
        with np.errstate(invalid="ignore"):
            bad |= np.abs(raw) > F32_MAX
    return bad


def bad_value_message(value: float, where: str) -> str:
    """What is wrong with an input value at ``where`` and how to fix it."""
    if np.isfinite(value):
        return (
            f"input value {value:g} at {where} is beyond the float32 range (|v| <= {F32_MAX:.3g}) that pssr "
            "computes in; rescale the image (e.g. divide it by a constant) first"
        )
    return (
        f"input contains NaN or infinite values ({value} at {where}); replace them first (e.g. np.nan_to_num)"
    )


def _raise_nonfinite(raw: np.ndarray, job: Job, block: Block, shape: tuple[int, ...]) -> None:
    """Name the first NaN/inf (or beyond float32) input pixel of a block (every block is checked as read)."""
    f, y, x = (int(v) for v in np.argwhere(bad_pixels(raw))[0])
    y0, _, x0, _ = block.read
    plane = list(block.plane)
    if job.context_axis is not None and job.frames > 1:
        ax = job.context_axis  # the neighbour frame that holds it
        plane[ax] = frame_indices(block.plane[ax], shape[ax], job.frames)[f]
    where = ", ".join(f"{a}={v}" for a, v in zip(job.input_axes[:-2], plane, strict=True))
    raise PredictError(
        bad_value_message(float(raw[f, y, x]), f"{where + ', ' if where else ''}y={y0 + y}, x={x0 + x}")
        + ", nothing was written for this block."
    )


def process_blocks(
    arr: Any, predictor: Predictor, job: Job, blocks: list[Block], post_threads: int | None = 1
) -> list[dict[str, Any]]:
    """Restore blocks of identical read shape in one forward pass.

    Returns one dict per block: ``out`` (HR core in ``job.out_dtype``), optional
    ``fidelity`` (LR core, z-scores) and ``uncertainty`` (HR core), and ``stats``.
    ``post_threads``: threads that turn the network's output into each block's results (None:
    :func:`pssr.util.io_threads`); the results are the same whatever the number.
    """
    s = job.scale
    rng_ = job.hi - job.lo
    xs, ins = [], []
    for b in blocks:
        raw = read_block(arr, job, b)
        if raw.dtype.kind == "f" and bad_pixels(raw).any():
            _raise_nonfinite(raw, job, b, tuple(arr.shape))
        ins.append(digest(raw))  # what this block was computed from (checked on resume)
        xs.append((pad_block(raw, job, b) - job.lo) / rng_)  # the image mirrored beyond its edges
    results: list[dict[str, Any] | None] = [None] * len(blocks)
    run_idx = []
    for i, (b, x) in enumerate(zip(blocks, xs, strict=True)):
        cy, cx = padded_crop(job, b)
        core = x[job.frames // 2, cy, cx]
        # Empty only if everything the network would read is (its halo and neighbour frames too): a
        # background core beside data restores to values that blend into that data, not a constant.
        if job.empty_threshold > 0 and float(np.ptp(x)) <= job.empty_threshold:
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
        ys, spread, auto = _run(predictor, job, xs, run_idx)
        if not np.isfinite(ys).all():  # a broken model file, or an input far outside its range
            j = int(np.argwhere(~np.isfinite(ys).reshape(len(run_idx), -1).all(axis=1))[0][0])
            raise PredictError(
                f"the network's output is NaN or infinite on the block at {blocks[run_idx[j]].where()} "
                f"(its input is finite; precision {predictor.precision}, backend {predictor.backend}): "
                "the model file may be damaged, or the input far outside the range it was trained on; "
                "try --precision float32, --backend torch, or another model. Nothing was written for "
                "this batch."
            )

        def finish(j: int) -> dict[str, Any]:
            """Block ``run_idx[j]``'s results from the network's output (one block, any thread)."""
            i = run_idx[j]
            cy, cx = padded_crop(job, blocks[i])
            hy, hx = slice(cy.start * s, cy.stop * s), slice(cx.start * s, cx.stop * s)
            y_full = ys[j] * rng_ + job.lo
            res = {"out": _cast(y_full[hy, hx], job.out_dtype), "stats": {"empty": False, "input": ins[i]}}
            res["stats"].update(auto.get(i, {}))
            if job.tta and spread is not None:
                res["uncertainty"] = (spread[j][hy, hx] * rng_).astype(np.float32)
            if job.fidelity:
                lr_in = xs[i][job.frames // 2] * rng_ + job.lo
                z = fidelity_z(y_full, lr_in, job.noise, job.full_scale)[cy, cx]
                res["fidelity"] = z
                res["stats"].update(
                    {"frac_3sigma": float(np.mean(np.abs(z) > 3)), "max_abs_z": float(np.abs(z).max())}
                )
            return res

        # Scaling and casting the HR blocks is the CPU's part of a GPU batch: the blocks side by side.
        for j, res in enumerate(thread_map(finish, range(len(run_idx)), threads=post_threads)):
            results[run_idx[j]] = res
    return results  # type: ignore[return-value]


def _run(
    predictor: Predictor, job: Job, xs: list[np.ndarray], run_idx: list[int]
) -> tuple[np.ndarray, np.ndarray | None, dict[int, dict[str, Any]]]:
    """The network's output for blocks ``run_idx`` (in that order), its TTA spread, --frames auto's choices.

    Under --frames auto each block's neighbours are registered to its centre frame first
    (``xs[i]`` becomes the registered window), and the blocks whose frames still disagree go to
    the single-frame fallback with their centre frame alone: per block ``single_frame`` and
    ``disagreement`` (recorded with the block's stats).
    """
    if not job.frames_auto:
        return (*predictor(np.stack([xs[i] for i in run_idx])), {})
    if predictor.fallback is None:
        raise PredictError("a --frames auto job needs its predictor made by Predictor.for_job (no fallback).")
    from pssr.blockwise.frames import prepare

    multi, single, auto = [], [], {}
    for i in run_idx:
        win, fall_back, d = prepare(xs[i], job.frames_auto["register"], job.frames_auto["threshold"])
        auto[i] = {"single_frame": fall_back, "disagreement": round(d, 4)}
        if fall_back:
            single.append(i)
        else:
            xs[i] = win
            multi.append(i)
    c = job.frames // 2
    parts = {}
    if multi:
        parts["m"] = predictor(np.stack([xs[i] for i in multi]))
    if single:
        parts["s"] = predictor.fallback(np.stack([xs[i][c : c + 1] for i in single]))
    where = {i: ("m", j) for j, i in enumerate(multi)} | {i: ("s", j) for j, i in enumerate(single)}
    ys = np.stack([parts[where[i][0]][0][where[i][1]] for i in run_idx])
    spread = None
    if job.tta:
        spread = np.stack([parts[where[i][0]][1][where[i][1]] for i in run_idx])
    return ys, spread, auto


def run_group(
    arr, pred: Predictor, job: Job, blocks: list[Block], skip: set[str], group, pool=None
) -> list[dict]:
    """Restore one fixed batch of blocks; write (and mark) only those not in ``skip``."""
    return write_group(job, blocks, process_blocks(arr, pred, job, blocks), skip, group, pool=pool)


def write_group(
    job: Job, blocks: list[Block], results: list[dict], skip: set[str], group, pool=None
) -> list[dict]:
    """Write (and mark done) a batch's restored blocks not in ``skip``; returns their stats.

    With ``pool`` (an executor) the blocks are written side by side: each block is its own chunk,
    so no two writers share a file.  The batch's done records are appended to the ledger
    (:mod:`pssr.blockwise.ledger`) once every chunk of the batch is written: one append and one
    fsync per batch.  Every write has finished (written and recorded, or failed) when this
    returns or raises; a failed block is not recorded, the others are.
    """
    todo = [(b, r) for b, r in zip(blocks, results, strict=True) if b.key not in skip]
    del results

    led = store.ledger(job.out)

    def one(b: Block, r: dict) -> tuple[dict, dict]:
        led.check()  # a writer that lost the output's lease (object storage) stops before writing more
        rec = store.write_block(group, job, b, r, mark=False)
        return rec, {"key": b.key, "voxels": int(r["out"].size), **r["stats"]}

    if pool is None or len(todo) < 2:
        outs, err = [], None
        for b, r in todo:
            try:
                outs.append(one(b, r))
            except BaseException as e:
                err = e
                break
    else:
        from concurrent.futures import wait

        futures = [pool.submit(one, b, r) for b, r in todo]
        wait(futures)  # none still writing when an error is raised below
        outs = [f.result() for f in futures if f.exception() is None]
        err = next((f.exception() for f in futures if f.exception() is not None), None)
    del todo
    led.record([(st["key"], rec) for rec, st in outs])
    if err is not None:
        raise err
    stats = [st for _, st in outs]
    trim_heap()
    return stats


_LIBC: Any = None


def trim_heap() -> None:
    """Hand the memory a batch freed back to the operating system (glibc only; a no-op elsewhere).

    glibc keeps freed heap memory for reuse: between batches a local run at ``--tile 256`` held
    ~0.4 GB more than after loading the model (RSS 0.80-0.96 GB instead of 0.42-0.43 GB), and its
    peak was 0.24 GB higher (benchmarks/bench_memory.py); ``malloc_trim(0)`` once per batch
    returns it, for a few milliseconds per batch.
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        import sys

        if sys.platform.startswith("linux"):
            import ctypes

            try:
                _LIBC = ctypes.CDLL("libc.so.6")
                _LIBC.malloc_trim  # noqa: B018  (musl has no malloc_trim)
            except (OSError, AttributeError):
                _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def open_input(job: Job, storage_options: dict[str, Any] | None = None) -> Any:
    """The input as a lazily sliceable array (zarr, N5, precomputed, HDF5; local or a URL) or in memory.

    TIFF/PNG are read into memory.  ``storage_options`` (credentials) travel beside the job, never in it.
    """
    if job.input_array:
        return zarr.open_array(job.input, path=job.input_array, mode="r")
    return io.read_image(job.input, axes=job.input_axes, storage_options=storage_options).data
