"""The one pixel-centre rule (pssr.io.geometry) agrees with what the arrays do."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pssr.degrade.crappify import bin_downsample, linear_downsample, point_sample
from pssr.io.geometry import coarser, finer

sizes = st.floats(0.01, 100.0)
origins = st.floats(-1e4, 1e4)


@given(sizes, origins, st.sampled_from([2, 3, 4, 8]))
def test_finer_inverts_coarser(size, origin, s):
    sz, org = finer(*coarser(size, origin, s), s)
    assert np.isclose(sz, size, rtol=1e-12) and np.isclose(org, origin, rtol=1e-12, atol=1e-9)


@given(st.sampled_from([2, 3, 4, 8]), st.floats(0.5, 10.0), st.floats(-100.0, 100.0))
def test_an_lr_pixel_lies_where_its_hr_pixels_were_averaged(s, size, origin):
    # A ramp whose value is each HR pixel's world X coordinate: every downsampler's LR pixel must
    # hold the world coordinate that coarser() gives its centre.
    n = 8 * s
    world_x = origin + size * np.arange(n, dtype=np.float64)
    img = np.broadcast_to(world_x, (n, n)).astype(np.float64)
    lr_size, lr_origin = coarser(size, origin, s)
    expected = lr_origin + lr_size * np.arange(n // s)
    for down in (bin_downsample, linear_downsample, lambda x, k: point_sample(x, k)):
        got = np.asarray(down(img, s), np.float64)[0]
        assert np.allclose(got, expected, atol=1e-6 * max(1.0, abs(origin) + n * size)), down


def test_restored_pixels_sit_between_their_inputs():
    # 4x finer: output pixel 0 is 1.5 output pixels before input pixel 0's centre.
    assert finer(16.0, 0.0, 4) == (4.0, -6.0)
    assert coarser(4.0, -6.0, 4) == (16.0, 0.0)
