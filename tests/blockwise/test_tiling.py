"""Block geometry (pure, no torch): every pixel restored once, fixed batches, edge frames."""

import numpy as np
import pytest

from pssr.blockwise.tiling import frame_indices, plan_blocks


def test_plan_blocks_covers_everything_once():
    blocks = plan_blocks((2, 70, 45), tile=16, halo=8, multiple=8)
    cover = np.zeros((2, 70, 45), int)
    for b in blocks:
        y0, y1, x0, x1 = b.core
        cover[(*b.plane, slice(y0, y1), slice(x0, x1))] += 1
        ry0, ry1, rx0, rx1 = b.read
        assert ry0 <= y0 and ry1 >= y1 and rx0 <= x0 and rx1 >= x1
        assert ry0 % 8 == 0 and rx0 % 8 == 0  # down-sampling phase kept
    assert np.all(cover == 1)
    assert len({b.key for b in blocks}) == len(blocks)
    with pytest.raises(ValueError, match="multiples of 8"):
        plan_blocks((70, 45), tile=20, halo=8, multiple=8)


def test_group_blocks_fixed_batches():
    from pssr.blockwise.tiling import group_blocks

    blocks = plan_blocks((2, 70, 45), tile=16, halo=8, multiple=8)
    groups = group_blocks(blocks, 4)
    assert [b for g in groups for b in g] == blocks  # every block once, plan order
    for g in groups:
        assert 1 <= len(g) <= 4
        assert len({(b.read[1] - b.read[0], b.read[3] - b.read[2]) for b in g}) == 1
    assert group_blocks(blocks, 4) == groups  # a pure function of the plan
    with pytest.raises(ValueError, match="batch=0"):
        group_blocks(blocks, 0)


def test_frame_indices_mirror_at_the_ends():
    assert frame_indices(0, 10, 5) == [2, 1, 0, 1, 2]
    assert frame_indices(1, 10, 5) == [1, 0, 1, 2, 3]
    assert frame_indices(9, 10, 5) == [7, 8, 9, 8, 7]
    assert frame_indices(4, 10, 5) == [2, 3, 4, 5, 6]
    assert frame_indices(4, 10, 1) == [4]
    assert frame_indices(0, 1, 3) == [0, 0, 0]  # a single plane: nothing else to take
    assert frame_indices(0, 2, 5) == [0, 1, 0, 1, 0]
    for n in range(1, 7):  # always in range, centre first-class, symmetric distances
        for t in range(n):
            idx = frame_indices(t, n, 7)
            assert all(0 <= i < n for i in idx) and idx[3] == t
