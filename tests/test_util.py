"""Shared helpers: the lazy plane view, the strided sample and the output-folder check."""

import os

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pssr.errors import PssrError
from pssr.util import Planes, check_folder, strided_sample


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    start=st.integers(0, 8),
    stop=st.integers(0, 9),
    step=st.integers(1, 3),
)
def test_planes_match_a_reshape(lead, start, stop, step):
    a = np.arange(int(np.prod(lead or [1])) * 4 * 5, dtype=np.float32).reshape(*lead, 4, 5)
    flat = a.reshape(-1, 4, 5)
    p = Planes(a)
    assert p.shape == flat.shape and p.ndim == 3
    np.testing.assert_array_equal(p[...], flat)
    np.testing.assert_array_equal(p[start:stop:step, 1:3, ::2], flat[start:stop:step, 1:3, ::2])
    for q in range(flat.shape[0]):
        np.testing.assert_array_equal(p[q], flat[q])
    with pytest.raises(IndexError):
        p[flat.shape[0]]


def test_planes_read_lazily_from_zarr(tmp_path):
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(2, 3, 8, 8), chunks=(1, 1, 8, 8), dtype="uint16")
    z[...] = np.arange(z.size, dtype=np.uint16).reshape(z.shape)
    np.testing.assert_array_equal(Planes(z)[4, 2:4], np.asarray(z[1, 1, 2:4]))


def test_strided_sample_is_bounded_and_keeps_small_inputs_whole():
    small = np.random.default_rng(0).random((3, 20, 20)).astype(np.float32)
    np.testing.assert_array_equal(strided_sample(small), small)
    big = np.zeros((2, 3, 1500, 1500), np.uint8)
    big[1, 2, ::3, ::3] = 255  # a value only a sample that reaches the last plane sees
    s = strided_sample(big, max_px=2**20)
    assert s.dtype == np.float32 and s.size <= 6 * 2**20 and s.max() == 255


def test_check_folder_names_the_folder_and_the_fix(tmp_path):
    assert check_folder(tmp_path / "x.tif", PssrError) == tmp_path.resolve()
    with pytest.raises(PssrError, match="does not exist; create it first"):
        check_folder(tmp_path / "missing" / "x.tif", PssrError)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(PssrError, match="not writable; choose another --out"):
            check_folder(ro / "x.tif", PssrError, fix="choose another --out")
    finally:
        ro.chmod(0o700)


def test_overwrite_replaces_only_what_pssr_wrote(tmp_path):
    from pssr.io import formats as io
    from pssr.util import replaceable

    data = np.zeros((2, 32, 32), np.float32)
    own = io.write_ome_zarr(tmp_path / "own.ome.zarr", data, axes="ZYX")
    assert replaceable(own)
    io.write_ome_zarr(own, data + 1, axes="ZYX", overwrite=True)  # its own output: replaced
    raw = tmp_path / "raw.ome.zarr"
    raw.mkdir()
    (raw / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"ome": {}}}')
    (raw / "0").mkdir()
    assert not replaceable(raw)
    with pytest.raises(io.PssrIOError, match="which pssr did not write"):
        io.write_ome_zarr(raw, data, axes="ZYX", overwrite=True)
    assert (raw / "0").is_dir()
    empty = tmp_path / "empty.ome.zarr"
    empty.mkdir()
    assert replaceable(empty)
