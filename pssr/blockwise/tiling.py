"""Block geometry for tiled prediction: pure functions of shapes (no torch, no I/O).

A volume's low-resolution planes (every index of the leading axes: z slices, time
frames) are cut into square *core* blocks on a grid of ``tile`` pixels.  Each block is
read with a *halo* of context on every side (clamped at the volume's edges, where a border
rule supplies the rest: the image mirrored, :func:`border_padding`), run through the network,
and only the core of the result is kept.  When the halo covers the network's receptive field
and tile starts are multiples of the network's down-sampling factor, the tiled result equals
the network's result on the whole image padded by the halo (within float tolerance): every
kept output pixel saw exactly the input it would have seen in one pass.

Output blocks are ``tile * scale`` pixels and align with the output zarr's chunks, so
each block is written by exactly one task, and a block is done exactly when its chunk
is written.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from pssr.errors import PssrError
from pssr.nn.normalization import BORDER, BORDERS

__all__ = [
    "BORDER",
    "BORDERS",
    "Block",
    "block_at",
    "grid_box",
    "block_grid",
    "block_index",
    "border_padding",
    "choose_tile",
    "frame_indices",
    "group_blocks",
    "plan_blocks",
]


@dataclass(frozen=True)
class Block:
    """One unit of work.

    Attributes
    ----------
    plane : tuple of int
        Index into the leading (non-YX) axes.
    core : tuple
        ``(y0, y1, x0, x1)`` of the kept region, LR pixels.
    read : tuple
        ``(y0, y1, x0, x1)`` of the region read (core plus halo, clamped), LR pixels.
    """

    plane: tuple[int, ...]
    core: tuple[int, int, int, int]
    read: tuple[int, int, int, int]

    @property
    def key(self) -> str:
        """Stable identifier, e.g. ``"3.0-256.512-768"``: plane, then core y and x ranges."""
        p = ".".join(map(str, self.plane)) or "_"
        y0, y1, x0, x1 = self.core
        return f"{p}.{y0}-{y1}.{x0}-{x1}"

    def crop(self) -> tuple[slice, slice]:
        """Slices of the core inside the read region (LR pixels)."""
        y0, y1, x0, x1 = self.core
        ry0, _, rx0, _ = self.read
        return slice(y0 - ry0, y1 - ry0), slice(x0 - rx0, x1 - rx0)

    def lr_slices(self) -> tuple[slice, ...]:
        """Where the block's core lies in an LR-sized array (leading indices then Y, X)."""
        y0, y1, x0, x1 = self.core
        return (*self.plane, slice(y0, y1), slice(x0, x1))

    def where(self) -> str:
        """Human-readable coordinates, e.g. ``plane (3,) y 256:512 x 0:256 (LR pixels)``."""
        y0, y1, x0, x1 = self.core
        plane = f"plane {self.plane} " if self.plane else ""
        return f"{plane}y {y0}:{y1} x {x0}:{x1} (LR pixels)"

    def out_slices(self, scale: int) -> tuple[slice, ...]:
        """Where the block's output goes in the HR array (leading indices then Y, X)."""
        y0, y1, x0, x1 = self.core
        return (*self.plane, slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale))


def border_padding(block: Block, halo: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)``: how far a block's halo reaches beyond the image's edges.

    The read is the core plus ``halo`` on every side, clamped to the image; what the clamp cut off
    is what a border rule (mirroring the image) has to supply.
    """
    y0, y1, x0, x1 = block.core
    ry0, ry1, rx0, rx1 = block.read
    return (halo - (y0 - ry0), halo - (ry1 - y1), halo - (x0 - rx0), halo - (rx1 - x1))


def _check(tile: int, halo: int, multiple: int) -> None:
    if tile < 1 or halo < 0 or multiple < 1:
        raise PssrError(f"tile={tile} must be >= 1, halo={halo} >= 0, multiple={multiple} >= 1.")
    if tile % multiple or halo % multiple:
        raise PssrError(
            f"tile={tile} and halo={halo} must be multiples of {multiple} (the network's "
            f"down-sampling factor); e.g. tile={math.ceil(tile / multiple) * multiple}."
        )


def plan_blocks(
    lr_shape: tuple[int, ...],
    tile: int,
    halo: int,
    multiple: int = 1,
    region: tuple[tuple[int, int], ...] | None = None,
) -> list[Block]:
    """All blocks covering an LR array of shape ``(..., Y, X)``, in C order.

    With ``region`` (``(start, stop)`` per axis, Y and X on the block grid:
    :func:`pssr.blockwise.regions.snap`), only the blocks inside it, with the same cores, reads
    and keys as in the whole plan.
    """
    _check(tile, halo, multiple)
    *lead, h, w = lr_shape
    if h < 1 or w < 1:
        raise PssrError(f"cannot tile an empty array of shape {tuple(lr_shape)}.")
    if region is None:
        region = tuple((0, n) for n in lr_shape)
    *rlead, (ry0, ry1), (rx0, rx1) = region
    if ry0 % tile or rx0 % tile or (ry1 % tile and ry1 != h) or (rx1 % tile and rx1 != w):
        raise PssrError(f"region {region} is not on the block grid of tile {tile} (snap it first).")
    blocks = []
    for plane in itertools.product(*(range(a, b) for a, b in rlead)):
        for y0 in range(ry0, ry1, tile):
            for x0 in range(rx0, rx1, tile):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                read = (max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo))
                blocks.append(Block(tuple(plane), (y0, y1, x0, x1), read))
    return blocks


def block_grid(lr_shape: tuple[int, ...], tile: int) -> tuple[int, ...]:
    """Blocks per axis of :func:`plan_blocks`' grid: the leading axes, then ceil(Y/tile), ceil(X/tile)."""
    *lead, h, w = lr_shape
    return (*(int(n) for n in lead), -(-int(h) // tile), -(-int(w) // tile))


def block_at(lr_shape: tuple[int, ...], tile: int, halo: int, idx: tuple[int, ...]) -> Block:
    """The block at grid index ``idx`` (plane indices, then block row and column) of :func:`plan_blocks`.

    Computed, never listed: a plan of 10^9 blocks is never held in memory to find one of them.
    """
    *lead, h, w = lr_shape
    *plane, by, bx = (int(i) for i in idx)
    y0, x0 = by * tile, bx * tile
    y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
    read = (max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo))
    return Block(tuple(plane), (y0, y1, x0, x1), read)


def block_index(block: Block, tile: int) -> tuple[int, ...]:
    """A block's grid index (inverse of :func:`block_at`)."""
    return (*block.plane, block.core[0] // tile, block.core[2] // tile)


def grid_box(region: tuple | list | None, tile: int, grid: tuple[int, ...]) -> list[tuple[int, int]]:
    """A region's ``(start, stop)`` in block-grid indices per axis (the whole grid for None)."""
    if not region:
        return [(0, n) for n in grid]
    *lead, (y0, y1), (x0, x1) = region
    return [*((int(a), int(b)) for a, b in lead), (y0 // tile, -(-y1 // tile)), (x0 // tile, -(-x1 // tile))]


def frame_indices(t: int, n: int, frames: int) -> list[int]:
    """Planes ``t-k .. t+k`` for a ``frames``-channel model, mirrored at 0 and n-1.

    At the first plane the missing ``t-1`` is ``t+1`` (as in ``numpy.pad(mode="reflect")``), so an
    end plane still gets real neighbours with their own noise.  Edge replication (``t-1 = t``)
    handed the network the same noisy plane twice, which it never saw in training, where every
    frame is degraded independently: on held-out volumes that cost multi-frame ``em-3d`` 0.15-0.38
    dB on end sections (docs/models/experiments.md); mirroring removed it.  Training samples use
    the same rule.
    """
    k = frames // 2
    if n == 1:
        return [0] * (2 * k + 1)
    period = 2 * (n - 1)

    def mirror(i: int) -> int:
        i = abs(i) % period
        return period - i if i > n - 1 else i

    return [mirror(t + d) for d in range(-k, k + 1)]


def choose_tile(
    available_bytes: float,
    bytes_per_lr_pixel: float,
    halo: int,
    multiple: int,
    *,
    batch: int = 1,
    fraction: float = 0.25,
    lo: int = 64,
    hi: int = 1024,
) -> int:
    """Largest tile (multiple of ``multiple``) whose batch fits in ``fraction`` of memory."""
    budget = available_bytes * fraction / max(batch, 1)
    side = int(math.sqrt(max(budget / bytes_per_lr_pixel, 1))) - 2 * halo
    side = max(lo, min(hi, side))
    return max(multiple, side // multiple * multiple)


def group_blocks(blocks: list[Block], batch: int) -> list[list[Block]]:
    """Fixed batches: runs of consecutive blocks with the same read and core shapes, at most ``batch`` long.

    (Blocks with one read shape can differ in core shape where the tile is smaller than the halo;
    their reads padded by the border rule then differ, and a batch is one array.)

    The grouping depends only on the plan, never on which blocks are already done, so a resumed
    or distributed run feeds every block to the network in exactly the same batch as an
    uninterrupted local run, and the output is bit-identical.
    """
    if batch < 1:
        raise PssrError(f"batch={batch} must be >= 1.")
    groups: list[list[Block]] = []
    for b in blocks:
        last = groups[-1] if groups else None
        if last is not None and len(last) < batch and _read_shape(last[0]) == _read_shape(b):
            last.append(b)
        else:
            groups.append([b])
    return groups


def _read_shape(b: Block) -> tuple[int, int, int, int]:
    """What a block feeds the network: its read and its core (its padded read is core + 2 halo)."""
    return (b.read[1] - b.read[0], b.read[3] - b.read[2], b.core[1] - b.core[0], b.core[3] - b.core[2])
