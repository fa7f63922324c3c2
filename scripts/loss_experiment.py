"""Does training for PSNR (MSE) instead of L1 make `em` a better denoiser?  (issue 11)

    PYTHONPATH=. python scripts/loss_experiment.py [--steps 1200] [--l3-sections 10] [--docs]

The ceiling analysis (scripts/ceiling_analysis.py) found that on ssTEM `em` loses most of its
gain to the input's noise.  PSNR is a mean-squared-error measure and the HR targets are noisy;
an L1-trained network estimates a conditional median, an MSE-trained one the conditional mean,
which is what PSNR rewards.  This fine-tunes the shipped `em` on its own recipe (the training
split and degradation of scripts/train_builtin.py's `em`: ISBI 0-24 and the non-held-out EPFL
slices, `pssr-em` with noise jitter 0.3-3x, 48 px patches, batch 8) for the same number of steps
once with L1 (the shipped loss: the control for "more training") and once with MSE, same seed
and learning rate, one torch thread each (run side by side), and scores both with the shipped
`em` on the held-out EM sets of scripts/evaluate_gpu_models.py (ISBI 25-29, EPFL 0161-0164,
L3 VNC sections 0 to N-1) under `pssr-em` nominal and the point-scan `em` preset.

Writes ``docs/models/loss-experiment.json``; ``--docs`` prints the markdown table.
"""

# ruff: noqa: E402 (the scripts folder and the checkout go on sys.path first)
from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _experiment_common import MACHINE, train_one
from evaluate_gpu_models import em_tests, nominal, run_test
from finetune_experiment import DOCS
from train_builtin import em_sources

from pssr.degrade.crappify import get_preset
from pssr.nn.modelfile import load_model

torch.set_num_threads(1)
LOSSES = ("l1", "mse")


def _train(args: tuple) -> dict:
    loss, out, steps, seed, lr = args
    torch.set_num_threads(1)
    parent = load_model("em")
    t = train_one(
        Path(out), em_sources("train"), parent.crappifier, parent.config, init="em", steps=steps, seed=seed,
        norm=parent.normalization, patch=48, lr=lr, loss=loss,
    )  # fmt: skip
    return {**t, "loss": loss, "path": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of both fine-tunes")
    ap.add_argument("--l3-sections", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pssr-loss"))
    ap.add_argument("--docs", action="store_true")
    ap.add_argument("--models", nargs="+", default=None, metavar="LABEL=FILE", help="score these instead")
    ap.add_argument("--json", default="loss-experiment.json", help="result file name in docs/models")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    em = load_model("em")
    models = {"em (shipped)": (em, "single")}
    runs: dict = {}
    if args.models:
        for item in args.models:
            label, _, path = item.partition("=")
            lm = load_model(path)
            models[label] = (lm, "mirror" if lm.frames > 1 else "single")
            runs[label] = {"path": path, "training": lm.meta.get("training", {})}
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        jobs = [
            (
                loss,
                args.work / f"em-{loss}-{args.steps}-s{args.seed}.safetensors",
                args.steps,
                args.seed,
                args.lr,
            )
            for loss in LOSSES
        ]
        with get_context("spawn").Pool(len(jobs)) as pool:  # side by side, one thread each
            runs = {r["loss"]: r for r in pool.map(_train, jobs)}
        for r in runs.values():
            print(
                f"trained {r['loss']}: {r['steps']} steps, {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU"
            )
        models.update(
            {f"em + {loss.upper()} fine-tune": (load_model(runs[loss]["path"]), "single") for loss in LOSSES}
        )
    results: dict = {}
    for test, (hr, _desc) in em_tests(args.l3_sections).items():
        for deg, label in ((nominal(em), "pssr-em nominal"), (get_preset("em", 4), "em point-scan")):
            rows, _ = run_test(hr, deg, models, 4)
            results[f"{test} | {label}"] = {
                k: {"psnr": v["psnr"], "ssim": v["ssim"], "psnr_per_plane": v.get("psnr_per_plane")}
                for k, v in rows.items()
            }
            b = rows["bilinear"]["psnr"]
            print(
                f"{test:6s} {label:16s} bilinear {b:.2f} "
                + "  ".join(f"{m} {rows[m]['psnr'] - b:+.2f}/{rows[m]['ssim']:.3f}" for m in models),
                flush=True,
            )
    payload = {
        "what": "em fine-tuned with L1 vs MSE at the same budget, scored on the held-out EM sets",
        "machine": MACHINE,
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": runs,
        "seconds": time.monotonic() - t0,
        "results": results,
    }
    (DOCS / args.json).write_text(json.dumps(payload, indent=1, default=float))
    if args.docs:
        print(table(results, list(models)))
    return 0


def table(results: dict, models: list[str]) -> str:
    lines = [
        "| held-out set | degradation | bilinear (dB) | best smoother | " + " | ".join(models) + " |",
        "|---|---|---|---|" + "---|" * len(models),
    ]
    for key, rows in results.items():
        test, label = key.split(" | ")
        b = rows["bilinear"]["psnr"]
        best = next(v for k, v in rows.items() if k.startswith("best smoother"))
        cells = [f"{rows[m]['psnr'] - b:+.2f} / {rows[m]['ssim']:.3f}" for m in models]
        lines.append(f"| {test} | {label} | {b:.2f} | {best['psnr'] - b:+.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: PSNR gain over bilinear (dB) / SSIM. Mean over planes of each set.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
