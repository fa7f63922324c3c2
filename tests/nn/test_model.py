import pytest
import torch

from pssr.nn.model import (
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


# ------------------------------------------------------------ noise map and widened inputs
def test_noise_map_config_shapes_gradients_and_refusal():
    torch.manual_seed(0)
    cfg = ModelConfig(in_channels=3, size="small", extra={"noise_map": True})
    assert (cfg.input_channels, cfg.centre_channel) == (4, 2)
    net = build_model(cfg)
    y = net(torch.rand(2, 4, 19, 23))
    assert y.shape == (2, 1, 76, 92) and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match=r"noise-conditioned: it takes 4 input channels.*got 3"):
        net(torch.rand(1, 3, 16, 16))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert receptive_radius(net) == receptive_radius(build_model(ModelConfig(in_channels=3, size="small")))


def test_noise_map_global_residual_is_the_centre_frame_not_the_map():
    cfg = ModelConfig(in_channels=3, size="small", extra={"noise_map": True})
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()  # network branch off: the output is the bilinear residual alone
        x = torch.rand(1, 4, 16, 16)
        y = net(x)
        ref = torch.nn.functional.interpolate(x[:, 2:3], scale_factor=4, mode="bilinear", align_corners=False)
    assert torch.equal(y, ref)


@pytest.mark.parametrize(
    ("extra", "arch", "match"),
    [
        ({"noise_map": 1}, "srunet", "noise_map=1 must be true or false"),
        ({"noise_map": True}, "pssr-resunet", "implemented for arch 'srunet' only"),
        ({"denoise": True}, "srunet", "unknown model config extra key"),
    ],
)
def test_noise_map_config_errors(extra, arch, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(arch=arch, extra=extra)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"in_channels": 1}, {"in_channels": 1, "extra": {"noise_map": True}}),
        ({"in_channels": 1}, {"in_channels": 3}),
        ({"in_channels": 1}, {"in_channels": 5, "extra": {"noise_map": True}}),
        ({"in_channels": 3, "extra": {"noise_map": True}}, {"in_channels": 5, "extra": {"noise_map": True}}),
    ],
)
def test_widen_inputs_computes_what_the_parent_computed(old, new):
    from pssr.nn.model import widen_inputs

    torch.manual_seed(1)
    a, b = ModelConfig(size="small", **old), ModelConfig(size="small", **new)
    parent = build_model(a).eval()
    child = build_model(b).eval()
    child.load_state_dict(widen_inputs(parent.state_dict(), a, b))
    x_old = torch.rand(2, a.input_channels, 24, 24)
    # The new channels hold anything: noise map, neighbours; the output must not change.
    x_new = torch.rand(2, b.input_channels, 24, 24) * 5
    off = (b.in_channels - a.in_channels) // 2
    x_new[:, b.noise_map + off : b.noise_map + off + a.in_channels] = x_old[:, a.noise_map :]
    if a.noise_map:
        x_new[:, 0] = x_old[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(child(x_new), parent(x_old), rtol=0, atol=1e-6)


def test_widen_inputs_refuses_other_changes():
    from pssr.nn.model import widen_inputs

    a, b = ModelConfig(size="small"), ModelConfig(size="base", in_channels=3)
    with pytest.raises(ValueError, match="changes inputs only"):
        widen_inputs(build_model(a).state_dict(), a, b)
    with pytest.raises(ValueError, match="cannot narrow inputs"):
        widen_inputs(build_model(b).state_dict(), b, ModelConfig(size="base"))


def test_noise_conditioned_model_file_round_trips_and_refuses_input_without_map(tmp_path):
    import numpy as np

    from pssr.nn.modelfile import load_model, read_metadata, save_model
    from pssr.training.data import add_noise_map

    torch.manual_seed(0)
    cfg = ModelConfig(size="small", extra={"noise_map": True})
    net = build_model(cfg).eval()
    path = save_model(tmp_path / "nm.safetensors", net, cfg, {"crappifier": None})
    assert read_metadata(path)["config"]["extra"] == {"noise_map": True}
    lm = load_model(path)
    assert lm.config.noise_map and lm.frames == 1
    x = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    xin = torch.from_numpy(add_noise_map(x, {"gain": 0.02, "sigma": 0.01, "full_scale": 1.0}, lo=0.0, hi=1.0))
    with torch.no_grad():
        assert torch.equal(lm.net(xin), net(xin))
        with pytest.raises(ValueError, match="add the map with pssr.training.data.add_noise_map"):
            lm.net(torch.from_numpy(x))


def test_widen_inputs_spread_averages_frames():
    from pssr.nn.model import widen_inputs

    torch.manual_seed(2)
    a, b = ModelConfig(size="small"), ModelConfig(size="small", in_channels=3)
    parent = build_model(a).eval()
    child = build_model(b).eval()
    child.load_state_dict(widen_inputs(parent.state_dict(), a, b, spread=True))
    x = torch.rand(1, 1, 24, 24)
    with torch.no_grad():
        # identical frames: the parent's output
        torch.testing.assert_close(child(x.repeat(1, 3, 1, 1)), parent(x), rtol=0, atol=1e-5)
        # the first layer sees the frames' mean: frames (x - d, x, x + d) act like x in the stem
        d = torch.rand(1, 1, 24, 24) * 0.1
        stem_c = child.stem(torch.cat([x - d, x, x + d], 1))
        torch.testing.assert_close(stem_c, parent.stem(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="spread=True widens a single-frame model"):
        widen_inputs(child.state_dict(), b, ModelConfig(size="small", in_channels=5), spread=True)
