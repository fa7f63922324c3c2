"""L1 vs L1 + feature loss vs NoGAN at the same size and budget, on held-out EM and fluorescence (issue 15).

    python scripts/gan_experiment.py em --docs
    python scripts/gan_experiment.py fluo --docs

Every variant fine-tunes the built-in (``em`` / ``fluo``, srunet base) for the same number of
generator updates (``--steps``), with the built-in's degradation and noise jitter, the same
seed, patch and batch:

- ``L1``: ``pssr train --init <built-in> --loss l1 --steps N``
- ``L1+feature``: ``... --loss l1+feature --feature-weight W --steps N``
- ``NoGAN``: ``... --loss l1 --gan --steps N-G --critic-steps C --gan-steps G`` (N-G L1 steps of
  generator pretraining, C critic steps with the generator frozen, then G adversarial steps:
  N generator updates in all, plus the critic's C steps, whose cost is reported).

Held-out data (never sampled for training, nor by the feature network):

- ``em``: *Drosophila* L3 VNC ssTEM (Gerhard et al. 2013, figshare doi:10.6084/m9.figshare.856713,
  CC BY-NC-SA 3.0): sections 0-14 train; the central 512x512 of sections 15 and 19 are scored
  (sections 15-19 are never sampled).
- ``fluo``: BPAE actin (widefield, CC-BY 4.0, haesleinhuepf/BioImageAnalysisNotebooks):
  columns 0-703 train, columns 704-1087 are scored.

Every model, bilinear and bilinear + Gaussian (sigma 1 and 2 HR pixels) restore the same LR
(the built-in's degradation at its nominal noise, seed 0) and are scored with:

- paper-style PSNR / SSIM (``pssr.quality.metrics``, per plane, averaged);
- ``hf_power``: the output's radially averaged power spectrum over the ground truth's, summed
  over the frequencies the LR cannot carry (above its Nyquist, 1/(2*scale) to 1/2 cycles per HR
  pixel); 1.0 = the same texture energy as the truth, < 1 smoother, > 1 more (invented or noisy) texture;
- ``beyond_3sigma``: the fidelity map's fraction of pixels beyond 3 sigma (``pssr.blockwise.fidelity``, the
  model's own noise model); the ground truth itself gives the noise rate (~0.27 % if the noise
  model is exact), a faithful restoration stays near it.

Trained models are cached in ``--work``; ``--docs`` writes ``docs/models/feature-gan-<name>.json`` and
the figure ``docs/models/feature-gan-<name>.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy.ndimage import gaussian_filter

from pssr.blockwise.fidelity import fidelity_map
from pssr.degrade.crappify import CrappifierConfig, full_scale_of
from pssr.nn.modelfile import load_model, read_metadata
from pssr.quality.metrics import bilinear, crop_to_scale, psnr, ssim

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DOCS = ROOT / "docs" / "models"
SCALE = 4


def em_split() -> tuple[np.ndarray, np.ndarray, str]:
    """(train, test): L3 VNC sections 0-14 / the centre 512x512 of sections 15 and 19."""
    vol = tifffile.imread(DATA / "em" / "drosophila_l3_vnc_sstem.tif")
    return (
        vol[:15],
        vol[[15, 19], 256:768, 256:768],
        "drosophila_l3_vnc_sstem.tif sections 15, 19 [256:768, 256:768]",
    )


def fluo_split() -> tuple[np.ndarray, np.ndarray, str]:
    """(train, test): BPAE actin columns 0-703 / 704-1087."""
    img = tifffile.imread(DATA / "fluo" / "BPAE_actin.tif").astype(np.float32)
    return img[:, :704], img[None, :, 704:1088], "BPAE_actin.tif columns 704-1087"


SETUPS = {
    "em": {"split": em_split, "parent": "em", "crop": (0, 160, 160, 192)},
    "fluo": {"split": fluo_split, "parent": "fluo", "crop": (0, 240, 120, 192)},
}


def train_run(work: Path, train_tif: Path, flags: list[str], out: Path) -> dict[str, float]:
    """One ``pssr train`` process (cached); its wall and CPU seconds."""
    timing = out.with_suffix(".time.json")
    if out.exists() and timing.exists():
        return json.loads(timing.read_text())
    for p in work.glob(out.name.removesuffix(".safetensors") + ".*"):
        p.unlink()  # left by an interrupted run
    cmd = [sys.executable, "-m", "pssr", "-q", "train", str(train_tif), *flags, "--out", str(out)]
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    with open(work / "train.log", "a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=work)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = {"wall_s": time.monotonic() - t0, "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime}
    timing.write_text(json.dumps(t))
    return t


def radial_power(img: np.ndarray) -> np.ndarray:
    """Radially averaged power spectrum (Hann-windowed, mean removed), index = radius in FFT bins."""
    a = np.asarray(img, np.float64)
    a = a - a.mean()
    win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    p = np.abs(np.fft.fftshift(np.fft.fft2(a * win))) ** 2
    yy, xx = np.indices(p.shape)
    r = np.hypot((yy - p.shape[0] // 2) / p.shape[0], (xx - p.shape[1] // 2) / p.shape[1])
    bins = np.minimum((r * min(p.shape)).astype(int), min(p.shape) // 2)
    return np.bincount(bins.ravel(), p.ravel()) / np.maximum(np.bincount(bins.ravel()), 1)


def hf_power_ratio(pred: np.ndarray, gt: np.ndarray, scale: int = SCALE) -> float:
    """Power above the LR Nyquist (1/(2 scale) .. 1/2 cycles/px) of ``pred`` over ``gt``, per plane, averaged."""
    ratios = []
    for p, g in zip(pred.reshape((-1,) + pred.shape[-2:]), gt.reshape((-1,) + gt.shape[-2:]), strict=True):
        # Compare in the truth's intensity units: scale pred to the truth's mean and std first.
        p = (p - p.mean()) / (p.std() + 1e-12) * g.std() + g.mean()
        rp, rg = radial_power(p), radial_power(g)
        n = min(g.shape)
        band = slice(int(np.ceil(n / (2 * scale))), n // 2 + 1)
        ratios.append(float(rp[band].sum() / rg[band].sum()))
    return float(np.mean(ratios))


def fidelity_rate(pred: np.ndarray, lr: np.ndarray, crap: CrappifierConfig, full_scale: float) -> float:
    """Fraction of fidelity-map pixels beyond 3 sigma, over all planes."""
    z = [
        fidelity_map(p, q, crap, full_scale=full_scale)
        for p, q in zip(pred.reshape((-1,) + pred.shape[-2:]), lr.reshape((-1,) + lr.shape[-2:]), strict=True)
    ]
    return float(np.mean([np.mean(np.abs(m) > 3) for m in z]))


def smoother(lr: np.ndarray, sigma: float) -> np.ndarray:
    """Bilinear, then a Gaussian of ``sigma`` HR pixels per plane."""
    up = bilinear(lr, SCALE)
    return np.stack([gaussian_filter(p, sigma) for p in up.reshape((-1,) + up.shape[-2:])]).reshape(up.shape)


def restore_planes(model: str, lr: np.ndarray) -> np.ndarray:
    """The model's output for every plane, float32 in input units."""
    from pssr import restore

    return np.asarray(restore(lr, model=model, dtype="float32", progress=False).output, np.float32)


def score(name, pred, hr, lr, crap, fs) -> dict:
    """Every metric of one row."""
    return {
        "psnr": psnr(pred, hr),
        "ssim": ssim(pred, hr),
        "hf_power": hf_power_ratio(pred, hr),
        "beyond_3sigma": fidelity_rate(pred, lr, crap, fs),
    }


def variants(parent: str, args) -> dict[str, list[str]]:
    """Label -> the ``pssr train`` flags of each variant."""
    jit = load_model(parent).crappifier.jitter
    _lo, hi = next(iter(jit.values()))
    common = ["--init", parent, "--jitter", f"{hi:g}", "--patch", str(args.patch), "--batch", str(args.batch)]
    common += ["--seed", str(args.seed), "--learning-rate", "1e-3", "--ckpt-every", "100000"]
    n, g = args.steps, args.gan_steps
    return {
        "L1": [*common, "--loss", "l1", "--steps", str(n), "--val-every", str(n)],
        "L1+feature": [
            *common,
            *("--loss", "l1+feature", "--feature-weight", f"{args.feature_weight:g}"),
            *("--steps", str(n), "--val-every", str(n)),
        ],
        "NoGAN": [
            *common,
            *("--loss", "l1", "--steps", str(n - g), "--val-every", str(n - g), "--gan"),
            *("--critic-steps", str(args.critic_steps), "--gan-steps", str(g)),
        ],
    }


def figure(path: Path, panels: dict[str, np.ndarray], crop, title: str) -> None:
    """Crops of the truth, baselines and every model, on one intensity scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z, y, x, size = crop
    tiles = {k: v.reshape((-1,) + v.shape[-2:])[z, y : y + size, x : x + size] for k, v in panels.items()}
    lo, hi = np.percentile(tiles["ground truth"], [0.5, 99.5])
    fig, ax = plt.subplots(1, len(tiles), figsize=(2.6 * len(tiles), 3.0))
    for a, (k, t) in zip(ax, tiles.items(), strict=True):
        a.imshow(t, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        a.set_title(k, fontsize=9)
        a.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(SETUPS))
    ap.add_argument("--steps", type=int, default=30, help="generator updates of every variant")
    ap.add_argument("--gan-steps", type=int, default=12, help="of which adversarial (NoGAN)")
    ap.add_argument("--critic-steps", type=int, default=20)
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pssr-gan"))
    ap.add_argument("--docs", action="store_true")
    ap.add_argument(
        "--extra",
        nargs="*",
        default=[],
        metavar="LABEL=MODEL",
        help="also score these models (e.g. a NoGAN run resumed with more --gan-steps)",
    )
    args = ap.parse_args(argv)

    setup = SETUPS[args.name]
    work = args.work / args.name
    work.mkdir(parents=True, exist_ok=True)
    train_hr, test_hr, test_name = setup["split"]()
    train_tif = work / "train.tif"
    if not train_tif.exists():
        tifffile.imwrite(train_tif, train_hr, metadata={"axes": "ZYX" if train_hr.ndim == 3 else "YX"})
    parent = setup["parent"]
    runs = {}
    for label, flags in variants(parent, args).items():
        out = work / f"{label.replace('+', '_')}.safetensors"
        t = train_run(work, train_tif, flags, out)
        tr = read_metadata(out)["training"]
        runs[label] = {
            "path": str(out),
            "flags": flags,
            **t,
            "loop_minutes": tr["minutes"],
            "steps": tr["steps"],
        }
        print(
            f"{label}: {tr['steps']} generator steps, process {t['wall_s']:.0f} s wall / {t['cpu_s']:.0f} s CPU"
        )

    crap0 = load_model(parent).crappifier
    crap = CrappifierConfig(crap0.kind, crap0.scale, crap0.params, {})  # nominal noise, no jitter
    fs = full_scale_of(test_hr)
    lr = crap(test_hr, rng=0)
    hr = crop_to_scale(test_hr, lr.shape, SCALE).astype(np.float32)
    preds = {
        "bilinear": bilinear(lr, SCALE),
        "bilinear + Gaussian 1": smoother(lr, 1.0),
        "bilinear + Gaussian 2": smoother(lr, 2.0),
        f"built-in {parent}": restore_planes(parent, lr),
    }
    for label, r in runs.items():
        preds[label] = restore_planes(r["path"], lr)
    for item in args.extra:
        label, path = item.split("=", 1)
        tr = read_metadata(path)["training"]
        runs[label] = {
            "path": path,
            "command": tr.get("command"),
            "loop_minutes": tr["minutes"],
            "steps": tr["steps"],
        }
        preds[label] = restore_planes(path, lr)
    rows = {"ground truth": {"beyond_3sigma": fidelity_rate(hr, lr, crap, fs), "hf_power": 1.0}}
    for k, p in preds.items():
        rows[k] = score(k, p, hr, lr, crap, fs)
        print(f"{k:24s} " + "  ".join(f"{m} {v:.4f}" for m, v in rows[k].items()), flush=True)
    res = {
        "data": test_name,
        "degradation": crap.to_dict(),
        "train": {"budget": vars(args) | {"work": str(args.work)}, "runs": runs},
        "machine": f"{platform.machine()} ({platform.processor() or 'cpu'}), shared by other jobs",
        "rows": rows,
    }
    (work / "results.json").write_text(json.dumps(res, indent=1))
    if args.docs:
        (DOCS / f"feature-gan-{args.name}.json").write_text(json.dumps(res, indent=1))
        figure(
            DOCS / f"feature-gan-{args.name}.png",
            {
                "ground truth": hr,
                "bilinear": preds["bilinear"],
                f"built-in {parent}": preds[f"built-in {parent}"],
            }
            | {k: preds[k] for k in runs},
            setup["crop"],
            f"held-out {test_name} (x{SCALE}, {crap.kind} degradation, seed 0)",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
