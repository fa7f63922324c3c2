"""pssr's border rule: beyond the image's edges every block sees the image padded by the halo.

What bioimage.io packages declare (``pad`` and the halo) so that consumers reproduce ``pssr
predict`` at the edges: the restoration, whole or tiled, equals the network run once on the image
padded by the halo (:data:`pssr.nn.normalization.BORDER`) and cropped back.
"""

import numpy as np
import pytest
import torch

from pssr.blockwise.plan import Job, pad_block, padded_crop
from pssr.blockwise.predict import restore
from pssr.blockwise.tiling import Block, border_padding, plan_blocks
from pssr.nn.modelfile import load_model
from pssr.nn.normalization import BORDER, percentile_norm


def _network_on_padded(path, x: np.ndarray) -> np.ndarray:
    """The network once on the normalised image padded by the halo in BORDER mode, cropped back."""
    lm = load_model(path)
    lo, hi = percentile_norm(x, lm.normalization)
    h, s = lm.halo, lm.scale
    xp = np.pad((x - lo) / (hi - lo), ((0, 0), (h, h), (h, h)) if x.ndim == 3 else h, mode=BORDER)
    xp = xp if x.ndim == 3 else xp[None]
    with torch.no_grad():
        y = lm.net.float().eval()(torch.from_numpy(np.ascontiguousarray(xp, np.float32))[None])[0, 0].numpy()
    return y[h * s : -h * s, h * s : -h * s] * (hi - lo) + lo


@pytest.mark.parametrize("tile", [None, 16])
def test_restoration_is_the_network_on_the_padded_image(model_path, em_lr, tile):
    x = em_lr[1, :45, :52]  # odd height: the network pads it to its multiple itself
    out = restore(
        x, model=model_path, dtype="float32", tile=tile, device="cpu", backend="torch", progress=False
    )
    want = _network_on_padded(model_path, x)
    assert out.output.shape == want.shape
    # the edge band (the halo, 18 px: 36 output px) included; the old rule (the network's own zeros
    # at the image's edge) differed there by several percent of the range
    assert np.abs(out.output - want).max() <= 1e-5 * np.ptp(want)


def test_multiframe_centre_frame_is_the_network_on_the_padded_frames(mf_model_path, em_lr):
    x = em_lr[:3, :40, :44]
    out = restore(
        x, model=mf_model_path, axes="ZYX", dtype="float32", device="cpu", backend="torch", progress=False
    )
    want = _network_on_padded(mf_model_path, x)  # frames 0..2 around plane 1 (stats over all 3)
    assert np.abs(out.output[1] - want).max() <= 1e-5 * np.ptp(want)


def test_border_padding_is_what_the_clamp_cut():
    blocks = plan_blocks((50, 70), 16, 6, 2)
    for b in blocks:
        t, bt, l_, r = border_padding(b, 6)
        y0, y1, x0, x1 = b.core
        assert t == max(0, 6 - y0) and bt == max(0, y1 + 6 - 50)
        assert l_ == max(0, 6 - x0) and r == max(0, x1 + 6 - 70)


def test_pad_block_mirrors_the_image_and_the_crop_finds_the_core():
    img = np.arange(20 * 24, dtype=np.float32).reshape(1, 20, 24)
    job = Job(**{**_job_fields(), "halo": 4, "border": "reflect"})
    full = np.pad(img, ((0, 0), (4, 4), (4, 4)), mode="reflect")
    for b in plan_blocks((20, 24), 8, 4, 2):
        y0, y1, x0, x1 = b.read
        got = pad_block(img[:, y0:y1, x0:x1], job, b)
        cy0, cy1, cx0, cx1 = b.core
        np.testing.assert_array_equal(got, full[:, cy0 : cy1 + 8, cx0 : cx1 + 8])
        cy, cx = padded_crop(job, b)
        np.testing.assert_array_equal(got[:, cy, cx], img[:, cy0:cy1, cx0:cx1])
    old = Job(**{**_job_fields(), "halo": 4, "border": "zero"})  # jobs of older outputs: no padding
    b = Block((), (0, 8, 0, 8), (0, 12, 0, 12))
    assert pad_block(img[:, :12, :12], old, b).shape == (1, 12, 12)


def test_an_older_output_made_with_the_zero_border_is_not_resumed_with_another():
    job = Job(**_job_fields())
    older = {k: v for k, v in _job_fields().items() if k != "border"}
    assert job.differences(older) == {"border": ("zero", BORDER)}


def _job_fields() -> dict:
    return {
        "input": "x",
        "input_axes": "YX",
        "input_array": None,
        "model": "m",
        "scale": 2,
        "frames": 1,
        "context_axis": None,
        "lo": 0.0,
        "hi": 1.0,
        "full_scale": 1.0,
        "tile": 8,
        "halo": 4,
        "out": "o",
        "out_dtype": "float32",
    }
