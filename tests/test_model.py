import pytest
import torch

from pssr.model import (
    ModelConfig,
    build_model,
    flops_per_output_pixel,
    n_parameters,
    receptive_radius,
)


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_srunet_shapes_no_nans_and_gradients(scale, channels):
    torch.manual_seed(0)
    net = build_model(ModelConfig(scale=scale, in_channels=channels, size="small"))
    x = torch.rand(2, channels, 19, 23)  # not a multiple of the down-sampling factor
    y = net(x)
    assert y.shape == (2, 1, 19 * scale, 23 * scale)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pssr_resunet_shapes_gradients_attention():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="pssr-resunet", scale=4, in_channels=1, layers=(1, 1, 1, 1), attention=True)
    net = build_model(cfg)
    y = net(torch.rand(2, 1, 20, 24))
    assert y.shape == (2, 1, 80, 96) and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lr_space_design_is_much_cheaper():
    ours = flops_per_output_pixel(build_model(ModelConfig(size="base")))
    orig = flops_per_output_pixel(build_model(ModelConfig(arch="pssr-resunet")))
    assert orig / ours > 5
    assert n_parameters(build_model(ModelConfig(size="small"))) < n_parameters(
        build_model(ModelConfig(size="base"))
    )


def test_receptive_radius_is_exact_support():
    net = build_model(ModelConfig(size="small"))
    r = receptive_radius(net)
    assert 10 < r < 100
    # An input change just outside the radius leaves the centre output unchanged.
    x = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        a = net(x)[0, 0, 128 * 4, 128 * 4]
        x2 = x.clone()
        x2[0, 0, 128 + r + 1, 128] += 10
        x2[0, 0, 128, 128 - r - 2] += 10
        b = net(x2)[0, 0, 128 * 4, 128 * 4]
        x3 = x.clone()
        x3[0, 0, 128 + 2, 128] += 10
        c = net(x3)[0, 0, 128 * 4, 128 * 4]
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": 1}, "scale=1 must be an integer from 2"),
        ({"in_channels": 2}, "in_channels=2 must be odd"),
        ({"arch": "gan"}, "arch='gan' is unknown"),
        ({"size": "huge"}, "size='huge' is unknown"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_config_roundtrip():
    cfg = ModelConfig(scale=3, in_channels=5, size="small")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({**cfg.to_dict(), "depth": 4})
