"""Train the in-domain feature network of ``pssr train --loss feature`` (pssr/models/features/).

    python scripts/train_feature_net.py [--steps 3000] [--out pssr/models/features/microscopy-dae.safetensors]

The network is the encoder of a denoising autoencoder (:class:`pssr.training.losses.FeatureNet`, three
blocks at full, half and quarter resolution) trained to reconstruct clean high-resolution
patches from noisy ones.  The decoder has no skip connections, so the deepest block must carry
the whole image and every block's features matter.  Inputs are percentile-normalised as
``pssr train`` normalises its targets (1st-99.8th percentile -> 0-1), so the features see the
generator's output in the units it is trained in.

Data (``../shared/data``; sources in ``../shared/data/SOURCES.md``), only what the built-in models
and the issue-15 comparison do not hold out:

- EM: ISBI 2012 ssTEM sections 0-24 (Cardona et al. 2010, PLoS Biol 8:e1000502); EPFL FIB-SEM
  slices except training0161-0164 (Lucchi et al. 2012, IEEE TMI 31:474); *Drosophila* L3 VNC
  ssTEM sections 0-14 (Gerhard et al. 2013, figshare doi:10.6084/m9.figshare.856713, CC BY-NC-SA 3.0).
- Fluorescence: BPAE mitochondria and nuclei (CC-BY 4.0), BPAE actin columns 0-703 (CC-BY 4.0),
  Allen Institute hiPSC C0 and C1 (BBBC034, Ljosa et al. 2012).

The weights and the metadata (architecture, per-layer feature magnitude, data, command, steps,
final loss) are written as one safetensors file; it is well under 1 MB.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pssr.nn.normalization import Normalization, percentile_norm
from pssr.training.losses import FEATURE_NET, FeatureNet

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EPFL_TEST = ("training0161.tif", "training0162.tif", "training0163.tif", "training0164.tif")


def sources() -> list[tuple[str, np.ndarray]]:
    """(name, normalised float32 ZYX) for every training source."""
    out = []
    isbi = tifffile.imread(DATA / "em" / "isbi2012_sstem_train.tif")
    out.append(("em/isbi2012_sstem_train.tif[0:25]", isbi[:25]))
    vnc = tifffile.imread(DATA / "em" / "drosophila_l3_vnc_sstem.tif")
    out.append(("em/drosophila_l3_vnc_sstem.tif[0:15]", vnc[:15]))
    for f in sorted((DATA / "em" / "epfl_fibsem_train").glob("*.tif")):
        if f.name not in EPFL_TEST:
            out.append((f"em/epfl_fibsem_train/{f.name}", tifffile.imread(f)[None]))
    for name in ("BPAE_mito.tif", "BPAE_nuclei.tif", "AICS_12_134_C0.tif", "AICS_12_134_C1.tif"):
        out.append((f"fluo/{name}", tifffile.imread(DATA / "fluo" / name)[None]))
    actin = tifffile.imread(DATA / "fluo" / "BPAE_actin.tif")
    out.append(("fluo/BPAE_actin.tif[:, 0:704]", actin[None, :, :704]))
    norm = Normalization()
    res = []
    for name, a in out:
        lo, hi = percentile_norm(a, norm)
        res.append((name, ((a.astype(np.float32) - lo) / (hi - lo)).astype(np.float32)))
    return res


def batch(srcs, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` random patches, half EM and half fluorescence, randomly flipped and rotated."""
    em = [s for s in srcs if s[0].startswith("em/")]
    fl = [s for s in srcs if s[0].startswith("fluo/")]
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        group = em if i % 2 == 0 else fl
        a = group[int(rng.integers(len(group)))][1]
        z = int(rng.integers(a.shape[0]))
        y = int(rng.integers(a.shape[1] - size + 1))
        x = int(rng.integers(a.shape[2] - size + 1))
        p = a[z, y : y + size, x : x + size]
        out[i, 0] = np.rot90(p, int(rng.integers(4)))[:, :: 1 if rng.random() < 0.5 else -1]
    return out


class Decoder(nn.Module):
    """Quarter resolution back to full, without skips (so the encoder's deepest block carries the image)."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[::-1], widths[::-1][1:], strict=False):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.ReLU(),
            ]
        layers.append(nn.Conv2d(widths[0], 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """The reconstruction from the deepest features."""
        return self.body(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    ap.add_argument(
        "--max-sigma", type=float, default=0.2, help="largest Gaussian noise std (normalised units)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=FEATURE_NET)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    srcs = sources()
    widths = (16, 32, 64)
    enc, dec = FeatureNet(widths), Decoder(widths)
    opt = torch.optim.AdamW([*enc.parameters(), *dec.parameters()], lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    t0, losses = time.monotonic(), []
    for step in range(args.steps):
        clean = torch.from_numpy(batch(srcs, rng, args.batch, args.patch))
        sigma = torch.rand(args.batch, 1, 1, 1) * args.max_sigma
        noisy = clean + sigma * torch.randn_like(clean)
        loss = F.l1_loss(dec(enc(noisy)[-1]), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(
                f"step {step + 1}: L1 {np.mean(losses[-250:]):.4f} ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
    enc.eval()
    with torch.no_grad():
        ref = torch.from_numpy(batch(srcs, np.random.default_rng(999), 64, args.patch))
        scale = [float(f.abs().mean()) for f in enc(ref)]
    meta = {
        "name": "microscopy-dae",
        "kind": "encoder of a denoising autoencoder (pssr.training.losses.FeatureNet)",
        "widths": list(widths),
        "layer_scale": scale,
        "input": "single channel, percentile-normalised (1st-99.8th percentile -> 0-1)",
        "trained_on": [name for name, _ in srcs],
        "data_sources": "../shared/data/SOURCES.md: ISBI 2012 (Cardona et al. 2010), EPFL FIB-SEM "
        "(Lucchi et al. 2012), Drosophila L3 VNC ssTEM (Gerhard et al. 2013, doi:10.6084/m9.figshare.856713, "
        "CC BY-NC-SA 3.0), BPAE (CC-BY 4.0), Allen Institute hiPSC (BBBC034)",
        "training": {
            "task": f"denoise: clean + N(0, s^2), s ~ U(0, {args.max_sigma}); L1 reconstruction",
            "steps": args.steps,
            "batch": args.batch,
            "patch": args.patch,
            "final_l1": float(np.mean(losses[-250:])),
            "minutes": round((time.monotonic() - t0) / 60, 2),
            "command": "python scripts/train_feature_net.py "
            + shlex.join(sys.argv[1:] if argv is None else argv),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in enc.state_dict().items()},
        str(args.out),
        {"pssr_features": json.dumps(meta)},
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB); layer scales {scale}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
