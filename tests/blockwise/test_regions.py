"""Regions: parsing, cropped outputs placed where they lie, full-size outputs filled by several runs."""

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pssr.blockwise.integrity import LockedError, RegionClaims
from pssr.blockwise.predict import PredictError, restore
from pssr.blockwise.regions import parse_region, parse_world_region, snap
from pssr.blockwise.store import done_blocks
from pssr.blockwise.verify import verify_output
from pssr.io import formats as io

KW = dict(model="bilinear:4", tile=16, progress=False)


def test_parse_pixel_regions():
    shape = (10, 300, 200)
    assert parse_region("2:5,0:64,10:20", "ZYX", shape) == ((2, 5), (0, 64), (10, 20))
    assert parse_region("0:64,:", "ZYX", shape) == ((0, 10), (0, 64), (0, 200))  # the last axes
    assert parse_region("z=3:,x=:50", "ZYX", shape) == ((3, 10), (0, 300), (0, 50))
    assert parse_region("0:1000,0:1000", "YX", (300, 200)) == ((0, 300), (0, 200))  # clipped
    for bad, msg in [
        ("1:2,3:4,5:6,7:8", "4 ranges"),
        ("a:b", "whole input pixels"),
        ("5:5", "selects no pixel"),
        ("400:500,0:10", "selects no pixel"),
        ("q=0:4", "not an axis"),
        ("z=0:4,0:5", "mixes"),
        ("", "empty"),
        ("-3:5", "negative"),
    ]:
        with pytest.raises(PredictError, match=msg):
            parse_region(bad, "ZYX", shape)


def test_parse_world_regions_in_the_inputs_units_and_with_suffixes():
    shape, axes = (10, 300, 200), "ZYX"
    scale, origin = {"Z": 0.05, "Y": 0.004, "X": 0.004}, {"Y": 1.0}
    # pixel centres: y_j = 1.0 + 0.004 j; [1.2, 1.4) holds j = 50 .. 99
    got = parse_world_region("y=1.2:1.4", axes, shape, scale, origin, "micrometer")
    assert got == ((0, 10), (50, 100), (0, 200))
    assert parse_world_region("y=1200nm:1.4um,z=0.1:0.2", axes, shape, scale, origin, "micrometer") == (
        (2, 4),
        (50, 100),
        (0, 200),
    )
    with pytest.raises(PredictError, match="needs the input's unit"):
        parse_world_region("y=1um:2um", axes, shape, {}, {}, None)
    with pytest.raises(PredictError, match="unknown length unit"):
        parse_world_region("y=1parsec:2parsec", axes, shape, scale, origin, "micrometer")
    # uncalibrated: world = pixels
    assert parse_world_region("x=10:20", axes, shape, {}, {}, None)[2] == (10, 20)


def test_snap_grows_yx_to_the_block_grid_only():
    assert snap(((2, 5), (20, 50), (33, 70)), 16, (10, 100, 90)) == ((2, 5), (16, 64), (32, 80))
    assert snap(((0, 1), (90, 100), (0, 90)), 16, (1, 100, 90)) == ((0, 1), (80, 100), (0, 90))


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    d = tmp_path_factory.mktemp("regions")
    x = (np.random.default_rng(0).random((3, 100, 90)) * 255).astype(np.uint8)
    scale = {"Z": 0.05, "Y": 0.01, "X": 0.01}
    src = io.write_ome_zarr(d / "in.ome.zarr", x, axes="ZYX", scale=scale, unit="micrometer")
    whole = restore(str(src), output=d / "whole.ome.zarr", **KW)
    g = zarr.open_group(str(d / "whole.ome.zarr"), mode="r")
    levels = {k: np.asarray(a[...]) for k, a in g.arrays() if k.startswith("s") and k[1:].isdigit()}
    return src, levels, whole


def test_cropped_output_equals_the_crop_and_overlays_the_input(vol, tmp_path):
    src, levels, whole = vol
    r = restore(str(src), output=tmp_path / "c.ome.zarr", region="1:3,20:50,33:70", **KW)
    # grown to the block grid: y 16:64, x 32:80 (LR) -> HR x4
    np.testing.assert_array_equal(np.asarray(r.output[...]), levels["s0"][1:3, 64:256, 128:320])
    img = io.read_image(tmp_path / "c.ome.zarr")
    full = io.read_image(whole.path)
    for a, start in (("Z", 1), ("Y", 64), ("X", 128)):  # output pixel 0 is the whole output's pixel `start`
        assert img.origin.get(a, 0.0) == pytest.approx(full.origin.get(a, 0.0) + start * full.scale[a])
    verify_output(tmp_path / "c.ome.zarr", progress=False)
    # world coordinates select the same blocks; a TIFF output carries the origin too
    t = restore(str(src), output=tmp_path / "c.tif", region_world="z=0.05:0.15,y=0.2:0.5,x=0.33:0.7", **KW)
    np.testing.assert_array_equal(tifffile.imread(t.path), levels["s0"][1:3, 64:256, 128:320])
    assert io.read_image(tmp_path / "c.tif").origin["Y"] == pytest.approx(img.origin["Y"])


def test_a_different_region_into_a_cropped_output_is_refused(vol, tmp_path):
    src, _, _ = vol
    restore(str(src), output=tmp_path / "c.ome.zarr", region="0:32,0:32", **KW)
    with pytest.raises(PredictError, match="already exists"):
        restore(str(src), output=tmp_path / "c.ome.zarr", region="0:32,32:64", **KW)
    with pytest.raises(PredictError, match="full_output.*ome.zarr"):
        restore(str(src), output=tmp_path / "c.tif", region="0:32", full_output=True, **KW)


RUN = """
import sys
import time
import pssr.blockwise.predict as P
import pssr.blockwise.store as S
orig = S.write_block
def slow(*a, **k):  # slow enough that the two runs write at the same time
    time.sleep(0.03)
    return orig(*a, **k)
S.write_block = slow
src, out, region = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    r = P.restore(src, model="bilinear:4", output=out, tile=16, progress=False, region=region or None,
                  full_output=True)
    print("ok", r.summary.get("complete", True), r.summary["blocks"])
except Exception as e:
    print(type(e).__name__, str(e).splitlines()[0])
"""


def _start(src, out, region):
    return subprocess.Popen([sys.executable, "-c", RUN, str(src), str(out), region], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip


def test_two_processes_fill_two_regions_at_once_byte_identical(vol, tmp_path):
    src, levels, _ = vol
    out = tmp_path / "full.ome.zarr"
    procs = [_start(src, out, r) for r in (":,0:48,:", ":,48:,:")]
    lines = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert all(line.startswith("ok") for line in lines), lines
    assert sorted(line.split()[1] for line in lines) == ["False", "True"]  # the last one finished it
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["pssr"]["status"] == "complete"
    for k, ref in levels.items():
        np.testing.assert_array_equal(np.asarray(g[k][...]), ref, err_msg=k)
    verify_output(out, progress=False)
    assert not list(tmp_path.glob(".*pssr*")) and not (out / ".pssr" / "done").exists()


def test_overlapping_regions_are_refused_and_a_dead_claim_is_taken_over(vol, tmp_path):
    src, levels, _ = vol
    out = tmp_path / "full.ome.zarr"
    claims = RegionClaims(out)
    c = claims.claim([[0, 3], [0, 48], [0, 90]], full_output=True, overwrite=False, describe=str)
    with pytest.raises(LockedError, match="overlaps"):
        restore(str(src), output=out, region=":,32:64,:", full_output=True, **KW)
    with pytest.raises(LockedError, match="only runs with --full-output"):
        restore(str(src), output=out, region=":,64:,:", **KW)  # a cropped run may not share it
    r = restore(str(src), output=out, region=":,48:,:", full_output=True, **KW)  # no overlap: runs
    assert r.summary["complete"] is False and r.summary["other_runs_writing"] is True
    claims.release(c)
    # a claim left by a killed run (dead pid) is dropped
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = claims.claim([[0, 3], [0, 100], [0, 90]], full_output=True, overwrite=False, describe=str)
    stale.write_text(stale.read_text().replace(f'"pid": {__import__("os").getpid()}', f'"pid": {dead.pid}'))
    r = restore(str(src), output=out, region=":,:48,:", full_output=True, **KW)
    assert r.summary["region_blocks"] == 3 * 3 * 6 and r.summary["blocks"] == 3 * 7 * 6  # it finished
    assert not (out / ".pssr" / "done").exists() and done_blocks(str(out)) == {}
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["pssr"]["status"] == "complete"
    np.testing.assert_array_equal(np.asarray(g["s0"][...]), levels["s0"])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    z=st.tuples(st.integers(0, 2), st.integers(1, 3)).filter(lambda t: t[0] < t[1]),
    y=st.tuples(st.integers(0, 99), st.integers(1, 100)).filter(lambda t: t[0] < t[1]),
    x=st.tuples(st.integers(0, 89), st.integers(1, 90)).filter(lambda t: t[0] < t[1]),
    full=st.booleans(),
)
def test_any_region_equals_the_same_crop_of_a_whole_run(vol, tmp_path_factory, z, y, x, full):
    """Byte for byte, at level 0 and every pyramid level whose chunks the region covers."""
    src, levels, _ = vol
    out = tmp_path_factory.mktemp("prop") / "o.ome.zarr"
    r = restore(
        str(src), output=out, region=f"{z[0]}:{z[1]},{y[0]}:{y[1]},{x[0]}:{x[1]}", full_output=full, **KW
    )
    (z0, z1), (y0, y1), (x0, x1) = snap((z, y, x), 16, (3, 100, 90))
    g = zarr.open_group(str(out), mode="r")
    for k, ref in levels.items():
        f = 4 // 2 ** int(k[1:])  # HR pixels per LR pixel at this level (4, 2, 1, ...)
        if k not in g:
            continue
        arr = np.asarray(g[k][...])
        if full:  # the region's part of the full-size output: chunks it covers entirely
            c = g[k].chunks[-1]
            ya, yb = -(-y0 * f // c) * c, (y1 * f // c * c if y1 < 100 else ref.shape[-2])
            xa, xb = -(-x0 * f // c) * c, (x1 * f // c * c if x1 < 90 else ref.shape[-1])
            if f < 1 or ya >= yb or xa >= xb:
                continue
            np.testing.assert_array_equal(arr[z0:z1, ya:yb, xa:xb], ref[z0:z1, ya:yb, xa:xb], err_msg=k)
        else:  # a cropped output's own pyramid: equal where its pixel grid is the whole run's
            if f == 0 or (y0 * 4) % (4 // f) or (x0 * 4) % (4 // f):
                continue
            ya, xa = y0 * f, x0 * f
            np.testing.assert_array_equal(
                arr, ref[z0:z1, ya : ya + arr.shape[-2], xa : xa + arr.shape[-1]], err_msg=k
            )
    assert r.path is not None


def test_regions_of_a_sparse_volume_fill_a_full_output_like_one_run(tmp_path):
    """Skipped blocks (no input data) on both sides of a region's edge: the pyramid above the edge
    waits for the other region's blocks, the result is the whole run's at every level."""
    z = zarr.open_array(
        str(tmp_path / "in.zarr"), mode="w", shape=(2, 256, 256), chunks=(1, 32, 32), dtype="uint8"
    )
    rng = np.random.default_rng(3)
    for p, y, x in [(0, 0, 0), (0, 96, 96), (0, 128, 160), (1, 224, 32), (1, 120, 120)]:
        z[p, y : y + 32, x : x + 32] = rng.integers(1, 255, (32, 32), dtype=np.uint8)
    kw = dict(model="bilinear:4", tile=32, progress=False)
    whole = restore(str(tmp_path / "in.zarr"), output=tmp_path / "w.ome.zarr", **kw)
    assert whole.summary.get("skipped_blocks", 0) > 0
    out = tmp_path / "f.ome.zarr"
    a = restore(str(tmp_path / "in.zarr"), output=out, region=":,:128,:", full_output=True, **kw)
    assert a.summary["complete"] is False
    restore(str(tmp_path / "in.zarr"), output=out, region=":,128:,:", full_output=True, **kw)
    ref, got = zarr.open_group(str(tmp_path / "w.ome.zarr"), mode="r"), zarr.open_group(str(out), mode="r")
    assert got.attrs["pssr"]["status"] == "complete"
    for k in ("s0", "s1", "s2", "s3"):
        np.testing.assert_array_equal(np.asarray(got[k][...]), np.asarray(ref[k][...]), err_msg=k)
    verify_output(out, progress=False)
