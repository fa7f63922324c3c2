"""Shared helpers: the lazy plane view, the strided sample and the output-folder check."""

import os
from pathlib import Path

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
    real = os.access
    # root ignores permissions: the folder is made unwritable as os.access reports it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            os, "access", lambda p, mode, **k: False if Path(p) == ro and mode & os.W_OK else real(p, mode)
        )
        with pytest.raises(PssrError, match="not writable; choose another --out"):
            check_folder(ro / "x.tif", PssrError, fix="choose another --out")
    assert check_folder(ro / "x.tif", PssrError) == ro.resolve()


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


def test_strided_sample_of_small_planes_is_the_strided_pixels_as_before():
    a = np.random.default_rng(2).integers(0, 255, (40, 300, 300), dtype=np.uint8)
    s = strided_sample(a, max_px=2**20)
    step_p = 40 // 8
    st_ = int(np.ceil(np.sqrt(a[::step_p].size / 2**20)))
    np.testing.assert_array_equal(s, a[::step_p, ::st_, ::st_].astype(np.float32))


def test_strided_sample_of_a_declared_huge_sparse_zarr_reads_crops_of_its_data(tmp_path):
    import resource
    import time

    z = zarr.create_array(
        str(tmp_path / "h.zarr"), shape=(4, 100000, 100000), chunks=(1, 256, 256), dtype="u1"
    )
    z[2, 512:768, 99840:100000] = 200  # one populated chunk, far from the sampled grid
    z[0, :256, :256] = np.arange(256, dtype=np.uint8)[None, :]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    s = strided_sample(z)
    assert time.monotonic() - t0 < 5
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e3 < 100  # MB (was 37 GB)
    # the data of both populated chunks, not the fill value of the 10^11 missing pixels
    assert s.size == 2 * 256 * 256 - 256 * 96  # the last chunk column is 160 px wide
    assert (s == 200).sum() == 256 * 160 + 256 and s.min() == 0 and s.max() == 255
    z2 = zarr.create_array(
        str(tmp_path / "e.zarr"), shape=(3, 50000, 50000), chunks=(1, 256, 256), dtype="u1", fill_value=7
    )
    np.testing.assert_array_equal(strided_sample(z2), [7.0])  # nothing stored: the fill value


def test_stored_chunks_lists_only_what_is_stored(tmp_path):
    from pssr.util import chunk_exists, stored_chunks

    encodings = ({}, {"zarr_format": 2}, {"chunk_key_encoding": {"name": "v2", "separator": "."}})
    for i, kw in enumerate(encodings):
        z = zarr.create_array(
            str(tmp_path / f"a{i}.zarr"),
            shape=(1000, 10**6, 10**6), chunks=(1, 100, 100), dtype="u2", **kw,
        )  # fmt: skip
        z[5, 100:200, 900:1000] = 1
        z[999, -1, -1] = 2
        assert sorted(stored_chunks(z)) == [(5, 1, 9), (999, 9999, 9999)]
        assert [c for c in stored_chunks(z, lead=(5,)) if c[0] == 5] == [(5, 1, 9)]
        assert chunk_exists(z, (5, 1, 9)) and not chunk_exists(z, (5, 1, 8))
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    s0 = g.create_array("s0", shape=(100, 100), chunks=(10, 10), dtype="u1")
    g.create_array("s01", shape=(100, 100), chunks=(10, 10), dtype="u1")[0, 0] = 1
    s0[55, 55] = 1
    assert list(stored_chunks(s0)) == [(5, 5)]
