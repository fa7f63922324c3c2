"""Multi-frame that never loses to single-frame (issue 11, item 5).

    python scripts/multiframe_experiment.py probe --docs     # motion between frames, fluo vs fluo-mf
    python scripts/multiframe_experiment.py train --steps 150 --docs
    python scripts/multiframe_experiment.py train --steps 1500 --tag=-1500 --variants 1,5 --docs

Held out: frames 24-29 of the MitoCheck HeLa nuclei timelapse and of the Golgi/brefeldin-A
timelapse (NEUBIAS training-resources, CC-BY 4.0).  The built-in ``fluo-mf`` was trained on
frames 0-23 of the same two movies (so these frames are held out for it too); ``fluo`` never
saw either movie.  Every frame is degraded independently with the ``fluo`` point-scan preset
(seed 0); movies are passed as float32 so the noise is relative to their 99.9th percentile,
as in training (the MitoCheck uint8 movie sits far below 255).

``probe``: frame-to-frame motion (phase correlation of consecutive HR frames, HR pixels) and
the held-out scores of bilinear, the smoothers, ``fluo``, ``fluo-mf`` and ``fluo-mf`` with its
neighbours replaced by the centre frame (if that is better, the neighbours hurt).

``train``: two fine-tunes of ``fluo`` with the same data, steps, patch, seed and degradation:
``1 frame`` (fluo's own input) and ``5 frames`` (fluo widened to t-2..t+2 with the neighbours'
first-layer weights at zero, pssr.nn.model.widen_inputs, so it starts exactly at ``fluo``;
trained with motion augmentation: neighbours shifted up to 1 LR px and rotated up to 2
degrees per frame of distance).  Training material: MitoCheck frames 0-23 plus an AICS
hiPSC membrane crop (BBBC034) repeated 5 times as pseudo-time (motion augmentation makes its
"neighbours" move).  The Golgi movie is never trained on by these two, so it is an unseen
movie for them (``fluo-mf`` saw its frames 0-23).
"""

# ruff: noqa: E402 (the scripts folder and the checkout go on sys.path first)
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _experiment_common import MACHINE, baselines, restore_planes, score, table, train_one, widened_parent
from finetune_experiment import DATA, DOCS

from pssr.degrade.crappify import CrappifierConfig
from pssr.nn.modelfile import load_model
from pssr.quality.metrics import crop_to_scale
from pssr.training.data import Source

MOVIES = {"mitocheck": "mitocheck_nuclei_timelapse.tif", "golgi": "golgi_bfa_timelapse.tif"}
MOTION = (1.0, 2.0)
# --variants keys: 1 = single-frame fine-tune, 5 = widened with zero neighbour weights,
# 5spread = widened with spread init (both 5-frame variants with motion augmentation).
VARIANTS = ("1", "5", "5spread")


def movie(name: str) -> np.ndarray:
    return tifffile.imread(DATA / "fluo" / MOVIES[name]).astype(np.float32)


def motion_probe() -> dict:
    from skimage.registration import phase_cross_correlation

    out = {}
    for name in MOVIES:
        m = movie(name)
        shifts = [phase_cross_correlation(m[t], m[t + 1], upsample_factor=10)[0] for t in range(len(m) - 1)]
        mag = [float(np.hypot(*s)) for s in shifts]
        corr = [float(np.corrcoef(m[t].ravel(), m[t + 1].ravel())[0, 1]) for t in range(len(m) - 1)]
        out[name] = {
            "global_shift_hr_px_mean": round(float(np.mean(mag)), 2),
            "global_shift_hr_px_max": round(float(np.max(mag)), 2),
            "adjacent_frame_corr_mean": round(float(np.mean(corr)), 3),
            "adjacent_frame_corr_min": round(float(np.min(corr)), 3),
        }
    return out


def evaluate(models: dict[str, str], runs: dict[str, dict]) -> dict[str, dict]:
    crap = CrappifierConfig("fluo", 4)
    results = {}
    for name in MOVIES:
        test_hr = movie(name)[24:]
        lr = crap(test_hr, rng=0)
        hr = crop_to_scale(test_hr, lr.shape, 4)
        rows = baselines(hr, lr)
        for label, ref in models.items():
            lm = load_model(ref)
            rows[label] = {**score(hr, restore_planes(lm, lr)), **({"run": label} if label in runs else {})}
            if lm.frames > 1:
                rows[f"{label}, neighbours replaced by the centre"] = score(
                    hr, restore_planes(lm, lr, context=False)
                )
        results[f"{MOVIES[name]} frames 24-29"] = rows
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["probe", "train"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pssr-mf"))
    ap.add_argument("--docs", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result file names (e.g. -1500)")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated trained variants out of {','.join(VARIANTS)} (default: all)",
    )
    args = ap.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := sorted(set(chosen) - set(VARIANTS)):
        ap.error(f"unknown --variants {unknown}; choose from {','.join(VARIANTS)}")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    models = {"built-in fluo": "fluo", "built-in fluo-mf": "fluo-mf"}
    report: dict = {"machine": MACHINE}
    if args.what == "probe":
        report["motion"] = motion_probe()
        print(json.dumps(report["motion"], indent=1))
    else:
        parent = load_model("fluo")
        aics = tifffile.imread(DATA / "fluo" / "AICS_12_134_C0.tif")[256:768, 256:768].astype(np.float32)
        # The Golgi movie stays out of training entirely: it is the unseen movie (the analogue of
        # the migration movie); MitoCheck frames 24-29 are held-out frames of a seen movie.
        sources = [Source(movie("mitocheck")[:24], f"{MOVIES['mitocheck']} frames 0-23")]
        sources.append(
            Source(np.repeat(aics[None], 5, 0), "AICS_12_134_C0.tif [256:768, 256:768] x5 (pseudo-time)")
        )
        crap = parent.crappifier
        cfg5 = type(parent.config).from_dict({**parent.config.to_dict(), "in_channels": 5})
        variants = []
        if "1" in chosen:
            variants.append(("1 frame (fluo fine-tuned)", parent.config, "fluo", (0.0, 0.0)))
        if "5" in chosen:
            widened = widened_parent("fluo", cfg5, work / "fluo-5frames-widened.safetensors")
            variants.append(("5 frames from fluo, motion aug.", cfg5, widened, MOTION))
        if "5spread" in chosen:
            spread = widened_parent("fluo", cfg5, work / "fluo-5frames-spread.safetensors", spread=True)
            variants.append(("5 frames from fluo, spread init, motion aug.", cfg5, spread, MOTION))
        for label, cfg, init, motion in variants:
            out = (
                work
                / f"{label.split(' (')[0].replace(' ', '_').replace(',', '').replace('.', '')}-s{args.seed}.safetensors"
            )
            t = train_one(
                out,
                sources,
                crap,
                cfg,
                init=init,
                steps=args.steps,
                seed=args.seed,
                norm=parent.normalization,
                patch=32,
                motion=motion,
            )
            runs[label] = {**t, "path": str(out)}
            models[label] = str(out)
            print(
                f"{label}: {t['steps']} steps, {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU", flush=True
            )
        report.update(
            {
                "steps": args.steps,
                "seed": args.seed,
                "motion_aug": MOTION,
                "train_sources": [s.name for s in sources],
                "crappifier": crap.to_dict(),
            }
        )
    results = evaluate(models, runs)
    report.update({"runs": runs, "results": results})
    print(table(results, runs, first_col="held-out movie"))
    (work / f"multiframe-{args.what}{args.tag}.json").write_text(json.dumps(report, indent=2))
    if args.docs:
        (DOCS / f"multiframe-{args.what}{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
