"""The pyramid: one definition (2x2 mean), built while level 0 is written, in any order."""

import numpy as np
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pssr import pyramid


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
)
def test_builder_matches_the_downsampled_chain_in_any_order(
    tmp_path_factory, h, w, planes, chunk, dtype, seed, repeat
):
    tmp = tmp_path_factory.mktemp("pyr")
    rng = np.random.default_rng(seed)
    shape = (*([planes] if planes else []), h, w)
    base = (rng.random(shape) * 250).astype(dtype)
    chunks = (*([1] if planes else []), chunk, chunk)
    arrs = _levels(tmp, base, chunks, "a.zarr")
    builder = _Counting(arrs)
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
