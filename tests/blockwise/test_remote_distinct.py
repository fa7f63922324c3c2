"""An output URL is never the input URL, inside it or around it (s3://, gs://, http(s), mixed with
local paths): compared after normalising the key, refused before anything is read or deleted."""

import json

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import pssr
from pssr.blockwise.integrity import check_distinct
from pssr.errors import IntegrityError, PssrIOError
from pssr.io import remote


@pytest.mark.parametrize(
    "inp, out, how",
    [
        ("s3://bkt/k2.ome.zarr", "s3://bkt/k2.ome.zarr", "is"),
        ("s3://bkt/k2.ome.zarr", "s3://bkt/k2.ome.zarr/", "is"),
        ("s3://bkt//k2.ome.zarr", "s3://bkt/k2.ome.zarr", "is"),
        ("gcs://bkt/k2.ome.zarr", "gs://bkt/k2.ome.zarr", "is"),
        ("s3://bkt/in.zarr", "precomputed://s3://bkt/in.zarr", "is"),
        ("s3://bkt/outer.ome.zarr/raw/in.zarr", "s3://bkt/outer.ome.zarr", "contains"),
        ("s3://bkt/outer.ome.zarr/raw/in.zarr", "s3://bkt/outer.ome.zarr/o.zarr", "lies inside"),
        ("s3://bkt/data/raw/in.zarr", "s3://bkt/data", "contains"),
        ("s3://bkt/in2.zarr", "s3://bkt/in2.zarr/out.ome.zarr", "lies inside"),
        ("s3://bkt/in2.zarr", "s3://bkt/in2.zarr//out.ome.zarr", "lies inside"),
        ("s3://bkt/x.ome.zarr/s0", "s3://bkt/x.ome.zarr/s9.ome.zarr", "lies inside"),
        ("https://bkt.s3.amazonaws.com/in.zarr", "s3://bkt/in.zarr/o.ome.zarr", "lies inside"),
        ("https://storage.googleapis.com/bkt/in.zarr", "gs://bkt/in.zarr", "is"),
        ("http://127.0.0.1:9/bkt/in.zarr", "s3://bkt/in.zarr", "is"),  # on the endpoint in use
    ],
)
def test_overlapping_urls_are_refused(inp, out, how, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(IntegrityError, match=f"{how} .*never does"):
        check_distinct([inp], [out])


@pytest.mark.parametrize(
    "inp, out",
    [
        ("s3://bkt/in2.zarr", "s3://bkt/in2.zarr2.ome.zarr"),  # a longer name, not inside
        ("s3://bkt/in.zarr", "s3://other/in.zarr"),
        ("s3://bkt/in.zarr", "gs://bkt/in.zarr"),
        ("http://elsewhere:9/bkt/in.zarr", "s3://bkt/in.zarr"),  # not the endpoint in use
        ("/tmp/bkt/in.zarr", "s3://bkt/in.zarr"),  # a local path and a URL never overlap
        ("s3://bkt/in.zarr", "bkt/in.zarr"),
    ],
)
def test_distinct_urls_pass(inp, out, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    check_distinct([inp], [out])


@pytest.mark.parametrize("out", ["s3://bkt/in2.zarr/./o.ome.zarr", "s3://bkt/a/../in2.zarr/o.ome.zarr"])
def test_dot_segments_are_a_clear_error(out):
    with pytest.raises(PssrIOError, match=r"'\.' or '\.\.' segment.*write it without them"):
        check_distinct(["s3://bkt/in2.zarr"], [out])
    with pytest.raises(PssrIOError, match="segment"):
        pssr.restore(np.zeros((8, 8), "u1"), model="bilinear:2", output=out, progress=False)


_SEG = st.sampled_from(["a", "b", "a.zarr", "c.ome.zarr"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_SEG, min_size=1, max_size=4),
    st.lists(_SEG, min_size=1, max_size=4),
    st.lists(st.sampled_from(["/", "//"]), min_size=8, max_size=8),
    st.booleans(),
)
def test_url_pairs_refused_exactly_when_they_overlap(a, b, seps, trailing):
    def url(segs, off):
        return (
            "s3://bkt/"
            + "".join(s + seps[(off + n) % 8] for n, s in enumerate(segs))[: -1 if not trailing else None]
        )

    zs = [n for n, s in enumerate(a[:-1]) if s.endswith(".zarr")]
    guard = a[: zs[0] + 1] if zs else a  # the input's zarr container, or the input itself
    overlap = b[: len(guard)] == guard or guard[: len(b)] == b
    try:
        check_distinct([url(a, 0)], [url(b, 3)])
        refused = False
    except IntegrityError:
        refused = True
    assert refused == overlap


def test_s3_output_over_its_own_input_is_refused_and_the_input_kept(s3, tmp_path, monkeypatch, model_path):
    monkeypatch.setenv("PSSR_WORK_DIR", str(tmp_path / "staging"))
    v = np.arange(2 * 32 * 32, dtype=np.uint8).reshape(2, 32, 32)
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=v.shape, chunks=(1, 32, 32), dtype=v.dtype)
    z[:] = v
    url = s3.upload(tmp_path / "in.zarr", "dist/outer.ome.zarr/raw/in.zarr")
    before = sorted(s3.keys("dist/"))
    for out in (url, s3.url("dist/outer.ome.zarr"), url + "//o.ome.zarr", s3.url("dist/outer.ome.zarr/")):
        with pytest.raises(IntegrityError, match="never does"):
            pssr.restore(url, model=model_path, output=out, overwrite=True, axes="ZYX", progress=False)
    assert sorted(s3.keys("dist/")) == before
    got = zarr.open_array(remote.zarr_store(url), mode="r")[...]
    assert np.array_equal(got, v)


@pytest.mark.parametrize(
    "so, match",
    [
        ({"client_kwargs": {"region": "us-east-1"}}, r"client_kwargs key 'region' .*'region_name'"),
        ({"client_kwargs": {"regin_name": "us-east-1"}}, r"client_kwargs key 'regin_name'"),
        ({"client_kwargs": "us-east-1"}, r"client_kwargs must be a JSON object"),
    ],
)
def test_bad_nested_client_kwargs_are_named_reading_and_writing(s3, tmp_path, monkeypatch, so, match):
    monkeypatch.setenv("PSSR_WORK_DIR", str(tmp_path / "staging"))
    v = np.arange(2 * 32 * 32, dtype=np.uint8).reshape(2, 32, 32)
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=v.shape, chunks=(1, 32, 32), dtype=v.dtype)
    z[:] = v
    url = s3.upload(tmp_path / "in.zarr", "so/in.zarr")
    so = {**so, "endpoint_url": s3.endpoint}
    for src, out in ((url, None), (tmp_path / "in.zarr", s3.url("so/o.ome.zarr"))):
        with pytest.raises(PssrIOError, match=match):
            pssr.restore(src, model="bilinear:2", output=out, axes="ZYX", progress=False, storage_options=so)
        with pytest.raises(PssrIOError, match=match):  # the JSON text of the command line too
            pssr.restore(
                src,
                model="bilinear:2",
                output=out,
                axes="ZYX",
                progress=False,
                storage_options=json.dumps(so),
            )
    assert not s3.keys("so/o.ome.zarr")
    with pytest.raises(PssrIOError, match=match):
        pssr.io.read_image(url, storage_options=so)


def _denied(path="o.ome.zarr/zarr.json"):
    from obstore.exceptions import PermissionDeniedError

    return PermissionDeniedError(
        f"The operation lacked the necessary privileges to complete for path {path}: Client error with "
        "status 403 Forbidden: <Error><Code>AccessDenied</Code></Error>"
    )


def test_object_store_access_errors_anywhere_in_a_run_are_one_line(s3, tmp_path, monkeypatch, capsys):
    # Found by the adversarial probe: a 403 on a GET after a successful PUT (an anonymous run on a
    # bucket refusing anonymous reads) ended in 'internal error: PermissionDeniedError', exit 3.
    from pssr.blockwise.publish import Target
    from pssr.cli.app import main

    monkeypatch.setenv("PSSR_WORK_DIR", str(tmp_path / "staging"))
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=(2, 32, 32), chunks=(1, 32, 32), dtype="u1")
    z[:] = 7

    def begin(self, **kw):
        raise RuntimeError("wrapped") from _denied("deny/o.ome.zarr/zarr.json")

    monkeypatch.setattr(Target, "begin", begin)
    out = s3.url("deny/o.ome.zarr")
    rc = main(["predict", str(tmp_path / "in.zarr"), out, "--model", "bilinear:2", "--axes", "ZYX"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert (
        err[-1].startswith("pssr: error: cannot read or write") and out in err[-1] and "HTTP 403" in err[-1]
    )
    assert "internal error" not in "\n".join(err)


def test_explained_names_the_url_of_the_key_and_passes_the_rest():
    from obstore.exceptions import NotFoundError

    with pytest.raises(PssrIOError, match=r"'s3://b/in\.zarr': HTTP 403 AccessDenied: access denied"):
        with remote.explained("s3://b/out.ome.zarr", "s3://b/in.zarr"):
            raise _denied("in.zarr/zarr.json")
    with pytest.raises(PssrIOError, match=r"'s3://b/out\.ome\.zarr': HTTP 404: not found"):
        with remote.explained("s3://b/out.ome.zarr", None):
            raise NotFoundError("Object at location x not found")
    with pytest.raises(ValueError):  # no object-store error in it: unchanged
        with remote.explained("s3://b/out.ome.zarr"):
            raise ValueError("x")
    with pytest.raises(IntegrityError):  # pssr's own error, even with a 403 under it: unchanged
        with remote.explained("s3://b/out.ome.zarr"):
            try:
                raise _denied()
            except Exception:
                raise IntegrityError("mine") from None


def test_an_s3_output_run_leaves_no_temporary_folder(s3, tmp_path, monkeypatch):
    # Found by the adversarial probe: every S3-output run left an empty /tmp/pssr-input-* folder.
    import tempfile

    monkeypatch.setenv("PSSR_WORK_DIR", str(tmp_path / "staging"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=(2, 32, 32), chunks=(1, 32, 32), dtype="u1")
    z[:] = 7
    res = pssr.restore(
        str(tmp_path / "in.zarr"), model="bilinear:2", output=s3.url("tmpdir/o.ome.zarr"), axes="ZYX",
        progress=False,
    )  # fmt: skip
    assert res.summary["blocks"] == 2
    assert not list((tmp_path / "tmp").glob("pssr-input-*"))
