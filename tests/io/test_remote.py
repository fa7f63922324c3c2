"""Inputs where they lie: zarr / OME-Zarr / N5 / precomputed on a real S3 server (moto) and an HTTP
server on loopback, HDF5 datasets, clear one-line errors, and transient faults retried and counted."""

import json
import sys

import numpy as np
import pytest
import zarr

import pssr
from pssr.errors import PssrIOError
from pssr.io import read_image, remote, write_ome_zarr

pytest.importorskip("obstore")
ts = pytest.importorskip("tensorstore")
h5py = pytest.importorskip("h5py")

SCALE = {"Z": 40.0, "Y": 8.0, "X": 8.0}


@pytest.fixture(scope="module")
def vol():
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:3, 0:48, 0:56]
    v = 100 + 60 * np.sin(x / 5.0 + z) * np.cos(y / 7.0) + rng.normal(0, 8, (3, 48, 56))
    return np.clip(v, 0, 255).astype(np.uint8)


def _zarr(path, vol, fmt=3):
    z = zarr.create_array(str(path), shape=vol.shape, chunks=(1, 16, 16), dtype=vol.dtype, zarr_format=fmt)
    z[:] = vol
    return path


def _n5(path, vol, attrs=None):
    meta = {"dimensions": list(vol.shape[::-1]), "blockSize": [16, 16, 1], "dataType": "uint8"}
    meta.update(compression={"type": "gzip"}, **(attrs or {}))
    t = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path) + "/"}, "create": True,
                 "metadata": meta}).result()  # fmt: skip
    t.write(vol.T).result()
    return path


def _precomputed(path, vol, offset=(0, 0, 0), res=(8, 8, 40), chunk=(16, 16, 1)):
    t = ts.open({
        "driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path) + "/"},
        "create": True, "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
        "scale_metadata": {"size": list(vol.shape[::-1]), "resolution": list(res), "encoding": "raw",
                           "chunk_size": list(chunk), "voxel_offset": list(offset)},
    }).result()  # fmt: skip
    t[ts.d["channel"][0]].translate_to[0, 0, 0].write(vol.T).result()
    return path


def _h5(path, vol):
    with h5py.File(path, "w") as f:
        d = f.create_dataset("volumes/raw", data=vol, chunks=(1, 16, 16))
        d.attrs["resolution"] = [40, 8, 8]
        d.attrs["offset"] = [80, 0, 0]
    return f"{path}:/volumes/raw"


def _restore(src, model_path, **kw):
    return pssr.restore(src, model=model_path, tile=32, progress=False, empty_threshold=0, **kw)


def test_s3_zarr_v2_v3_and_ome_zarr_read_as_local(s3, tmp_path, vol):
    for fmt in (2, 3):
        local = _zarr(tmp_path / f"v{fmt}.zarr", vol, fmt)
        img = read_image(s3.upload(local, f"in/v{fmt}.zarr"))
        assert isinstance(img.data, zarr.Array) and img.axes == "ZYX"
        assert np.array_equal(img.data[...], vol)
        assert np.array_equal(img.data[1, 5:30, 7:40], vol[1, 5:30, 7:40])
    ome = write_ome_zarr(tmp_path / "v.ome.zarr", vol, axes="ZYX", scale=SCALE, unit="nanometer",
                         origin={"Z": 80.0, "Y": 16.0, "X": -8.0}, chunks=(1, 16, 16))  # fmt: skip
    url = s3.upload(ome, "in/v.ome.zarr")
    a, b = read_image(url), read_image(ome)
    assert np.array_equal(a.data[...], b.data[...])
    assert (a.axes, a.scale, a.unit, a.origin) == (b.axes, b.scale, b.unit, b.origin)
    lvl = read_image(url + "/s0")  # a level opened by its URL keeps the image's calibration
    assert (lvl.scale, lvl.origin) == (b.scale, b.origin)


def test_s3_ome_zarr_restored_equal_to_local(s3, tmp_path, vol, model_path):
    ome = write_ome_zarr(tmp_path / "v.ome.zarr", vol, axes="ZYX", scale=SCALE, unit="nanometer",
                         origin={"Z": 80.0}, chunks=(1, 16, 16))  # fmt: skip
    url = s3.upload(ome, "r/v.ome.zarr")
    want = _restore(ome, model_path)
    got = _restore(url, model_path)
    assert np.array_equal(got.output, want.output)
    assert (got.scale, got.origin, got.unit) == (want.scale, want.origin, want.unit)
    assert got.summary["retries"] == 0


@pytest.mark.parametrize("kind", ["n5", "precomputed", "hdf5"])
def test_n5_precomputed_hdf5_restored_equal_to_local_zarr(s3, tmp_path, vol, model_path, kind):
    want = _restore(_zarr(tmp_path / "v.zarr", vol), model_path, axes="ZYX").output
    if kind == "n5":
        local = _n5(tmp_path / "v.n5", vol, {"pixelResolution": {"dimensions": [8, 8, 40], "unit": "nm"}})
        sources = [str(local), s3.upload(local, "fmt/v.n5")]
    elif kind == "precomputed":
        local = _precomputed(tmp_path / "v.precomputed", vol, offset=(3, 0, 2))
        sources = [str(local), s3.upload(local, "fmt/v.precomputed")]
    else:
        sources = [_h5(tmp_path / "v.h5", vol)]
    for src in sources:
        img = read_image(src)
        assert img.axes == "ZYX" and img.unit == "nanometer"
        assert img.scale == {"Z": 40.0, "Y": 8.0, "X": 8.0}, src
        assert np.array_equal(np.asarray(img.data[...]), vol), src
        if kind == "precomputed":  # the centre of voxel 0: (voxel_offset + 0.5) * resolution
            assert img.origin == {"X": 28.0, "Y": 4.0, "Z": 100.0}
        if kind == "hdf5":  # CREMI's offset, in nm
            assert img.origin["Z"] == 80.0
        res = _restore(src, model_path)
        assert np.array_equal(res.output, want), src
        assert res.scale == {"Z": 40.0, "Y": 4.0, "X": 4.0}


def test_http_zarr_and_precomputed(http_server, tmp_path, vol, model_path):
    root, base = http_server
    _zarr(root / "h.zarr", vol)
    _precomputed(root / "h.precomputed", vol, chunk=(64, 64, 1))  # tensorstore's http: ~30 ms a request here
    z = read_image(f"{base}/h.zarr")
    assert np.array_equal(z.data[...], vol)
    want = _restore(_zarr(tmp_path / "v.zarr", vol), model_path, axes="ZYX").output
    for src in (f"{base}/h.zarr", f"{base}/h.precomputed", f"precomputed://{base}/h.precomputed"):
        assert np.array_equal(_restore(src, model_path, axes="ZYX").output, want), src
    with pytest.raises(PssrIOError, match=r"HTTP 404.*not found") as e:
        read_image(f"{base}/missing.zarr")
    assert "\n" not in str(e.value) and f"{base}/missing.zarr" in str(e.value)


def test_missing_bucket_and_object_are_one_line(s3, tmp_path, capsys):
    from pssr.cli import main

    with pytest.raises(PssrIOError) as e:
        read_image("s3://no-such-bucket/v.zarr")
    msg = str(e.value)
    assert "'s3://no-such-bucket/v.zarr'" in msg and "HTTP 404 NoSuchBucket" in msg
    assert "bucket does not exist" in msg and "\n" not in msg
    for url in (s3.url("nothing-here.zarr"), s3.url("nothing-here.n5"), s3.url("nothing.precomputed")):
        with pytest.raises(PssrIOError, match="HTTP 404") as e:
            read_image(url)
        assert url in str(e.value) and "\n" not in str(e.value), str(e.value)
    rc = main(["--quiet", "predict", "s3://no-such-bucket/v.zarr", str(tmp_path / "o.ome.zarr")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "HTTP 404 NoSuchBucket" in err, err
    assert "Traceback" not in err
    # as an output too (found by the adversarial probe: the raw obstore text and its XML body)
    src = str(_zarr(tmp_path / "in.zarr", np.zeros((1, 32, 32), np.uint8)))
    rc = main(["--quiet", "predict", src, "s3://no-such-bucket/o.ome.zarr", "--model", "bilinear:4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "HTTP 404" in err and "no-such-bucket" in err, err


def test_access_denied_is_one_line(s3, fault_proxy, tmp_path, vol, monkeypatch):
    url = s3.upload(_zarr(tmp_path / "d.zarr", vol), "denied/d.zarr")
    _, ep = fault_proxy(p403=1.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ep)
    for src in (url, s3.url("denied/x.n5")):
        with pytest.raises(PssrIOError, match="HTTP 403") as e:
            read_image(src)
        assert src in str(e.value) and "\n" not in str(e.value) and "credentials" in str(e.value)


@pytest.mark.parametrize("fault", [{"p503": 0.2}, {"pdrop": 0.2}])
def test_transient_faults_are_retried_and_counted(
    s3, fault_proxy, tmp_path, vol, model_path, monkeypatch, fault
):
    monkeypatch.setattr(remote, "_BACKOFF", (0.001, 0.02))
    url = s3.upload(_zarr(tmp_path / "f.zarr", vol), "fault/f.zarr")
    want = _restore(url, model_path, axes="ZYX")
    proxy, ep = fault_proxy(seed=3, **fault)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ep)
    got = _restore(url, model_path, axes="ZYX")
    assert np.array_equal(got.output, want.output)
    assert proxy.faults > 3
    # obstore's own retries are off: every fault is seen, retried and counted once by pssr
    assert got.summary["retries"] == proxy.faults, (got.summary, proxy.stats)


def test_transient_faults_tensorstore(s3, fault_proxy, tmp_path, vol, model_path, monkeypatch):
    url = s3.upload(_precomputed(tmp_path / "f.precomputed", vol), "fault/f.precomputed")
    want = _restore(url, model_path)
    proxy, ep = fault_proxy(seed=5, p503=0.2, pdrop=0.1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ep)
    assert np.array_equal(_restore(url, model_path).output, want.output)
    assert proxy.faults > 3


def test_storage_options_never_stored_or_printed(s3, tmp_path, vol, model_path, monkeypatch, capsys, caplog):
    url = s3.upload(_zarr(tmp_path / "c.zarr", vol), "creds/c.zarr")
    secret = s3.env()["AWS_SECRET_ACCESS_KEY"]
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k)
    opts = {"endpoint_url": s3.endpoint, "key": "testing", "secret": secret}
    from pssr.cli import main

    out = tmp_path / "o.ome.zarr"
    rc = main(["predict", url, str(out), "--model", str(model_path), "--tile", "32", "--axes", "ZYX",
               "--storage-options", json.dumps(opts)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr()
    assert secret not in text.out + text.err + caplog.text
    for f in out.rglob("*"):
        if f.is_file() and f.name.endswith(".json"):
            assert secret not in f.read_text(), f
    job = json.loads((out / "zarr.json").read_text())
    assert secret not in json.dumps(job)
    local = _restore(_zarr(tmp_path / "l.zarr", vol), model_path, axes="ZYX").output
    assert np.array_equal(zarr.open_group(str(out), mode="r")["s0"][...], local)
    with pytest.raises(PssrIOError, match="not valid JSON") as e:
        pssr.restore(url, model=model_path, storage_options='{"secret": "s3cr3t"')
    assert "s3cr3t" not in str(e.value)


def test_missing_extra_is_named(tmp_path, vol, monkeypatch):
    local = _n5(tmp_path / "v.n5", vol)
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    with pytest.raises(PssrIOError, match=r"pssr-toolkit\[cloud\]"):
        read_image(str(local))
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(PssrIOError, match=r"pssr-toolkit\[cloud\]"):
        read_image(str(tmp_path / "x.h5:/raw"))


def test_uncalibrated_volume_warns(tmp_path, vol, caplog):
    img = read_image(str(_n5(tmp_path / "u.n5", vol)))
    assert img.scale == {} and "says nothing about its voxel size" in caplog.text


def test_lazy_volume_indexing_matches_numpy(tmp_path, vol):
    img = read_image(str(_precomputed(tmp_path / "i.precomputed", vol)))
    a = img.data
    for idx in [(1,), (slice(None), 3), (-1, slice(2, 40, 3), slice(None, None, 5)), (..., 7), (0, 47, 55),
                (slice(2, 1),), (Ellipsis,)]:  # fmt: skip
        assert np.array_equal(a[idx], vol[idx]), idx
    with pytest.raises(IndexError):
        a[3]


def test_elapsed_time_is_not_a_status():
    """obstore names the elapsed time: 'in 403.828µs' is a dropped connection, not an HTTP 403."""
    msg = "Generic S3 error: Error performing GET http://h/b/k in {} - HTTP error: error sending request"
    for t in ("403.828µs", "404ms", "401.2s"):
        assert remote.transient(Exception(msg.format(t))), t
    assert not remote.transient(Exception("Generic S3 error: ... HTTP status client error (403 Forbidden)"))
