"""The pyramid: one definition (2x2 mean), built while level 0 is written, in any order."""

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pssr.io import pyramid


def _levels(tmp_path, base: np.ndarray, chunks, name: str):
    g = zarr.open_group(str(tmp_path / name), mode="w")
    arrs = []
    for k, shape in enumerate(pyramid.level_shapes(base.shape)):
        ck = tuple(min(c, n) for c, n in zip(chunks, shape, strict=True))
        arrs.append(g.create_array(f"s{k}", shape=shape, chunks=ck, dtype=base.dtype, fill_value=0))
    return arrs


def _reference(base: np.ndarray) -> list[np.ndarray]:
    out = [base]
    for _ in pyramid.level_shapes(base.shape)[1:]:
        out.append(pyramid.downsample2(out[-1], base.dtype))
    return out


class _Counting(pyramid.Builder):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.at_close = 0

    def _compute_only(self, k, idx):
        self.at_close += 1
        super()._compute_only(k, idx)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(128, 300),
    w=st.integers(128, 300),
    planes=st.integers(0, 2),
    chunk=st.sampled_from([32, 48, 64, 128]),
    dtype=st.sampled_from(["uint8", "float32"]),
    seed=st.integers(0, 2**16),
    repeat=st.integers(0, 3),
    workers=st.sampled_from([1, 3]),
)
def test_builder_matches_the_downsampled_chain_in_any_order(
    tmp_path_factory, h, w, planes, chunk, dtype, seed, repeat, workers
):
    tmp = tmp_path_factory.mktemp("pyr")
    rng = np.random.default_rng(seed)
    shape = (*([planes] if planes else []), h, w)
    base = (rng.random(shape) * 250).astype(dtype)
    chunks = (*([1] if planes else []), chunk, chunk)
    arrs = _levels(tmp, base, chunks, "a.zarr")
    builder = _Counting(arrs, workers=workers)
    regions = list(pyramid.chunk_regions(base.shape, arrs[0].chunks))
    order = [regions[i] for i in rng.permutation(len(regions))]
    order += [regions[i] for i in rng.integers(0, len(regions), repeat)]  # blocks redone
    for i, region in enumerate(order):
        if i >= len(regions):  # a redone block: other data, its ancestors must follow
            base[region] = (rng.random(base[region].shape) * 250).astype(dtype)
        arrs[0][region] = base[region]
        # blocks name their plane by index (Block.out_slices), chunk regions by slice: both work
        builder.written((region[0].start, *region[1:]) if planes and i % 2 else region)
    builder.close()
    assert builder.at_close == 0  # everything was built while level 0 was written
    for k, (a, ref) in enumerate(zip(arrs, _reference(base), strict=True)):
        np.testing.assert_array_equal(np.asarray(a[...]), ref, err_msg=f"level {k}")


def test_close_builds_what_an_earlier_run_left(tmp_path):
    rng = np.random.default_rng(0)
    base = (rng.random((200, 260)) * 255).astype(np.uint8)
    arrs = _levels(tmp_path, base, (64, 64), "b.zarr")
    regions = list(pyramid.chunk_regions(base.shape, arrs[0].chunks))
    for a in arrs[1:]:
        a[...] = 7  # stale data from the killed run
    builder = _Counting(arrs)
    for i, region in enumerate(regions):
        arrs[0][region] = base[region]
        # the first half was done by an interrupted run: seeded, never trusted above level 0
        (builder.seed if i < len(regions) // 2 else builder.written)(region)
    builder.close()
    assert builder.at_close > 0
    for a, ref in zip(arrs, _reference(base), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), ref)


def _float_mean(a: np.ndarray, dtype) -> np.ndarray:
    """The definition: 2x2 mean in float32, rounded half to even and clipped for integers."""
    h, w = a.shape[-2:]
    f = np.asarray(a[..., : h // 2 * 2, : w // 2 * 2], np.float32)
    s = (f[..., 0::2, 0::2] + f[..., 1::2, 0::2]) + (f[..., 0::2, 1::2] + f[..., 1::2, 1::2])
    return pyramid.cast(s * np.float32(0.25), dtype)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    planes=st.integers(0, 3),
    dtype=st.sampled_from(["uint8", "uint16", "float32", "int16"]),
    seed=st.integers(0, 2**16),
    extreme=st.booleans(),
)
def test_downsample2_integer_path_equals_the_float_definition(h, w, planes, dtype, seed, extreme):
    rng = np.random.default_rng(seed)
    shape = (*([planes] if planes else []), h, w)
    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(dtype)
        lo, hi = (info.max - 3, info.max) if extreme else (info.min, info.max)
        a = rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    else:
        a = (rng.random(shape) * 1000).astype(dtype)
    got = pyramid.downsample2(a, dtype)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, _float_mean(a, dtype))


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_downsample2_rounds_every_possible_sum_half_to_even(dtype):
    m = int(np.iinfo(dtype).max)
    sums = np.arange(0, 4 * m + 1, dtype=np.int64)
    if dtype == "uint16":  # every remainder mod 4 at the low and high ends and a stride between
        sums = np.unique(np.concatenate([sums[:4096], sums[-4096:], sums[::997]]))
    parts, left = [], sums.copy()
    for _ in range(4):  # split each sum into four values <= m
        p = np.minimum(left, m)
        parts.append(p)
        left = left - p
    a = np.zeros((2, 2 * len(sums)), dtype)
    a[0, 0::2], a[1, 0::2], a[0, 1::2], a[1, 1::2] = parts
    got = pyramid.downsample2(a, dtype)[0]
    np.testing.assert_array_equal(got, np.rint(sums / 4).astype(dtype))  # numpy rounds half to even
    np.testing.assert_array_equal(got, _float_mean(a, dtype)[0])


class _LateReads:
    """A level-0 array whose first read returns the data it saw only after ``delay`` seconds."""

    def __init__(self, arr: np.ndarray, chunks, delay: float) -> None:
        self.arr, self.chunks, self.delay = arr, chunks, delay
        self.shape, self.dtype = arr.shape, arr.dtype

    def __getitem__(self, idx):
        import time

        seen = self.arr[idx].copy()
        delay, self.delay = self.delay, 0.0  # later reads return at once, i.e. before this one
        time.sleep(delay)
        return seen

    def __setitem__(self, idx, value):
        self.arr[idx] = value


def test_a_chunk_recomputed_while_it_is_computed_ends_with_the_last_data(tmp_path):
    # Several pyramid threads: a block written again while the chunk above it is being computed
    # from its old data must not let that older computation land last.
    rng = np.random.default_rng(1)
    base = (rng.random((128, 128)) * 255).astype(np.uint8)
    lvl0 = _LateReads(np.zeros_like(base), (64, 64), delay=0.3)
    ref_levels = _levels(tmp_path, base, (64, 64), "c.zarr")
    arrs = [lvl0, *ref_levels[1:]]
    builder = pyramid.Builder(arrs, workers=4)
    regions = list(pyramid.chunk_regions(base.shape, (64, 64)))
    for region in regions:
        lvl0[region] = base[region]
        builder.written(region)
    import time

    time.sleep(0.1)  # the level-1 chunk is now being computed from the first data
    base[regions[0]] = 255 - base[regions[0]]
    lvl0[regions[0]] = base[regions[0]]
    builder.written(regions[0])
    builder.close()
    for k, (a, ref) in enumerate(zip(arrs, _reference(base), strict=True)):
        np.testing.assert_array_equal(np.asarray(a[...]), ref, err_msg=f"level {k}")
