"""Property-based tests (hypothesis) of the restore path's promises.

Over shapes (2D, 3D), dtypes, tiles, batch sizes, axes and interruption points:

* tiled == whole (every kept output pixel saw the input it would see in one pass);
* resumed == uninterrupted on every level and side array of an OME-Zarr output;
* the input's bytes are unchanged;
* every pyramid level is the 2x2 mean of the level below, and ``verify_output`` passes.
"""

import hashlib

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pssr.blockwise import store
from pssr.blockwise.predict import restore
from pssr.blockwise.tiling import plan_blocks
from pssr.blockwise.verify import verify_output
from pssr.io import formats as io
from pssr.io import pyramid

SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from pssr.degrade.crappify import get_preset
    from pssr.nn.model import ModelConfig, build_model
    from pssr.nn.modelfile import save_model

    torch.manual_seed(2)
    cfg = ModelConfig(scale=2, in_channels=1, size="small", widths=(8, 16), blocks=1)
    net = build_model(cfg)
    with torch.no_grad():
        net.out.weight.mul_(10)
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    return str(save_model(path, net, cfg, {"crappifier": get_preset("pssr-em", 2).to_dict()}))


@pytest.fixture(scope="module")
def real(isbi):
    return isbi[:3, :80, :90]


def _cut(real, lead, h, w, dtype):
    a = real[:lead, :h, :w] if lead else real[0, :h, :w]
    if dtype == "uint16":
        return a.astype(np.uint16) * 257
    if dtype == "float32":
        return a.astype(np.float32) / 255
    return a.copy()


shapes = st.tuples(st.sampled_from([0, 2, 3]), st.integers(9, 56), st.integers(9, 64))
dtypes = st.sampled_from(["uint8", "uint16", "float32"])


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
@SETTINGS
@given(shape=shapes, dtype=dtypes, tile=st.sampled_from([4, 8, 12, 20, 64]), batch=st.integers(1, 5))
def test_tiled_equals_whole(tiny, real, shape, dtype, tile, batch):
    x = _cut(real, *shape, dtype)
    kw = {"model": tiny, "dtype": "float32", "progress": False, "empty_threshold": 0}
    whole = restore(x, tile=256, **kw).output
    tiled = restore(x, tile=tile, batch=batch, **kw).output
    assert tiled.shape == whole.shape == (*x.shape[:-2], 2 * x.shape[-2], 2 * x.shape[-1])
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-4 * float(np.ptp(whole)) + 1e-6)


@SETTINGS
@given(
    shape=shapes,
    dtype=dtypes,
    tile=st.sampled_from([8, 16, 24]),
    batch=st.integers(1, 4),
    stop=st.floats(0.0, 0.95),
    extras=st.sampled_from([(), ("fidelity",), ("tta",)]),
    axes3=st.sampled_from(["ZYX", "TYX"]),
)
@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_resumed_equals_uninterrupted_on_every_level(
    tiny, real, tmp_path_factory, shape, dtype, tile, batch, stop, extras, axes3
):
    d = tmp_path_factory.mktemp("p")
    x = _cut(real, *shape, dtype)
    axes = axes3 if x.ndim == 3 else "YX"
    src = io.write_tiff(d / "in.tif", x, axes=axes)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    kw = {
        "model": tiny,
        "tile": tile,
        "batch": batch,
        "progress": False,
        "fidelity": "fidelity" in extras,
        "tta": "tta" in extras,
        "noise": "model",
    }
    ref = d / "ref.ome.zarr"
    restore(str(src), output=ref, **kw)
    out = d / "out.ome.zarr"
    n_blocks = len(plan_blocks(x.shape, tile, 0))
    n_stop = 1 + int(stop * (n_blocks - 1))  # always before the run could finish
    with pytest.raises(InterruptedError):
        restore(str(src), output=out, callback=lambda done, n: done < n_stop, **kw)
    restore(str(src), output=out, **kw)  # the same command again
    gr = {**dict(zarr.open_group(str(ref), mode="r").arrays()), **store.open_arrays(ref)}
    go = {**dict(zarr.open_group(str(out), mode="r").arrays()), **store.open_arrays(out)}
    names = sorted(gr)
    assert names == sorted(go)
    for k in names:
        np.testing.assert_array_equal(go[k][...], gr[k][...], err_msg=k)
    levels = [np.asarray(go[f"s{i}"][...]) for i in range(len([n for n in names if n.startswith("s")]))]
    for below, level in zip(levels, levels[1:]):
        np.testing.assert_array_equal(level, pyramid.downsample2(below, level.dtype))
    verify_output(out, progress=False)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert io.read_image(out).axes == axes


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 200), st.integers(1, 200)),
    chunks=st.tuples(st.integers(1, 70), st.integers(1, 70)),
)
def test_pyramid_chunks_cover_each_target_once(shape, chunks):
    lead, h, w = shape
    full = (lead, h // 2, w // 2) if lead else (h // 2, w // 2)
    if 0 in full:
        return
    ck = ((1,) if lead else ()) + chunks
    seen = np.zeros(full, np.int32)
    for region in pyramid.chunk_regions(full, ck):
        seen[region] += 1
        src = pyramid.source_region(region)
        assert src[-2].stop <= h and src[-1].stop <= w
    assert (seen == 1).all()
