"""The super-resolution networks and their configs.

``srunet`` (default) computes in low-resolution space: a residual U-Net on the LR input,
then sub-pixel convolution (pixel shuffle with ICNR initialisation and a one-pixel blur
against checkerboard artefacts) to the HR grid, added to a bilinear upsampling of the
centre input frame (global residual).  Cost per output pixel is about ``1/s**2`` of a
network that runs at output resolution.

``pssr-resunet`` reproduces the original PSSR design for comparison: bilinear upsampling
first, then a ResNet-34-style encoder U-Net (fastai ``DynamicUnet`` style decoder with
pixel-shuffle upsampling, optional self-attention) at full output resolution.  No
ImageNet weights are used (none can be downloaded here; the paper fine-tuned from them).

Submodule names are part of the weight format: renaming one is a format change.  This file is
exported verbatim as the architecture of bioimage.io packages, so it imports torch only (no pssr:
its errors are plain ``ValueError``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "SIZES", "SRUNet", "PSSRResUNet", "build_model", "pad_to_multiple", "widen_inputs"]

ARCHS = ("srunet", "pssr-resunet", "bilinear")
EXTRA_KEYS = frozenset({"noise_map"})
SIZES: dict[str, dict[str, Any]] = {
    "small": {"widths": (24, 48, 96), "blocks": 1},
    "base": {"widths": (32, 64, 128), "blocks": 2},
    "large": {"widths": (48, 96, 192), "blocks": 3},
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and its hyper-parameters (saved with every model file).

    Attributes
    ----------
    arch : {"srunet", "pssr-resunet"}
    scale : int
        Integer upsampling factor (2, 3, 4 or 8).
    in_channels : int
        Input frames / z-slices (1 for single images, e.g. 5 for PSSR-MF).
    size : str
        ``small``, ``base`` or ``large`` (srunet only).
    widths, blocks
        Filled from ``size`` unless given.
    layers : tuple
        Residual blocks per ResNet stage (pssr-resunet; ResNet-34 is (3, 4, 6, 3)).
    attention : bool
        Self-attention in the decoder (pssr-resunet, as fastai's ``self_attention``).
    extra : dict
        Optional features.  ``{"noise_map": True}`` (srunet only): the network takes one
        more input channel *before* the frames, the expected noise standard deviation of
        each pixel in normalised units (FFDNet-style noise-level conditioning, see
        :func:`pssr.training.data.add_noise_map`); the input is then ``(B, 1 + in_channels, h, w)``.
    """

    arch: str = "srunet"
    scale: int = 4
    in_channels: int = 1
    size: str = "base"
    widths: tuple[int, ...] = ()
    blocks: int = 0
    layers: tuple[int, ...] = (3, 4, 6, 3)
    attention: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} is unknown; use one of {ARCHS}.")
        if not isinstance(self.scale, int) or self.scale < 2 or self.scale > 16:
            raise ValueError(f"scale={self.scale!r} must be an integer from 2 to 16 (e.g. 2, 3, 4, 8).")
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ValueError(f"in_channels={self.in_channels!r} must be a positive integer.")
        if self.in_channels % 2 == 0:
            raise ValueError(
                f"in_channels={self.in_channels} must be odd: frames t-k..t+k around the "
                "restored frame t (1, 3, 5, ...)."
            )
        if self.size not in SIZES:
            raise ValueError(f"size={self.size!r} is unknown; use one of {sorted(SIZES)}.")
        if not self.widths:
            object.__setattr__(self, "widths", tuple(SIZES[self.size]["widths"]))
        if not self.blocks:
            object.__setattr__(self, "blocks", int(SIZES[self.size]["blocks"]))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        bad = set(self.extra) - EXTRA_KEYS
        if bad:
            raise ValueError(f"unknown model config extra key(s) {sorted(bad)}; known: {sorted(EXTRA_KEYS)}.")
        nm = self.extra.get("noise_map", False)
        if not isinstance(nm, bool):
            raise ValueError(f"extra noise_map={nm!r} must be true or false.")
        if nm and self.arch != "srunet":
            raise ValueError(
                f"extra noise_map=True is implemented for arch 'srunet' only, not {self.arch!r}; "
                "use arch='srunet' or drop noise_map."
            )

    @property
    def noise_map(self) -> bool:
        """Whether channel 0 of the input is a noise-level map (see ``extra``)."""
        return bool(self.extra.get("noise_map", False))

    @property
    def input_channels(self) -> int:
        """Channels of the network input: the frames, plus the noise map if any."""
        return self.in_channels + int(self.noise_map)

    @property
    def centre_channel(self) -> int:
        """Input channel of the frame being restored (the global residual's source)."""
        return int(self.noise_map) + self.in_channels // 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(d) - names
        if bad:
            raise ValueError(f"unknown model config key(s) {sorted(bad)}; known: {sorted(names)}.")
        d = dict(d)
        for k in ("widths", "layers"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @property
    def multiple(self) -> int:
        """LR tile sizes that are multiples of this keep the down-sampling phase."""
        if self.arch == "srunet":
            return 2 ** (len(self.widths) - 1)
        if self.arch == "bilinear":
            return 1
        return max(1, 32 // self.scale) if 32 % self.scale == 0 else 32


# ----------------------------------------------------------------------------- pieces
def icnr_(weight: torch.Tensor, scale: int, init=nn.init.kaiming_normal_) -> None:
    """ICNR init (Aitken et al. 2017): every sub-pixel starts equal, so no checkerboard."""
    if weight.is_meta:  # a skeleton (checking a file's tensor names): nothing to draw, and drawing
        return  # on the meta device imports torch._dynamo (about 1 s of every `pssr predict`)
    out_c, in_c, kh, kw = weight.shape
    sub = torch.empty(out_c // scale**2, in_c, kh, kw)
    init(sub)
    with torch.no_grad():
        weight.copy_(sub.repeat_interleave(scale**2, dim=0))


class PixelShuffleUp(nn.Module):
    """Conv to ``out * s**2`` channels (ICNR), pixel shuffle, then a 2x2 average blur."""

    def __init__(self, c_in: int, c_out: int, scale: int, blur: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out * scale**2, 1)
        icnr_(self.conv.weight, scale)
        nn.init.zeros_(self.conv.bias)
        self.shuffle = nn.PixelShuffle(scale)
        self.blur = blur

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shuffle(F.relu(self.conv(x)))
        if self.blur:
            x = F.avg_pool2d(F.pad(x, (1, 0, 1, 0), mode="replicate"), 2, stride=1)
        return x


class ResBlock(nn.Module):
    """Two 3x3 convs with a ReLU and an identity shortcut (no normalisation, as EDSR)."""

    def __init__(self, c: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.conv2(F.relu(self.conv1(x)))


def pad_to_multiple(x: torch.Tensor, m: int) -> tuple[torch.Tensor, int, int]:
    """``x`` padded at the bottom/right to multiples of ``m`` (reflect; replicate when too small), h, w."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        mode = "reflect" if (ph < h and pw < w) else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


# --------------------------------------------------------------------------- SRUNet
class SRUNet(nn.Module):
    """Residual U-Net in low-resolution space with a sub-pixel upsampling head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        self.stem = nn.Conv2d(cfg.input_channels, w[0], 3, padding=1)
        self.enc = nn.ModuleList(nn.Sequential(*[ResBlock(c) for _ in range(cfg.blocks)]) for c in w)
        self.down = nn.ModuleList(
            nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1) for i in range(len(w) - 1)
        )
        self.mid = nn.Sequential(*[ResBlock(w[-1]) for _ in range(cfg.blocks)])
        self.up = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w[i + 1], w[i], 3, padding=1)
            )
            for i in range(len(w) - 1)
        )
        self.fuse = nn.ModuleList(nn.Conv2d(2 * w[i], w[i], 1) for i in range(len(w) - 1))
        self.dec = nn.ModuleList(
            nn.Sequential(*[ResBlock(w[i]) for _ in range(cfg.blocks)]) for i in range(len(w) - 1)
        )
        mid_c = 16
        self.head = PixelShuffleUp(w[0], mid_c, cfg.scale)
        self.out = nn.Conv2d(mid_c, 1, 3, padding=1)
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():
            self.out.weight.mul_(0.1)  # start near the bilinear residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map LR ``(B, C, h, w)`` to HR ``(B, 1, h*s, w*s)``."""
        s = self.cfg.scale
        if self.cfg.noise_map and x.shape[1] != self.cfg.input_channels:
            raise ValueError(
                f"this model is noise-conditioned: it takes {self.cfg.input_channels} input channels "
                f"(a noise-level map, then {self.cfg.in_channels} frame(s)), but got {x.shape[1]}; "
                "add the map with pssr.training.data.add_noise_map before calling the network."
            )
        xp, h, w = pad_to_multiple(x, self.cfg.multiple)
        c = self.cfg.centre_channel
        centre = xp[:, c : c + 1]
        base = F.interpolate(centre, scale_factor=s, mode="bilinear", align_corners=False)
        f = F.relu(self.stem(xp))
        skips = []
        for i, enc in enumerate(self.enc[:-1]):
            f = enc(f)
            skips.append(f)
            f = F.relu(self.down[i](f))
        f = self.mid(self.enc[-1](f))
        for i in reversed(range(len(self.up))):
            f = F.relu(self.up[i](f))
            f = F.relu(self.fuse[i](torch.cat([f, skips[i]], 1)))
            f = self.dec[i](f)
        y = base + self.out(self.head(f))
        return y[..., : h * s, : w * s]


# ------------------------------------------------------------------- PSSR ResUNet
class BasicBlock(nn.Module):
    """ResNet basic block with batch norm."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.short(x))


class SelfAttention(nn.Module):
    """SAGAN-style self-attention (fastai ``SelfAttention``), gamma starts at 0.1."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.q = nn.Conv1d(c, max(c // 8, 1), 1)
        self.k = nn.Conv1d(c, max(c // 8, 1), 1)
        self.v = nn.Conv1d(c, c, 1)
        self.gamma = nn.Parameter(torch.tensor([0.1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f = x.view(b, c, -1)
        attn = torch.softmax(torch.bmm(self.q(f).transpose(1, 2), self.k(f)), dim=1)
        o = torch.bmm(self.v(f), attn)
        return (self.gamma * o + f).view(b, c, h, w)


class UnetUp(nn.Module):
    """fastai ``UnetBlock``: pixel-shuffle up, concat the skip, two convs."""

    def __init__(self, c_up: int, c_skip: int, c_out: int, attention: bool = False) -> None:
        super().__init__()
        self.shuf = PixelShuffleUp(c_up, c_up // 2, 2)
        self.bn = nn.BatchNorm2d(c_skip)
        self.conv1 = nn.Conv2d(c_up // 2 + c_skip, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.attn = SelfAttention(c_out) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.shuf(x)
        if up.shape[-2:] != skip.shape[-2:]:
            up = F.interpolate(up, skip.shape[-2:], mode="nearest")
        f = torch.cat([up, F.relu(self.bn(skip))], 1)
        return self.attn(F.relu(self.conv2(F.relu(self.conv1(f)))))


class PSSRResUNet(nn.Module):
    """The original PSSR design: bilinear upsample, then a ResNet-34 U-Net at HR."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = (64, 128, 256, 512)
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        stages, c = [], 64
        for i, (n, wd) in enumerate(zip(cfg.layers, widths, strict=True)):
            blocks = [BasicBlock(c, wd, 1 if i == 0 else 2)] + [BasicBlock(wd, wd) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c = wd
        self.stages = nn.ModuleList(stages)
        self.middle = nn.Sequential(
            nn.Conv2d(512, 1024, 3, padding=1), nn.ReLU(), nn.Conv2d(1024, 512, 3, padding=1), nn.ReLU()
        )
        # Decoder: up from the stages (512->256->128->64), then to the stem, then to input res.
        self.ups = nn.ModuleList(
            [
                UnetUp(512, 256, 384),
                UnetUp(384, 128, 256, attention=cfg.attention),
                UnetUp(256, 64, 96),
                UnetUp(96, 64, 64),
            ]
        )
        self.final_up = PixelShuffleUp(64, 64, 2)
        self.final_res = ResBlock(64 + cfg.in_channels)
        self.out = nn.Conv2d(64 + cfg.in_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map LR ``(B, C, h, w)`` to HR ``(B, 1, h*s, w*s)``."""
        s = self.cfg.scale
        h, w = x.shape[-2:]
        up = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        xp, H, W = pad_to_multiple(up, 32)
        s0 = self.stem(xp)  # /2
        feats, f = [s0], F.max_pool2d(s0, 3, 2, 1)  # /4
        for i, st in enumerate(self.stages):
            f = st(f)
            if i < 3:
                feats.append(f)
        f = self.middle(f)
        for blk, skip in zip(self.ups, reversed(feats), strict=True):
            f = blk(f, skip)
        f = self.final_up(f)
        f = self.final_res(torch.cat([f, xp], 1))
        return self.out(f)[..., : h * s, : w * s]


class Bilinear(nn.Module):
    """Plain bilinear upsampling of the centre frame: a baseline run through the same pipeline."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map LR ``(B, C, h, w)`` to HR ``(B, 1, h*s, w*s)``."""
        c = self.cfg.in_channels // 2
        return F.interpolate(
            x[:, c : c + 1], scale_factor=self.cfg.scale, mode="bilinear", align_corners=False
        )


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the network for ``cfg``."""
    return {"srunet": SRUNet, "pssr-resunet": PSSRResUNet, "bilinear": Bilinear}[cfg.arch](cfg)


def n_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_output_pixel(model: nn.Module, lr_size: int = 64) -> float:
    """Forward FLOPs per HR output pixel, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    x = torch.zeros(1, cfg.input_channels, lr_size, lr_size)
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return fc.get_total_flops() / (lr_size * cfg.scale) ** 2


def receptive_radius(model: nn.Module, size: int | None = None) -> int:
    """Radius in LR pixels beyond which an input pixel cannot affect an output pixel.

    Measured, not estimated, and independent of the trained weights: on a float64 copy of
    the network whose weights and biases are made positive (so every ReLU is active), the
    gradient of one output pixel with respect to the input is non-zero exactly on the
    architecture's full support.  (On the trained weights, ReLUs that happen to be off for
    one probe input would understate it.)  The probe grows until the support fits inside.
    """
    import copy

    cfg = model.cfg
    m = cfg.multiple
    size = size or max(4 * m, 128) // m * m
    probe = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(p.abs() + 1e-3)
    while True:
        x = torch.rand(1, cfg.input_channels, size, size, dtype=torch.float64, requires_grad=True)
        y = probe(x + 0.1)
        c = (size // 2) * cfg.scale
        y[0, 0, c, c].backward()
        g = x.grad[0].abs().sum(0)
        ys, xs = torch.nonzero(g > 0, as_tuple=True)
        cy = c / cfg.scale
        r = float(max((ys - cy).abs().max(), (xs - cy).abs().max()))
        if r < size / 2 - 2 or size >= 2048:
            return int(r) + 1
        size *= 2


def widen_inputs(
    state: dict[str, torch.Tensor], old: ModelConfig, new: ModelConfig, *, spread: bool = False
) -> dict[str, torch.Tensor]:
    """Weights of an ``old`` srunet adapted to ``new`` inputs (more frames and/or a noise map).

    Every tensor is copied except the first convolution's weight, whose input channels are
    re-laid out: the old frames go to the centre of the new frames (old ``t-k..t+k`` to the
    same offsets), and every new channel (outer frames, the noise map) starts at zero.  The
    widened network therefore computes exactly what ``old`` computed, whatever the new
    channels hold, and training learns how much to use them.  Architectures must otherwise be
    identical.

    ``spread=True`` (single-frame ``old`` only) instead gives every new frame an equal share
    of the old frame's weights: for a static scene with independent noise per frame the
    first layer then sees the mean of the frames (noise variance divided by the number of
    frames) and, for identical frames, computes exactly what ``old`` computed.

    Raises
    ------
    ValueError
        ``old`` and ``new`` differ in more than their inputs, or ``new`` has fewer frames.
    """
    if old.arch != "srunet" or new.arch != "srunet":
        raise ValueError(f"widen_inputs works on srunet models, not {old.arch!r} -> {new.arch!r}.")
    same = {k: v for k, v in old.to_dict().items() if k not in ("in_channels", "extra")}
    if {k: v for k, v in new.to_dict().items() if k not in ("in_channels", "extra")} != same:
        raise ValueError(
            f"widen_inputs changes inputs only; the architectures differ: {old.to_dict()} vs {new.to_dict()}."
        )
    if new.in_channels < old.in_channels or (old.noise_map and not new.noise_map):
        raise ValueError(
            f"cannot narrow inputs from {old.in_channels} frame(s) (noise map {old.noise_map}) to "
            f"{new.in_channels} (noise map {new.noise_map})."
        )
    if spread and old.in_channels != 1:
        raise ValueError(f"spread=True widens a single-frame model; this one takes {old.in_channels} frames.")
    out = dict(state)
    w = state["stem.weight"]
    wide = torch.zeros((w.shape[0], new.input_channels, *w.shape[2:]), dtype=w.dtype)
    off = (new.in_channels - old.in_channels) // 2
    src0, dst0 = int(old.noise_map), int(new.noise_map) + off
    if spread:
        share = w[:, src0 : src0 + 1] / new.in_channels
        wide[:, int(new.noise_map) :] = share.expand(-1, new.in_channels, -1, -1)
    else:
        wide[:, dst0 : dst0 + old.in_channels] = w[:, src0 : src0 + old.in_channels]
    if old.noise_map:
        wide[:, 0] = w[:, 0]
    out["stem.weight"] = wide
    return out
