"""The YX pyramid of a restored OME-Zarr output: one definition, used to write and to verify.

Level ``k+1`` is the 2x2 mean of level ``k`` (computed in float32 in a fixed order, then
rounded and clipped for integer outputs), cropped to even sizes.  Each target chunk is
computed whole from the matching 2x2-chunk region of the level below, by one thread, so no two
writers ever share a chunk (concurrent partial writes to one chunk lose data).  The
:class:`Builder` computes each chunk as soon as everything under it is written, so the levels
are ready when level 0 is, without a second pass over the output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "Builder",
    "cast",
    "chunk_regions",
    "downsample2",
    "level_shapes",
    "regions_to_check",
    "source_region",
]

MIN_SIDE = 64
MAX_LEVELS = 4
_WIDER = {np.dtype(np.uint8): np.dtype(np.uint16), np.dtype(np.uint16): np.dtype(np.uint32)}


def cast(y: np.ndarray, dtype: str | np.dtype) -> np.ndarray:
    """Float values to ``dtype``: rounded and clipped for integers, as they are for floats."""
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        return np.clip(np.rint(y), info.min, info.max).astype(dt)
    return np.asarray(y).astype(dt)


def downsample2(a: np.ndarray, dtype: str | np.dtype) -> np.ndarray:
    """2x2 mean over the last two axes (even-cropped), in float32, cast to ``dtype``.

    8- and 16-bit unsigned inputs cast to their own type take an exact integer path (the sum of
    four values, divided by 4 and rounded half to even like ``np.rint``): the same values as the
    float32 formula (the sum and its quarter are exact in float32), 14x faster on an 8192^2 uint8
    plane.
    """
    h, w = a.shape[-2:]
    a = np.asarray(a)[..., : h // 2 * 2, : w // 2 * 2]
    dt = np.dtype(dtype)
    if a.dtype == dt and dt in _WIDER:
        wide = _WIDER[dt]
        s = (a[..., 0::2, 0::2].astype(wide) + a[..., 1::2, 0::2]) + (
            a[..., 0::2, 1::2] + a[..., 1::2, 1::2].astype(wide)
        )
        q, r = s >> 2, s & 3
        q += (r > 2) | ((r == 2) & (q & 1).astype(bool))  # round half to even, as np.rint
        return q.astype(dt)
    a = np.asarray(a, np.float32)
    s = (a[..., 0::2, 0::2] + a[..., 1::2, 0::2]) + (a[..., 0::2, 1::2] + a[..., 1::2, 1::2])
    return cast(s * np.float32(0.25), dtype)


def level_shapes(
    shape: tuple[int, ...], *, min_side: int = MIN_SIDE, max_levels: int = MAX_LEVELS
) -> list[tuple[int, ...]]:
    """Shapes of all levels, level 0 first: halve YX while the smaller side stays >= 64, at most 4.

    (Restorations use these defaults; :func:`pssr.io.write_ome_zarr` keeps levels down to 16 px.)
    """
    shapes = [tuple(shape)]
    while len(shapes) < max_levels:
        *lead, h, w = shapes[-1]
        if min(h, w) // 2 < min_side:
            break
        shapes.append((*lead, h // 2, w // 2))
    return shapes


def chunk_regions(shape: tuple[int, ...], chunks: tuple[int, ...]):
    """Every chunk of an array as a tuple of slices (C order)."""
    grids = [range(0, n, c) for n, c in zip(shape, chunks, strict=True)]
    for starts in np.ndindex(*(len(g) for g in grids)):
        yield tuple(
            slice(g[i], min(g[i] + c, n)) for i, g, c, n in zip(starts, grids, chunks, shape, strict=True)
        )


def source_region(region: tuple[slice, ...]) -> tuple[slice, ...]:
    """The region of the level below that a target region is computed from."""
    *lead, ys, xs = region
    return (*lead, slice(2 * ys.start, 2 * ys.stop), slice(2 * xs.start, 2 * xs.stop))


def _grid(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-n // c) for n, c in zip(shape, chunks, strict=True))


def chunk_region(idx: tuple[int, ...], shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[slice, ...]:
    """The region of chunk ``idx`` (chunk-grid coordinates)."""
    return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, chunks, shape, strict=True))


def _index_ranges(region, chunks, shape) -> list[tuple[int, ...]]:
    """Chunk indices (of a grid with ``chunks`` over ``shape``) that ``region`` overlaps."""
    ranges = [
        range(r.start // c, -(-min(r.stop, n) // c)) for r, c, n in zip(region, chunks, shape, strict=True)
    ]
    return [
        tuple(rg[i] for rg, i in zip(ranges, t, strict=True)) for t in np.ndindex(*(len(rg) for rg in ranges))
    ]


def _children(idx, shape_up, chunks_up, shape_down, chunks_down) -> list[tuple[int, ...]]:
    """Chunk indices of the level below that chunk ``idx`` of the level above is computed from."""
    return _index_ranges(source_region(chunk_region(idx, shape_up, chunks_up)), chunks_down, shape_down)


def _parents(idx, shape_down, chunks_down, shape_up, chunks_up) -> list[tuple[int, ...]]:
    """Chunk indices of the level above whose source region overlaps chunk ``idx`` below."""
    *lead, ys, xs = chunk_region(idx, shape_down, chunks_down)
    up = (*lead, slice(ys.start // 2, -(-ys.stop // 2)), slice(xs.start // 2, -(-xs.stop // 2)))
    if any(r.start >= n for r, n in zip(up, shape_up, strict=True)):
        return []  # cropped away (odd sizes)
    return _index_ranges(up, chunks_up, shape_up)


def parent_chunks(
    idxs, shape_down: tuple[int, ...], chunks_down: tuple[int, ...], shape_up, chunks_up
) -> set[tuple[int, ...]]:
    """The chunks of the level above computed from any of the chunks ``idxs`` below."""
    out: set[tuple[int, ...]] = set()
    for idx in idxs:
        out.update(_parents(tuple(idx), shape_down, chunks_down, shape_up, chunks_up))
    return out


def regions_to_check(below: Any, above: Any) -> list[tuple[slice, ...]]:
    """The chunks of level ``above`` that can differ from its fill value, as regions (C order).

    Those stored, and those above a stored chunk of ``below``: every other chunk lies over missing
    chunks only, and both read as the fill value (the 2x2 mean of a constant is that constant), so
    a sparse output is checked in the time of its stored chunks, not of its declared grid.  Arrays
    that cannot list their chunks: every chunk.
    """
    from pssr.util import stored_chunks

    shape, chunks = tuple(above.shape), tuple(above.chunks)
    try:
        idxs = set(stored_chunks(above)) | parent_chunks(
            stored_chunks(below), tuple(below.shape), tuple(below.chunks), shape, chunks
        )
    except Exception:  # not a listable zarr array
        return list(chunk_regions(shape, chunks))
    return [chunk_region(i, shape, chunks) for i in sorted(idxs)]


class Builder:
    """Levels 1.. written while level 0 is: a chunk is computed once every chunk under it is written.

    Call :meth:`written` with each level-0 region as it lands (its chunks must be complete);
    the level-1 chunk above is computed in a background thread as soon as its 2x2 chunks are all
    written, and so on up the levels.  A region written again (a block redone) recomputes what
    lies above it.  :meth:`close` computes what is left (e.g. above blocks done by an earlier,
    interrupted run, which are never trusted) and returns when every level is complete.

    ``expected`` (level-0 chunk indices) says which chunks will be written when not all will (a
    sparse volume's skipped blocks): a chunk above only missing chunks is never computed (it
    stays missing: the fill value, which is the 2x2 mean of fill values), one above some waits
    for those only, and :meth:`close` visits the chunks above ``expected``, never the whole grid.

    ``owned`` (``(start, stop)`` level-0 chunk indices per axis: a region of a full-size output
    that other runs fill) limits that to this run's chunks: a chunk outside it counts as complete
    only when seeded, never as "not expected", so a chunk above another run's blocks waits.
    ``on_chunk(level, index)`` is called after each chunk above level 0 is written.
    """

    def __init__(
        self,
        levels: list[Any],
        *,
        workers: int = 1,
        expected: set[tuple[int, ...]] | None = None,
        owned: list[tuple[int, int]] | None = None,
        on_chunk=None,
    ) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.levels = levels
        self.shapes = [tuple(a.shape) for a in levels]
        self.chunks = [tuple(a.chunks) for a in levels]
        self.complete: list[set[tuple[int, ...]]] = [set() for _ in levels]
        # Per level, the chunks that will hold data (None: all of them).
        self.expected: list[set[tuple[int, ...]] | None] = [None] * len(levels)
        if expected is not None:
            self.expected[0] = set(expected)
            for k in range(1, len(levels)):
                below = self.expected[k - 1]
                shapes, chunks = self.shapes, self.chunks
                self.expected[k] = parent_chunks(below, shapes[k - 1], chunks[k - 1], shapes[k], chunks[k])
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pssr-pyramid")
        self._futures: list[Any] = []
        # Chunks being computed -> whether what is under them changed meanwhile (a block written
        # again): such a chunk is computed again when its running computation ends, never by two
        # threads at once, so the last data written below is what ends up above.
        self._inflight: dict[tuple[int, tuple[int, ...]], bool] = {}
        self.owned = owned
        self.on_chunk = on_chunk

    def _ready(self, k: int, c: tuple[int, ...]) -> bool:
        """Whether chunk ``c`` of level ``k`` is complete, or will never hold data (lock held)."""
        if c in self.complete[k]:
            return True
        exp = self.expected[k]
        if exp is None or c in exp:
            return False
        if self.owned is None:
            return True
        f = 2**k  # a level-k chunk covers 2^k x 2^k level-0 chunks (same chunk shape, YX halved)
        *lead, cy, cx = c
        box = (*lead, cy * f, cx * f)
        ends = (*lead, (cy + 1) * f - 1, (cx + 1) * f - 1)
        return all(a <= v < b and a <= e < b for v, e, (a, b) in zip(box, ends, self.owned, strict=True))

    def seed_level(self, k: int, idxs) -> None:
        """Chunks of level ``k >= 1`` known complete (recorded by an earlier run): not computed again."""
        with self._lock:
            self.complete[k].update(tuple(i) for i in idxs)

    def seed(self, region: tuple[slice, ...]) -> None:
        """Level-0 chunks already complete (from an earlier run): counted, nothing computed yet."""
        with self._lock:
            self.complete[0].update(self._indices(0, region))

    def written(self, region: tuple[slice, ...]) -> None:
        """A level-0 region (whole chunks) was written: compute what became computable above it."""
        self._landed(0, self._indices(0, region))

    def _indices(self, k: int, region: tuple) -> list[tuple[int, ...]]:
        """Chunk indices of a region (plane indices may be ints) at level ``k``."""
        region = tuple(slice(r, r + 1) if isinstance(r, int | np.integer) else r for r in region)
        return _index_ranges(region, self.chunks[k], self.shapes[k])

    def _landed(self, k: int, idxs: list[tuple[int, ...]]) -> None:
        if k + 1 >= len(self.levels):
            with self._lock:
                self.complete[k].update(idxs)
            return
        todo = set()
        with self._lock:
            self.complete[k].update(idxs)
            for idx in idxs:
                for p in _parents(
                    idx, self.shapes[k], self.chunks[k], self.shapes[k + 1], self.chunks[k + 1]
                ):
                    self.complete[k + 1].discard(p)  # stale until recomputed
                    kids = _children(
                        p, self.shapes[k + 1], self.chunks[k + 1], self.shapes[k], self.chunks[k]
                    )
                    if all(self._ready(k, c) for c in kids):
                        todo.add(p)
            for p in sorted(todo):
                self._submit(k + 1, p)

    def _submit(self, k: int, idx: tuple[int, ...]) -> None:
        """Queue chunk ``idx`` of level ``k`` (lock held), or flag its running computation stale."""
        if (k, idx) in self._inflight:
            self._inflight[(k, idx)] = True
            return
        self._inflight[(k, idx)] = False
        self._futures.append(self._pool.submit(self._compute, k, idx))

    def _fill(self, k: int, idx: tuple[int, ...]) -> None:
        """Write chunk ``idx`` of level ``k`` from the 2x2 chunks below it."""
        region = chunk_region(idx, self.shapes[k], self.chunks[k])
        target = self.levels[k]
        target[region] = downsample2(np.asarray(self.levels[k - 1][source_region(region)]), target.dtype)

    def _compute(self, k: int, idx: tuple[int, ...]) -> None:
        try:
            self._fill(k, idx)
        except BaseException:
            with self._lock:
                self._inflight.pop((k, idx), None)
            raise
        with self._lock:
            stale = self._inflight.pop((k, idx))
            if stale:  # written under it again meanwhile: compute it again from the new data
                self._submit(k, idx)
        if not stale:
            if self.on_chunk is not None:
                self.on_chunk(k, idx)
            self._landed(k, [idx])  # and what became computable above it

    def _wait(self) -> None:
        while True:
            with self._lock:
                pending, self._futures = self._futures, []
            if not pending:
                return
            for f in pending:
                f.result()  # re-raises a failed chunk

    def close(self, *, only_ready: bool = False) -> None:
        """Compute every chunk not yet complete (level by level), then stop the thread.

        ``only_ready``: only those whose chunks below are all complete or empty (a full-size
        output that other runs fill: the rest waits for their blocks).
        """
        try:
            self._wait()
            for k in range(1, len(self.levels)):
                exp = self.expected[k]
                todo = sorted(exp) if exp is not None else np.ndindex(*_grid(self.shapes[k], self.chunks[k]))
                missing = [i for i in todo if i not in self.complete[k]]
                if only_ready:
                    shp, ck = self.shapes, self.chunks
                    with self._lock:
                        missing = [
                            i
                            for i in missing
                            if all(
                                self._ready(k - 1, c)
                                for c in _children(i, shp[k], ck[k], shp[k - 1], ck[k - 1])
                            )
                        ]
                with self._lock:  # nothing is in flight any more: _wait() returned
                    self._futures += [self._pool.submit(self._compute_only, k, i) for i in missing]
                self._wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stop: pending chunks are dropped, a running one finishes (idempotent, after close too)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _compute_only(self, k: int, idx: tuple[int, ...]) -> None:
        self._fill(k, idx)  # close() goes level by level: nothing to propagate
        if self.on_chunk is not None:
            self.on_chunk(k, idx)
        with self._lock:
            self.complete[k].add(idx)
