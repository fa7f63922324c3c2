"""The CPU-side work of a run on several threads: same bytes as one thread, errors as before."""

import threading

import numpy as np
import pytest
import tifffile
import zarr

import pssr.blockwise.store as store
from pssr import restore
from pssr.blockwise.verify import verify_output
from pssr.util import io_threads, thread_map


def _arrays(out) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(out), mode="r")
    return {k: np.asarray(a[...]) for k, a in {**dict(g.arrays()), **store.open_arrays(out)}.items()}


@pytest.fixture(scope="module")
def lr_tif(isbi, tmp_path_factory):
    p = tmp_path_factory.mktemp("in") / "lr.tif"
    tifffile.imwrite(p, isbi[:2, :150, :170])
    return p


def _run(lr_tif, model_path, out, monkeypatch, threads: int, **kw):
    monkeypatch.setenv("PSSR_IO_THREADS", str(threads))
    return restore(
        lr_tif, model=str(model_path), output=str(out), tile=32, batch=4, fidelity=True, progress=False, **kw
    )


def test_many_io_threads_write_the_same_bytes_as_one(lr_tif, model_path, tmp_path, monkeypatch):
    _run(lr_tif, model_path, tmp_path / "one.ome.zarr", monkeypatch, 1)
    _run(lr_tif, model_path, tmp_path / "six.ome.zarr", monkeypatch, 6)
    one, six = _arrays(tmp_path / "one.ome.zarr"), _arrays(tmp_path / "six.ome.zarr")
    assert set(one) == set(six) and {"s0", "s1", "fidelity"} <= set(one)
    for k in one:
        np.testing.assert_array_equal(six[k], one[k], err_msg=k)
    assert verify_output(tmp_path / "six.ome.zarr", progress=False)["blocks"] > 8


def test_a_failed_block_write_among_parallel_ones_then_resume(lr_tif, model_path, tmp_path, monkeypatch):
    _run(lr_tif, model_path, tmp_path / "ref.ome.zarr", monkeypatch, 1)
    orig, calls, lock = store.write_block, [0], threading.Lock()

    def flaky(group, job, block, res, **kw):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 7:
            raise OSError(28, "No space left on device (injected)")
        return orig(group, job, block, res, **kw)

    monkeypatch.setattr(store, "write_block", flaky)
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(Exception, match="No space left"):
        _run(lr_tif, model_path, out, monkeypatch, 4)
    monkeypatch.setattr(store, "write_block", orig)
    _run(lr_tif, model_path, out, monkeypatch, 4)
    ref, got = _arrays(tmp_path / "ref.ome.zarr"), _arrays(out)
    assert set(ref) == set(got)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert verify_output(out, progress=False)["blocks"] > 8


def test_thread_map_keeps_order_and_raises_the_first_error_in_order():
    import time

    def f(i):
        time.sleep(0.01 * (5 - i % 5))  # later items finish first
        if i in (6, 3):
            raise ValueError(f"bad {i}")
        return i * i

    assert list(thread_map(lambda i: i * i, range(20), threads=4)) == [i * i for i in range(20)]
    got = []
    with pytest.raises(ValueError, match="bad 3"):
        for x in thread_map(f, range(10), threads=4):
            got.append(x)
    assert got == [0, 1, 4]
    assert [t for t in threading.enumerate() if t.name.startswith("pssr-io")] == []


def test_io_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv("PSSR_IO_THREADS", "3")
    assert io_threads() == 3
    monkeypatch.delenv("PSSR_IO_THREADS")
    assert 1 <= io_threads() <= 8
    monkeypatch.setenv("PSSR_IO_THREADS", "64")
    assert io_threads() == 64
    monkeypatch.setenv("PSSR_IO_THREADS", "0" * 5000 + "8")  # past int()'s digit limit: still 8
    assert io_threads() == 8
    for bad in ("0", "-2", "many", "65", "9999999999", "1_000", "\u0663", "1.5", "0x10"):
        monkeypatch.setenv("PSSR_IO_THREADS", bad)
        with pytest.raises(ValueError, match="PSSR_IO_THREADS"):
            io_threads()


def test_a_bad_thread_count_is_refused_before_any_output(lr_tif, model_path, tmp_path, monkeypatch):
    from pssr.errors import PssrError

    with pytest.raises(PssrError, match="PSSR_IO_THREADS='0' must be a whole number from 1 to 64"):
        _run(lr_tif, model_path, tmp_path / "o.ome.zarr", monkeypatch, 0)
    assert list(tmp_path.iterdir()) == []


def test_verify_refuses_a_bad_thread_count_first(tmp_path, monkeypatch):
    from pssr.blockwise.integrity import IntegrityError

    monkeypatch.setenv("PSSR_IO_THREADS", "0")
    with pytest.raises(IntegrityError, match="PSSR_IO_THREADS='0' must be a whole number from 1 to 64"):
        verify_output(tmp_path / "anything.ome.zarr", progress=False)
