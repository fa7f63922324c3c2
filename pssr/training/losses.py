"""Training losses: pixel (L1, MSE), structural (SSIM, MS-SSIM), feature (perceptual) and adversarial.

The feature loss compares images through the encoder of a small denoising autoencoder trained
on microscopy itself (``pssr/models/features/microscopy-dae.safetensors``, reproduced by
``scripts/train_feature_net.py``), because ImageNet-pretrained networks (VGG) cannot be
downloaded here and were never trained on EM or fluorescence texture.  A denoiser's encoder
was chosen over the NoGAN critic because it is fixed (a critic keeps changing while the
generator trains, so "its" feature loss would be a moving target, and a critic learns only
what separates one generator's output from real images) and because it is trained on noisy
input, so its features describe structure rather than pixel noise.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pssr.errors import PssrError
from pssr.util import file_sha256

__all__ = [
    "FEATURE_LOSSES",
    "LOSSES",
    "FeatureLoss",
    "FeatureNet",
    "critic_loss",
    "default_feature_loss",
    "generator_adversarial_loss",
    "gram",
    "load_feature_net",
    "loss_fn",
    "ms_ssim_torch",
    "ssim_torch",
]

FEATURE_LOSSES = ("feature", "l1+feature")
LOSSES = ("l1", "mse", "ssim", "ms-ssim", "l1+ssim", "l1+ms-ssim", *FEATURE_LOSSES)

#: The shipped feature network (a folder of its own: every ``models/*.safetensors`` is a built-in model).
FEATURE_NET = Path(__file__).resolve().parents[1] / "models" / "features" / "microscopy-dae.safetensors"
_META_KEY = "pssr_features"


# ------------------------------------------------------------------------------ structural
def _gauss_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _ssim_parts(x: torch.Tensor, y: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term (Gaussian 11x11 window)."""
    w = _gauss_window().to(x)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx**2
    syy = F.conv2d(y * y, w) - my**2
    sxy = F.conv2d(x * y, w) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    return (lum * cs).mean(), cs.mean()


def ssim_torch(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM (Gaussian 11x11 window), differentiable."""
    return _ssim_parts(x, y, data_range)[0]


# Wang et al. 2003 weights for the first three scales, renormalised (patches of ~100-200 px
# cannot be halved five times with an 11-px window).
_MS_WEIGHTS = (0.0448, 0.2856, 0.3001)


def ms_ssim_torch(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Multi-scale SSIM over as many of three scales as the patch allows (>= 11 px per side)."""
    vals: list[torch.Tensor] = []
    levels = 1
    while levels < len(_MS_WEIGHTS) and min(x.shape[-2:]) // 2**levels >= 11:
        levels += 1
    w = torch.tensor(_MS_WEIGHTS[:levels], dtype=x.dtype, device=x.device)
    w = w / w.sum()
    for i in range(levels):
        s, cs = _ssim_parts(x, y, data_range)
        # Contrast-structure at the finer scales, full SSIM at the coarsest (clamped for the power).
        vals.append(torch.clamp(s if i == levels - 1 else cs, min=1e-6))
        if i < levels - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(vals) ** w)


# ------------------------------------------------------------------------------- features
class FeatureNet(nn.Module):
    """A small convolutional encoder; its blocks' outputs are the features (finest first).

    Block ``i`` is two 3x3 convolutions with ReLU, the first of stride 2 from block 1 on, so
    the blocks see the image at full, half and quarter resolution.  Submodule names are part
    of the weight format.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), in_channels: int = 1) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        blocks = []
        c = in_channels
        for i, w in enumerate(self.widths):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, padding_mode="reflect"),
                    nn.ReLU(),
                    nn.Conv2d(w, w, 3, padding=1, padding_mode="reflect"),
                    nn.ReLU(),
                )
            )
            c = w
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The features of every block."""
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


def gram(f: torch.Tensor) -> torch.Tensor:
    """Gram matrix of features ``(B, C, H, W)`` -> ``(B, C, C)``, normalised by ``C*H*W``."""
    b, c, h, w = f.shape
    v = f.reshape(b, c, h * w)
    return v @ v.transpose(1, 2) / (c * h * w)


class FeatureLoss(nn.Module):
    """Mean absolute feature difference over the layers, each scaled by its typical magnitude.

    ``style_weight`` adds the same over Gram matrices (texture statistics, Gatys et al.).
    The network is frozen: only the generator learns.
    """

    def __init__(
        self,
        net: FeatureNet,
        layer_scale: Sequence[float],
        *,
        layer_weights: Sequence[float] | None = None,
        style_weight: float = 0.0,
    ) -> None:
        super().__init__()
        n = len(net.widths)
        if len(layer_scale) != n:
            raise PssrError(f"{len(layer_scale)} layer scales for a feature net of {n} layers.")
        self.net = net.eval().requires_grad_(False)
        self.layer_scale = [float(s) for s in layer_scale]
        self.layer_weights = [1.0 / n] * n if layer_weights is None else [float(w) for w in layer_weights]
        self.style_weight = float(style_weight)

    def train(self, mode: bool = True) -> FeatureLoss:
        """Set the mode; the feature network itself stays in eval mode whatever the caller does."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss (a scalar); 0 for identical images."""
        if pred.shape[1] != 1:  # the network is single-channel: compare channels one by one
            pred, target = pred.flatten(0, 1)[:, None], target.flatten(0, 1)[:, None]
        total = pred.new_zeros(())
        for fp, ft, s, w in zip(
            self.net(pred), self.net(target), self.layer_scale, self.layer_weights, strict=True
        ):
            total = total + w * F.l1_loss(fp, ft) / s
            if self.style_weight:
                total = total + self.style_weight * w * F.l1_loss(gram(fp), gram(ft)) / s**2
        return total


def load_feature_net(path: str | Path | None = None) -> tuple[FeatureNet, dict[str, Any]]:
    """The feature network and its metadata (``widths``, ``layer_scale``, training record, ``sha256``).

    Read with safetensors (no pickle).  ``path`` defaults to the shipped network.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path) if path is not None else FEATURE_NET
    if not p.is_file():
        raise PssrError(
            f"feature network {str(p)!r} does not exist; reinstall pssr-toolkit or rebuild it with "
            "scripts/train_feature_net.py."
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
        weights = load_file(str(p))
        net = FeatureNet(meta["widths"])
        net.load_state_dict(weights)
    except Exception as e:
        raise PssrError(
            f"{str(p)!r} is not a pssr feature network ({e}); use the shipped one or a file written "
            "by scripts/train_feature_net.py."
        ) from e
    meta["sha256"] = file_sha256(p)
    meta["file"] = p.name
    return net, meta


@functools.lru_cache(maxsize=4)
def _cached_feature_net(path: str) -> tuple[FeatureNet, str]:
    net, meta = load_feature_net(path)
    return net, json.dumps(meta)


def default_feature_loss(style_weight: float = 0.0, path: str | Path | None = None) -> FeatureLoss:
    """A :class:`FeatureLoss` on the shipped feature network (loaded once per process)."""
    net, meta = _cached_feature_net(str(path or FEATURE_NET))
    fl = FeatureLoss(net, json.loads(meta)["layer_scale"], style_weight=style_weight)
    fl.meta = json.loads(meta)
    return fl


# ----------------------------------------------------------------------------- the loss
def loss_fn(
    name: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    features: FeatureLoss | None = None,
    feature_weight: float = 1.0,
) -> torch.Tensor:
    """The training loss ``name`` (see :data:`LOSSES`).

    ``features`` is the feature loss of ``"feature"`` and ``"l1+feature"`` (default: the
    shipped network, no style term); ``"l1+feature"`` is L1 + ``feature_weight`` x feature.
    """
    if name == "l1":
        return F.l1_loss(pred, target)
    if name == "mse":
        return F.mse_loss(pred, target)
    if name == "ssim":
        return 1 - ssim_torch(pred, target)
    if name == "ms-ssim":
        return 1 - ms_ssim_torch(pred, target)
    if name == "l1+ms-ssim":
        return F.l1_loss(pred, target) + 0.2 * (1 - ms_ssim_torch(pred, target))
    if name == "l1+ssim":
        return F.l1_loss(pred, target) + 0.2 * (1 - ssim_torch(pred, target))
    if name in FEATURE_LOSSES:
        fl = features if features is not None else default_feature_loss().to(pred.device)
        if name == "feature":
            return fl(pred, target)
        return F.l1_loss(pred, target) + feature_weight * fl(pred, target)
    raise PssrError(f"loss={name!r} is unknown; use one of {LOSSES}.")


# ---------------------------------------------------------------------------- adversarial
def critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a critic that should say 1 for real and 0 for generated patches."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return (real + fake) / 2


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial term: cross-entropy of the critic calling its output real."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
