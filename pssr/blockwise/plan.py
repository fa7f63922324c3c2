"""The plan of a restoration: the :class:`Job` every worker gets, and what a block reads.

A job is plain JSON (no torch), so it travels to dask workers and is stored with an output to
decide whether a rerun resumes it.  :func:`block_reads` / :func:`read_block` say which input
regions a block is computed from (its halo and neighbour frames); :func:`input_digest` is their
checksum, recorded when the block is done and checked on resume.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import numpy as np

from pssr.blockwise.integrity import digest
from pssr.blockwise.tiling import Block, frame_indices

__all__ = ["Job", "block_reads", "input_digest", "read_block"]


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
        then = {f.name: other.get(f.name, _default(f)) for f in fields(self)}
        return {k: (then[k], a[k]) for k in a if k not in self._NOT_WORK and a[k] != then[k]}

    def same_work(self, other: dict[str, Any]) -> bool:
        """Whether an existing output was made by the same job (so it can be resumed)."""
        return not self.differences(other)


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
    """The block's input ``(frames, h, w)`` as float32 (neighbour frames edge-replicated)."""
    return np.stack([np.asarray(arr[idx], np.float32) for idx in block_reads(tuple(arr.shape), job, block)])


def input_digest(arr: Any, job: Job, block: Block) -> str:
    """Checksum of what a block is computed from (recorded when done, checked on resume)."""
    return digest(read_block(arr, job, block))
