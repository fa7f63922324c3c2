"""Noise-level conditioning (FFDNet-style) vs today's blind model with noise jitter (issue 11, item 2).

    python scripts/noise_conditioning_experiment.py em --steps 150 --patch 32 --docs
    python scripts/noise_conditioning_experiment.py fluo --steps 150 --patch 32 --docs

Both variants fine-tune the same built-in parent (``em`` / ``fluo``) on the same training
split as ``finetune_experiment.py`` (EM: L3 VNC ssTEM sections 0-14, held out 15-19; fluo:
BPAE actin columns 0-703, held out 704-1087), with the parent's degradation, the same wide
noise jitter (the noise parameter times 1/10..10, i.e. noise std x0.32..x3.2), the same
steps, batch, learning rate and seed.  They differ only in the input:

* ``blind``: the frame alone (today's design).
* ``noise map``: channel 0 is the expected noise std of every pixel (pssr.training.data.noise_std of
  the parameters drawn for that sample), frames follow.  The parent's first-layer weights
  are copied and the weights of the new channel start at zero (pssr.nn.model.widen_inputs),
  so at step 0 it computes exactly what the parent computes.

Tested on the held-out data degraded at 0.5x, 1x and 3x the nominal noise std (seed 0),
restoring whole planes.  The conditioned model is told the noise in two ways: ``fit``
(pssr.degrade.crappify.estimate_noise on the first held-out plane: what prediction does by default)
and ``known`` (the test degradation's true parameters: the user override).  Writes
``<work>/noise-<name>.json`` and, with ``--docs``, ``docs/models/noise-<name>.json``.
"""

# ruff: noqa: E402 (the scripts folder and the checkout go on sys.path first)
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _experiment_common import (
    MACHINE,
    baselines,
    restore_planes,
    scaled,
    score,
    table,
    train_one,
    widened_parent,
)
from finetune_experiment import DOCS, SETUPS

from pssr.degrade.crappify import CrappifierConfig, estimate_noise, full_scale_of
from pssr.nn.modelfile import load_model
from pssr.quality.metrics import crop_to_scale
from pssr.training.data import Source, noise_level

JITTER = 10.0  # on the variance-like parameter: std x 1/sqrt(10) .. sqrt(10)
FACTORS = (0.5, 1.0, 3.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=["em", "fluo"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--patch", type=int, default=32, help="LR patch size of every run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/pssr-noise"))
    ap.add_argument("--docs", action="store_true")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result file names (e.g. -600)")
    args = ap.parse_args(argv)

    setup = SETUPS[args.name]
    parent_name = setup["parent"]
    parent = load_model(parent_name)
    kind = parent.crappifier.kind
    key = {"em": "dose", "fluo": "photons"}.get(kind, "var_factor")
    crap = CrappifierConfig(kind, 4, dict(parent.crappifier.params), {key: (1 / JITTER, JITTER)})
    work = args.work / args.name
    work.mkdir(parents=True, exist_ok=True)
    train_hr, test_hr, test_name = setup["split"]()
    src = [
        Source(
            train_hr if train_hr.ndim == 3 else train_hr[None], f"train split of {test_name.split(' ')[0]}"
        )
    ]
    nm_cfg = type(parent.config).from_dict({**parent.config.to_dict(), "extra": {"noise_map": True}})
    widened = widened_parent(parent_name, nm_cfg, work / "parent-widened.safetensors")

    runs: dict[str, dict] = {}
    for seed in args.seeds:
        for label, cfg, init, nm in (
            ("blind", parent.config, parent_name, False),
            ("noise map", nm_cfg, widened, True),
        ):
            out = work / f"{label.replace(' ', '_')}-s{seed}.safetensors"
            t = train_one(
                out,
                src,
                crap,
                cfg,
                init=init,
                steps=args.steps,
                seed=seed,
                norm=parent.normalization,
                noise_map=nm,
                patch=args.patch,
            )
            runs[f"{label} s{seed}"] = {**t, "path": str(out)}
            print(
                f"{label} seed {seed}: {t['steps']} steps, {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU",
                flush=True,
            )
    if args.train_only:
        return 0

    results: dict[str, dict] = {}
    fits: dict[str, dict] = {}
    for k in FACTORS:
        test_cfg = scaled(kind, k)
        lr = test_cfg(test_hr if test_hr.ndim == 3 else test_hr[None], rng=0)
        hr = crop_to_scale(test_hr if test_hr.ndim == 3 else test_hr[None], lr.shape, 4)
        # The intensity the noise is relative to: what the crappifier used (dtype maximum for
        # integers, the HR 99.9th percentile for float), so "known" gain/sigma mean the same.
        fs = full_scale_of(test_hr)
        test = f"{kind} x{k:g} noise"
        rows = baselines(hr, lr)
        rows[f"built-in {parent_name} (blind)"] = score(hr, restore_planes(parent, lr))
        gain, sigma = noise_level(test_cfg)
        known = {"gain": gain, "sigma": sigma}
        # The default fit (16 intensity bins) needs more 8x8 tiles than the small fluo held-out
        # plane (170 x 96 LR) has; then fit with 8 bins.  The "fit" arm gets exactly this fit
        # (with the default bins, what noise="fit" computes from the same plane).
        try:
            fit, bins = estimate_noise(lr[0], full_scale=fs), 16
        except ValueError:
            fit, bins = estimate_noise(lr[0], full_scale=fs, n_bins=8), 8
        fitted = {"gain": fit["gain"], "sigma": fit["sigma"]}
        fits[test] = {"known": known, "fit": fitted, "fit_bins": bins, "full_scale": fs}
        for run_name, run in runs.items():
            lm = load_model(run["path"])
            if lm.config.noise_map:
                for how, noise in (("fit", fitted), ("known", known)):
                    r = score(hr, restore_planes(lm, lr, noise=noise, full_scale=fs))
                    rows[f"{run_name}, noise {how}"] = {**r, "run": run_name}
            else:
                rows[run_name] = {**score(hr, restore_planes(lm, lr)), "run": run_name}
        results[test] = rows
        print(f"-- {test} done", flush=True)
    report = {
        "setup": args.name,
        "test": test_name,
        "parent": parent_name,
        "train_crappifier": crap.to_dict(),
        "steps": args.steps,
        "patch": args.patch,
        "seeds": args.seeds,
        "machine": MACHINE,
        "runs": runs,
        "noise_fits": fits,
        "results": results,
    }
    (work / f"noise-{args.name}{args.tag}.json").write_text(json.dumps(report, indent=2))
    md = table(results, runs, first_col="held-out test")
    print(md)
    if args.docs:
        (DOCS / f"noise-{args.name}{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
