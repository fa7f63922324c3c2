"""pssr.training.losses: the in-domain feature loss (and its shipped network) and the adversarial losses."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.ndimage import gaussian_filter

from pssr.errors import PssrError
from pssr.training.losses import (
    FEATURE_NET,
    FeatureLoss,
    critic_loss,
    default_feature_loss,
    file_sha256,
    generator_adversarial_loss,
    gram,
    load_feature_net,
    loss_fn,
)


@pytest.fixture(scope="module")
def em_crop(isbi) -> np.ndarray:
    """A real ssTEM section, percentile-normalised as training targets are (1st-99.8th -> 0-1)."""
    a = isbi[27, 128:256, 128:256].astype(np.float32)
    lo, hi = np.percentile(a, [1, 99.8])
    return (a - lo) / (hi - lo)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None]


def test_feature_loss_is_zero_for_identical_images_and_grows_with_blur(em_crop):
    fl = default_feature_loss()
    y = _t(em_crop)
    assert float(fl(y.clone(), y)) == 0.0
    losses = [float(fl(_t(gaussian_filter(em_crop, s)), y)) for s in (0.5, 1.0, 2.0, 4.0)]
    assert losses[0] > 0
    assert all(a < b for a, b in zip(losses, losses[1:], strict=False)), losses
    # It sees structure, not only intensity: blur (same mean) costs more than a small brightness shift.
    assert losses[2] > float(fl(y + 0.02, y))


def test_feature_loss_is_differentiable_and_its_network_frozen(em_crop):
    fl = default_feature_loss()
    pred = _t(gaussian_filter(em_crop, 2.0)).requires_grad_(True)
    loss = loss_fn("l1+feature", pred, _t(em_crop), features=fl, feature_weight=0.5)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in fl.net.parameters())
    fl.train()
    assert not fl.net.training  # the feature network stays in eval mode


def test_feature_weight_and_style_term(em_crop):
    y, blurred = _t(em_crop), _t(gaussian_filter(em_crop, 2.0))
    l1 = float(loss_fn("l1", blurred, y))
    feat = float(loss_fn("feature", blurred, y))
    both = float(loss_fn("l1+feature", blurred, y, feature_weight=0.25))
    assert both == pytest.approx(l1 + 0.25 * feat, rel=1e-5)
    with_style = float(default_feature_loss(style_weight=1.0)(blurred, y))
    assert with_style > feat
    assert float(default_feature_loss(style_weight=1.0)(y, y)) == 0.0


def test_feature_loss_on_several_channels_compares_each(em_crop):
    y = _t(em_crop).repeat(2, 3, 1, 1)
    pred = y.clone()
    pred[1, 2] = _t(gaussian_filter(em_crop, 2.0))[0, 0]
    fl = default_feature_loss()
    assert float(fl(pred, y)) > 0 and float(fl(y, y)) == 0.0


def test_gram_shape_and_normalisation():
    f = torch.ones(2, 4, 8, 8)
    g = gram(f)
    assert g.shape == (2, 4, 4)
    assert torch.allclose(g, torch.full_like(g, 1 / 4))


def test_shipped_feature_net_is_small_safetensors_with_its_record():
    assert FEATURE_NET.stat().st_size < 2e6
    with open(FEATURE_NET, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # a safetensors header, not a pickle
        json.loads(f.read(n))
    with safe_open(str(FEATURE_NET), "pt") as f:
        meta = json.loads(f.metadata()["pssr_features"])
    for key in ("name", "widths", "layer_scale", "trained_on", "data_sources", "training"):
        assert key in meta, key
    assert len(meta["widths"]) >= 3 and len(meta["layer_scale"]) == len(meta["widths"])
    assert any(s.startswith("em/") for s in meta["trained_on"]) and any(
        s.startswith("fluo/") for s in meta["trained_on"]
    )
    net, loaded = load_feature_net()
    assert loaded["sha256"] == file_sha256(FEATURE_NET)
    assert [f.shape[1] for f in net(torch.zeros(1, 1, 32, 32))] == meta["widths"]


def test_feature_net_errors(tmp_path):
    with pytest.raises(PssrError, match="does not exist.*train_feature_net.py"):
        load_feature_net(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"pssr": "{}"})
    with pytest.raises(PssrError, match="is not a pssr feature network"):
        load_feature_net(other)
    net, meta = load_feature_net()
    with pytest.raises(PssrError, match="2 layer scales for a feature net of 3 layers"):
        FeatureLoss(net, meta["layer_scale"][:2])
    with pytest.raises(PssrError, match="loss='vgg' is unknown"):
        loss_fn("vgg", torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_adversarial_losses_point_the_right_way():
    sure_right = critic_loss(torch.full((4, 1, 2, 2), 5.0), torch.full((4, 1, 2, 2), -5.0))
    sure_wrong = critic_loss(torch.full((4, 1, 2, 2), -5.0), torch.full((4, 1, 2, 2), 5.0))
    chance = critic_loss(torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 2, 2))
    assert float(sure_right) < 0.01 < float(chance) < float(sure_wrong)
    assert float(chance) == pytest.approx(np.log(2), rel=1e-6)
    # The generator's term falls as the critic calls its output real.
    assert float(generator_adversarial_loss(torch.full((1, 1, 2, 2), 3.0))) < float(
        generator_adversarial_loss(torch.full((1, 1, 2, 2), -3.0))
    )
