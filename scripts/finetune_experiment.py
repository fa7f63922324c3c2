"""Does a short fine-tune from a built-in model beat the built-in and a from-scratch model?

Reproduces the fine-tuning rows of docs/models/experiments.md:

    python scripts/finetune_experiment.py em --steps 150 --seeds 0 1 2 --docs
    python scripts/finetune_experiment.py fluo --steps 150 --seeds 0 1 --docs

Trained models are cached in ``--work`` (default /tmp/pssr-finetune): a rerun only evaluates.

``em``: third-instar *Drosophila* VNC ssTEM (Gerhard et al. 2013, figshare
doi:10.6084/m9.figshare.856713, CC BY-NC-SA 3.0), a volume the built-in ``em`` never saw.
Sections 0-14 train, sections 15-19 are held out whole (never sampled).

``fluo``: BPAE actin (widefield, CC-BY 4.0), a structure the built-in ``fluo`` never saw
(it was trained on mitochondria, nuclei and membranes).  There is one actin image only, so
its left 704 columns train and its right 384 columns are held out (disjoint pixels, not a
separate image).

Both runs of a seed use the same command apart from ``--init``: the built-in's training
degradation (``pssr-em`` / ``fluo``) with its noise jitter as closely as ``--jitter`` allows
(1/3 to 3x instead of 0.3 to 3x), the same fixed number of steps and seed; the wall and CPU time
of each ``pssr train`` process are recorded.  Every trained model, the built-in, bilinear and
bilinear + Gaussian (sigma 2 HR pixels, and the best sigma chosen on the test) then restore the
same held-out low-resolution input (seed 0) under the built-in's nominal degradation and under a
second one (em: the physical point-scan preset; fluo: the original PSSR fluorescence one), and
are scored with pssr.quality.metrics (paper-style PSNR / SSIM, per plane, averaged).

Writes ``<work>/results<tag>.json`` and, with ``--docs``, ``docs/models/finetune-<name><tag>.json``
and (without a tag) the crop figure ``docs/models/finetune-<name>.png``; prints the markdown table.  The
learning-rate comparison in experiments.md:

    python scripts/finetune_experiment.py em --steps 150 --seeds 0 --lr 1e-3 1e-4 --tag=-lr --docs
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

from pssr.degrade.crappify import get_preset
from pssr.nn.modelfile import load_model, read_metadata
from pssr.quality.evaluate import evaluate_model
from pssr.quality.metrics import bilinear, crop_to_scale, psnr, ssim

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DOCS = ROOT / "docs" / "models"
SMOOTH_SIGMA = 2.0  # HR pixels
SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)  # the "best smoother" row picks the best of these on the test


def em_split() -> tuple[np.ndarray, np.ndarray, str]:
    """(train, test) of the L3 VNC ssTEM volume: whole sections 0-14 / 15-19."""
    vol = tifffile.imread(DATA / "em" / "drosophila_l3_vnc_sstem.tif")
    return vol[:15], vol[15:], "drosophila_l3_vnc_sstem.tif sections 15-19"


def fluo_split() -> tuple[np.ndarray, np.ndarray, str]:
    """(train, test) of BPAE actin: columns 0-703 / 704-1087 (multiples of the scale)."""
    img = tifffile.imread(DATA / "fluo" / "BPAE_actin.tif").astype(np.float32)
    return img[:, :704], img[:, 704:1088], "BPAE_actin.tif columns 704-1087"


SETUPS = {
    "em": {
        "split": em_split,
        "parent": "em",
        "train_flags": ["--preset", "pssr-em"],
        "degradations": {"pssr-em (the em model's)": ("pssr-em", {}), "em point-scan": ("em", {})},
        "crop": (2, 384, 384, 256),  # (section, y, x, size) of the held-out data for the figure
    },
    "fluo": {
        "split": fluo_split,
        "parent": "fluo",
        "train_flags": ["--preset", "fluo"],
        "degradations": {"fluo point-scan (the fluo model's)": ("fluo", {}), "pssr-fluo": ("pssr-fluo", {})},
        "crop": (0, 200, 100, 256),
    },
}


def train_run(work: Path, train_tif: Path, flags: list[str], out: Path, log: Path) -> dict[str, float]:
    """One ``pssr train`` process; returns its wall time and CPU time (user + system) in seconds.

    The CPU time does not depend on what else the shared machine is running; the wall time does.
    """
    timing = out.with_suffix(".time.json")
    if out.exists() and timing.exists():
        return json.loads(timing.read_text())
    cmd = [sys.executable, "-m", "pssr", "-q", "train", str(train_tif), *flags, "--out", str(out)]
    for p in (out, out.with_name(out.name.replace(".safetensors", ".ckpt.safetensors"))):
        p.unlink(missing_ok=True)  # left by a run interrupted before its timing was written
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=work)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = {
        "wall_s": time.monotonic() - t0,
        "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
    }
    timing.write_text(json.dumps(t))
    return t


def jitter_flag(parent: str) -> list[str]:
    """``--jitter J``: the parent's noise jitter range (low, J) as (1/J, J), e.g. (0.3, 3) -> (0.33, 3)."""
    jit = load_model(parent).crappifier.jitter
    _lo, hi = next(iter(jit.values()))
    return ["--jitter", f"{hi:g}"]


def smoother(lr: np.ndarray, scale: int, sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    """Bilinear upsampling followed by a Gaussian (sigma in HR pixels) per plane."""
    up = bilinear(lr, scale)
    return np.stack([gaussian_filter(p, sigma) for p in up.reshape((-1,) + up.shape[-2:])]).reshape(up.shape)


def score(hr: np.ndarray, pred: np.ndarray) -> dict:
    """Paper-style PSNR / SSIM (per plane, averaged) and the PSNR of each plane."""
    planes = zip(pred.reshape((-1,) + pred.shape[-2:]), hr.reshape((-1,) + hr.shape[-2:]), strict=True)
    return {"psnr": psnr(pred, hr), "ssim": ssim(pred, hr), "psnr_per_plane": [psnr(p, h) for p, h in planes]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(SETUPS))
    ap.add_argument("--steps", type=int, default=150, help="training steps of every run (same for all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--lr", type=float, nargs="+", default=[1e-3], help="peak learning rate(s) of the fine-tune"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/pssr-finetune"))
    ap.add_argument("--docs", action="store_true", help="write the JSON and figure into docs/models/")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    args = ap.parse_args(argv)

    setup = SETUPS[args.name]
    work = args.work / args.name
    work.mkdir(parents=True, exist_ok=True)
    train_hr, test_hr, test_name = setup["split"]()
    train_tif = work / "train.tif"
    if not train_tif.exists():
        axes = "ZYX" if train_hr.ndim == 3 else "YX"
        tifffile.imwrite(train_tif, train_hr, imagej=train_hr.dtype != np.float32, metadata={"axes": axes})
    parent = setup["parent"]
    common = [
        *setup["train_flags"],
        *jitter_flag(parent),
        "--steps",
        str(args.steps),
        "--val-every",
        str(args.steps),
        "--ckpt-every",
        str(10 * args.steps),
    ]
    log = work / "train.log"
    runs: dict[str, list[dict]] = {}
    variants = [("scratch", [], 1e-3)] + [(f"fine-tune lr {lr:g}", ["--init", parent], lr) for lr in args.lr]
    for seed in args.seeds:
        for label, extra, lr in variants:
            out = work / f"{label.replace(' ', '_')}-s{seed}.safetensors"
            flags = [*common, *extra, "--seed", str(seed), "--learning-rate", f"{lr:g}"]
            t = train_run(work, train_tif, flags, out, log)
            meta = read_metadata(out)["training"]
            runs.setdefault(label, []).append(
                {"seed": seed, "path": str(out), **t, "train_minutes": meta["minutes"]}
            )
            print(
                f"{label} seed {seed}: {meta['steps']} steps, {meta['minutes']} min in the loop, "
                f"process {t['wall_s']:.0f} s wall / {t['cpu_s']:.0f} s CPU",
                flush=True,
            )

    results: dict[str, dict] = {}
    figure_preds: dict[str, np.ndarray] = {}
    for deg_name, (preset, params) in setup["degradations"].items():
        cfg = get_preset(preset, 4, **params)
        lr_img = cfg(test_hr, rng=0)
        hr = crop_to_scale(test_hr, lr_img.shape, 4)
        axes = "ZYX" if hr.ndim == 3 else "YX"
        rows: dict[str, dict] = {
            "bilinear": score(hr, bilinear(lr_img, 4)),
            f"bilinear + Gaussian sigma {SMOOTH_SIGMA:g}": score(hr, smoother(lr_img, 4)),
        }
        # The best classical smoother with its sigma chosen on the test data itself (optimistic
        # for the baseline, so conservative for the networks).
        best = max(
            ({**score(hr, smoother(lr_img, 4, s)), "sigma": s} for s in SIGMAS), key=lambda m: m["psnr"]
        )
        rows[f"best smoother (bilinear + Gaussian sigma {best['sigma']:g}, chosen on the test)"] = best
        _, _, pred = evaluate_model(hr, parent, lr=lr_img, axes=axes)
        rows[f"built-in {parent}"] = score(hr, pred)  # = res["model"], plus per-plane PSNR
        first = not figure_preds
        if first:
            figure_preds = {
                "low-res input": lr_img,
                "bilinear": bilinear(lr_img, 4),
                f"bilinear + Gaussian {SMOOTH_SIGMA:g}": smoother(lr_img, 4),
                f"built-in {parent}": pred,
            }
        for label, rs in runs.items():
            per_seed = []
            for r in rs:
                _, _, pred = evaluate_model(hr, r["path"], lr=lr_img, axes=axes)
                per_seed.append(score(hr, pred))
                if first and r["seed"] == args.seeds[0]:
                    figure_preds[f"{label} (seed {r['seed']})"] = pred
            rows[label] = {
                "psnr": float(np.mean([m["psnr"] for m in per_seed])),
                "ssim": float(np.mean([m["ssim"] for m in per_seed])),
                "psnr_per_seed": [m["psnr"] for m in per_seed],
                "ssim_per_seed": [m["ssim"] for m in per_seed],
                "psnr_per_plane_per_seed": [m["psnr_per_plane"] for m in per_seed],
            }
        results[deg_name] = rows
        if first:
            figure_preds["ground truth"] = hr

    report = {
        "setup": args.name,
        "test": test_name,
        "steps": args.steps,
        "seeds": args.seeds,
        "machine": f"{platform.machine()} CPU, {__import__('torch').get_num_threads()} threads (shared)",
        "train_command_common": common,
        "runs": runs,
        "results": results,
    }
    (work / f"results{args.tag}.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    if args.docs:
        (DOCS / f"finetune-{args.name}{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
        if not args.tag:  # the figure shows the main comparison only
            figure(figure_preds, setup["crop"], DOCS / f"finetune-{args.name}.png", test_name)
    return 0


def print_table(report: dict) -> None:
    """Markdown rows: one per variant and degradation."""
    print(
        "| degradation | variant | PSNR (dB) | SSIM | vs bilinear | vs smoother sigma 2 | vs best smoother "
        "| train steps / time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for deg, rows in report["results"].items():
        bil = rows["bilinear"]
        smo = next(v for k, v in rows.items() if k.startswith("bilinear + Gaussian"))
        top = next(v for k, v in rows.items() if k.startswith("best smoother"))
        for k, v in rows.items():
            extra = ""
            if "psnr_per_seed" in v:
                extra = " (seeds " + ", ".join(f"{p:.2f}" for p in v["psnr_per_seed"]) + ")"
            runs = report["runs"].get(k)
            cost = "-"
            if runs:
                mins = np.mean([r["train_minutes"] for r in runs])
                cpu = np.mean([r["cpu_s"] for r in runs]) / 60
                cost = (
                    f"{report['steps']} steps / {mins:.1f} min wall in the loop ({cpu:.1f} CPU-min process)"
                )
            print(
                f"| {deg} | {k} | {v['psnr']:.2f}{extra} | {v['ssim']:.3f} | "
                f"{v['psnr'] - bil['psnr']:+.2f} dB / {v['ssim'] - bil['ssim']:+.3f} | "
                f"{v['psnr'] - smo['psnr']:+.2f} dB / {v['ssim'] - smo['ssim']:+.3f} | "
                f"{v['psnr'] - top['psnr']:+.2f} dB / {v['ssim'] - top['ssim']:+.3f} | {cost} |"
            )
    # Paired, per held-out plane: how often each trained variant beats the built-in (every seed).
    for deg, rows in report["results"].items():
        builtin = next(v for k, v in rows.items() if k.startswith("built-in"))["psnr_per_plane"]
        for k, v in rows.items():
            if "psnr_per_plane_per_seed" in v:
                d = np.array(v["psnr_per_plane_per_seed"]) - np.array(builtin)[None]
                print(
                    f"{deg}: {k} - built-in per plane and seed: {int((d > 0).sum())}/{d.size} positive, "
                    f"min {d.min():+.3f}, max {d.max():+.3f} dB"
                )


def figure(preds: dict[str, np.ndarray], crop: tuple[int, int, int, int], path: Path, title: str) -> None:
    """Before/after crops of one held-out plane (the low-res input shown with nearest pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plane, y, x, size = crop
    gt = preds["ground truth"]
    gt2 = gt[plane] if gt.ndim == 3 else gt
    lo, hi = np.percentile(gt2, [0.5, 99.5])
    names = list(preds)
    fig, axs = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.6))
    for ax, name in zip(axs, names, strict=True):
        a = preds[name]
        a = a[plane] if a.ndim == 3 else a
        if name == "low-res input":
            a = np.kron(a, np.ones((4, 4), a.dtype))
        c = a[y : y + size, x : x + size]
        if name != "ground truth":  # show every method on the ground truth's grey scale
            g = gt2[y : y + size, x : x + size].ravel().astype(np.float64)
            p = c.ravel().astype(np.float64)
            A = np.vstack([p, np.ones_like(p)]).T
            gain, off = np.linalg.lstsq(A, g, rcond=None)[0]
            c = c * gain + off
        ax.imshow(c, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    fig.suptitle(f"held out: {title}, {size}x{size} HR px crop", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
