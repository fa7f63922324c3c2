"""How far can a 4x restoration get above bilinear on each held-out set?  (issue 11, goal analysis)

    PYTHONPATH=. python scripts/ceiling_analysis.py [--l3-sections 20] [--docs]

PSNR is measured against the real high-resolution image, which carries its own acquisition
noise.  If that noise (variance ``v`` per pixel, in the metric's normalised units) is
independent of the low-resolution input, every method's mean squared error against the HR image
is its error against the noise-free HR image plus ``v``.  So no method can score above
``-10 log10(v)`` (the clean HR image itself), and the most any method can gain over bilinear is
``PSNR(clean) - PSNR(bilinear)``.  This script puts the issue-11 goals (+1.0 dB over bilinear
on EM, +2.0 dB on fluorescence) next to that ceiling, per held-out set and degradation, with
the built-in models' scores and two more reference points: bilinear upsampling of the
noise-free low-resolution image (a perfect denoiser followed by bilinear), and the built-in
models given that noise-free image (what they add beyond denoising).  All differences are
to bilinear on the noisy input.

``v`` is not known; it is estimated on each HR plane in two independent ways, both reported:

* ``pssr`` - :func:`pssr.degrade.crappify.estimate_noise` (Poisson-Gaussian fit on the diagonal Haar
  detail of the flattest tiles per intensity bin; ``var = gain * x + sigma^2`` averaged over the
  plane's pixels);
* ``wavelet`` - Donoho's estimator (as :func:`skimage.restoration.estimate_sigma`, which needs
  PyWavelets): the median absolute value of the finest diagonal (orthonormal Haar) detail over the
  whole plane / 0.6745; signal-independent Gaussian noise assumed.

Both are checked first on the same planes with Gaussian noise of known variance added: the
increase they report is printed next to the variance added (the "calibration" rows).

Tests and degradations are those of scripts/evaluate_gpu_models.py (seed 0, nominal noise).
Writes ``docs/models/ceiling.json``; ``--docs`` also prints the markdown table.
"""

# ruff: noqa: E402 (the scripts folder and the checkout go on sys.path first)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _experiment_common import NOISE_KEY, restore_planes
from evaluate_gpu_models import em_tests, fluo_tests, nominal, run_test
from finetune_experiment import DOCS

from pssr.degrade.crappify import CrappifierConfig, estimate_noise, get_preset
from pssr.nn.modelfile import load_model
from pssr.quality.metrics import bilinear, crop_to_scale, psnr

torch.set_num_threads(1)
SCALE = 4
CALIBRATION_SIGMA = 0.02  # Gaussian noise added for the estimator check, fraction of the HR range


def noise_free(deg: CrappifierConfig) -> CrappifierConfig:
    """The same degradation with its noise switched off (downsampling/blur only)."""
    p = dict(deg.params)
    key = NOISE_KEY[deg.kind]
    p[key] = float("inf") if key in ("dose", "photons") else 0.0
    if deg.kind in ("em", "fluo"):
        p["read_sigma"] = 0.0
    return CrappifierConfig(deg.kind, deg.scale, p)


def _range(plane: np.ndarray) -> float:
    lo, hi = np.percentile(plane, [0.1, 99.9])
    return float(hi - lo)


def raw_noise_var(plane: np.ndarray, how: str, full_scale: float) -> float:
    """Mean noise variance of one plane in its own intensity units."""
    plane = np.asarray(plane, np.float64)
    if how == "wavelet":  # Donoho: sigma = median |finest diagonal detail| / 0.6745 (orthonormal Haar)
        c = plane[: plane.shape[0] // 2 * 2, : plane.shape[1] // 2 * 2]
        hh = (c[0::2, 0::2] - c[0::2, 1::2] - c[1::2, 0::2] + c[1::2, 1::2]) / 2
        return float(np.median(np.abs(hh)) / 0.6745) ** 2
    fit = estimate_noise(plane.astype(np.float32), full_scale=full_scale)
    x = np.clip(plane / full_scale, 0, None)
    return float(np.mean(fit["gain"] * x + fit["sigma"] ** 2)) * full_scale**2


def noise_var(plane: np.ndarray, how: str, full_scale: float) -> float:
    """Mean noise variance of one HR plane in the metric's units (fraction of its 0.1-99.9 % range)."""
    return raw_noise_var(plane, how, full_scale) / _range(plane) ** 2


def ceiling(hr: np.ndarray, how: str, full_scale: float) -> dict:
    """Per-plane PSNR of the (unknown) clean HR image against the real one: -10 log10(v)."""
    vs = [noise_var(p, how, full_scale) for p in hr.reshape((-1,) + hr.shape[-2:])]
    return {"psnr": float(np.mean([-10 * np.log10(v) for v in vs])), "var_per_plane": vs}


def calibration(hr: np.ndarray, full_scale: float, rng: np.random.Generator) -> dict:
    """Each estimator's increase when Gaussian noise of known variance is added to the HR planes.

    Both in the metric's units (fractions of the plane's 0.1-99.9 % range).
    """
    out = {}
    planes = hr.reshape((-1,) + hr.shape[-2:])[:4].astype(np.float64)
    for how in ("pssr", "wavelet"):
        seen = []
        for p in planes:
            r = _range(p)
            noisy = p + rng.normal(0, CALIBRATION_SIGMA * r, p.shape)
            seen.append((raw_noise_var(noisy, how, full_scale) - raw_noise_var(p, how, full_scale)) / r**2)
        out[how] = {"added": CALIBRATION_SIGMA**2, "estimated_increase": float(np.mean(seen))}
    return out


def _mirror(lm, lr: np.ndarray) -> np.ndarray:
    """A section-context model on a block, its two end sections mirrored (as pssr predict does)."""
    k = lm.frames // 2
    return restore_planes(lm, np.pad(lr, ((k, k), (0, 0), (0, 0)), mode="reflect"))[k:-k]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--l3-sections", type=int, default=20)
    ap.add_argument("--docs", action="store_true", help="print the markdown table")
    args = ap.parse_args(argv)
    em, em3d, fluo = load_model("em"), load_model("em-3d"), load_model("fluo")
    fams = {
        "em": (em_tests(args.l3_sections), [nominal(em), get_preset("em", SCALE)], 255.0),
        "fluo": (fluo_tests(), [nominal(fluo), get_preset("pssr-fluo", SCALE)], None),
    }
    rng = np.random.default_rng(0)
    results: dict = {}
    t_start = time.monotonic()
    for fam, (tests, degs, fs) in fams.items():
        models = (
            {"em": (em, "single"), "em-3d": (em3d, "mirror")} if fam == "em" else {"fluo": (fluo, "single")}
        )
        for test, (hr_full, _desc) in tests.items():
            full_scale = fs if fs is not None else float(np.percentile(hr_full, 99.99))
            for deg in degs:
                label = f"{deg.kind} {'nominal' if deg is degs[0] else 'preset'}"
                t0 = time.monotonic()
                rows, _ = run_test(hr_full, deg, models, SCALE)
                lr0 = noise_free(deg)(hr_full, rng=0)
                hr = crop_to_scale(hr_full, lr0.shape, SCALE)
                if lr0.ndim == 2:
                    lr0, hr = lr0[None], hr[None]
                clean_bil = psnr(bilinear(lr0, SCALE), hr)
                # the models on the noise-free input: what they add beyond denoising
                clean_models = {
                    m: psnr(restore_planes(lm, lr0) if mode != "mirror" else _mirror(lm, lr0), hr)
                    for m, (lm, mode) in models.items()
                }
                ceil = {how: ceiling(hr, how, full_scale) for how in ("pssr", "wavelet")}
                b = rows["bilinear"]["psnr"]
                best = next(v for k, v in rows.items() if k.startswith("best smoother"))
                entry = {
                    "bilinear": b,
                    "best_smoother": best["psnr"],
                    "noise_free_bilinear": clean_bil,
                    "models": {m: rows[m]["psnr"] for m in models},
                    "models_on_noise_free_input": clean_models,
                    "ceiling": ceil,
                    "seconds": time.monotonic() - t0,
                }
                results[f"{test} | {label}"] = entry
                print(
                    f"{test:11s} {label:16s} bilinear {b:6.2f}  noise-free bilinear {clean_bil - b:+.2f}  "
                    + "  ".join(f"{m} {v - b:+.2f}" for m, v in entry["models"].items())
                    + "  on noise-free input "
                    + "  ".join(f"{m} {v - b:+.2f}" for m, v in clean_models.items())
                    + "  ceiling "
                    + " / ".join(f"{how} {c['psnr'] - b:+.2f}" for how, c in ceil.items())
                    + f"  ({entry['seconds']:.0f} s)",
                    flush=True,
                )
            results[f"{test} | calibration"] = calibration(hr_full, full_scale, rng)
            print(f"{test:11s} calibration {results[f'{test} | calibration']}", flush=True)
    payload = {
        "what": "PSNR ceiling (clean HR vs real HR) per held-out set, from two noise estimators; see the script",
        "scale": SCALE,
        "seconds": time.monotonic() - t_start,
        "results": results,
    }
    (DOCS / "ceiling.json").write_text(json.dumps(payload, indent=1))
    if args.docs:
        print(table(results))
    return 0


def table(results: dict) -> str:
    head = (
        "| held-out set | degradation | bilinear (dB) | best smoother | built-in model(s) | noise-free bilinear "
        "| model(s) on the noise-free input | ceiling, pssr fit | ceiling, wavelet | goal |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for key, e in results.items():
        test, label = key.split(" | ")
        if label == "calibration":
            continue
        b = e["bilinear"]
        goal = "+2.0" if test in ("bpae-actin", "aics-c2") else "+1.0"
        lines.append(
            f"| {test} | {label} | {b:.2f} | {e['best_smoother'] - b:+.2f} | "
            + ", ".join(f"{m} {v - b:+.2f}" for m, v in e["models"].items())
            + f" | {e['noise_free_bilinear'] - b:+.2f} | "
            + ", ".join(f"{m} {v - b:+.2f}" for m, v in e["models_on_noise_free_input"].items())
            + f" | {e['ceiling']['pssr']['psnr'] - b:+.2f} | {e['ceiling']['wavelet']['psnr'] - b:+.2f} | {goal} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
