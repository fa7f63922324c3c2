"""Does adapting ``em`` to a "new microscope" with the README's recipe make it worse? (issue 27, item 4)

No real low/high-resolution pair is available here, so a stand-in microscope degrades held-out
volumes in a way that is neither the ``em`` preset nor the built-in's own ``pssr-em``: a smaller
Gaussian probe (sigma 0.6 HR px), the beam moving during the pixel dwell along the fast axis (a
4-HR-px box along X), point sampling at the LR pixel centres, then Poisson noise at 20 e-/pixel at
full scale and Gaussian detector noise (3 % of full scale), added at LR (:func:`microscope`).

A user holds a "real" low-resolution scan of SBEM block 2 (``cdeep3m_sbem_block2.tif`` sections
0-4, never seen by ``em``) and fine-tunes on the ISBI ssTEM volume, as issue 27 reports:

    pssr train isbi2012_sstem_train.tif --init em [--preset em] --noise-from standin_lr.tif --steps N

Every variant is scored (paper-style PSNR / SSIM, per plane, averaged) on the stand-in pairs of
SBEM block 2 sections 0-4 and of the L3 VNC ssTEM sections 15-19 (``drosophila_l3_vnc_sstem.tif``,
also never seen by ``em``), against the parent ``em`` and bilinear.  Fine-tunes run with
``--no-parent-check`` so that the raw fine-tune is scored; the check's verdict (which the default
``pssr train --init`` acts on) is read from the model's metadata (``training.parent_check``).

    python scripts/adapt_experiment.py --docs          # writes docs/models/adapt-em.json

Trained models are cached in ``--work`` (default /tmp/pssr-adapt): a rerun only evaluates.
One torch thread per training process (``OMP_NUM_THREADS=1``), fixed steps and seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy.ndimage import uniform_filter1d

from pssr.degrade.crappify import em_point_scan, estimate_noise, noise_params
from pssr.nn.modelfile import read_metadata
from pssr.quality.evaluate import evaluate_model
from pssr.quality.metrics import bilinear, crop_to_scale, psnr, ssim

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DOCS = ROOT / "docs" / "models"
SCALE = 4

#: The stand-in microscope (see the module docstring).
MICROSCOPE = {"probe_sigma": 0.6, "dwell_px": 4, "dose": 20.0, "read_sigma": 0.03, "full_scale": 255.0}

#: (label, extra ``pssr train`` flags, steps).  "the user's recipe" is the command of issue 27.
VARIANTS = [
    ("preset em + noise fit (the reported recipe)", ["--preset", "em", "--noise-from", "{lr}"], 300),
    ("own degradation (pssr-em) + noise fit", ["--noise-from", "{lr}"], 300),
    ("own degradation (pssr-em), no noise fit", [], 300),
    ("preset em + noise fit (the reported recipe)", ["--preset", "em", "--noise-from", "{lr}"], 100),
    ("own degradation (pssr-em) + noise fit", ["--noise-from", "{lr}"], 100),
]


def microscope(hr: np.ndarray, seed: int = 0) -> np.ndarray:
    """The stand-in microscope's low-resolution scan of ``hr`` (uint8 ZYX), float32 in its units."""
    m = MICROSCOPE
    dwell = uniform_filter1d(np.asarray(hr, np.float32), m["dwell_px"], axis=-1, mode="reflect")
    return em_point_scan(
        dwell, SCALE, dose=m["dose"], read_sigma=m["read_sigma"], probe_sigma=m["probe_sigma"],
        full_scale=m["full_scale"], rng=seed,
    )  # fmt: skip


def tests() -> dict[str, np.ndarray]:
    """The held-out HR volumes (never seen by ``em`` nor sampled by any fine-tune)."""
    return {
        "SBEM block 2, sections 0-4": tifffile.imread(DATA / "em" / "cdeep3m_sbem_block2.tif")[:5],
        "L3 VNC ssTEM, sections 15-19": tifffile.imread(DATA / "em" / "drosophila_l3_vnc_sstem.tif")[15:],
    }


def train_run(work: Path, flags: list[str], out: Path) -> dict:
    """One ``pssr train`` process (cached); wall and CPU seconds."""
    timing = out.with_suffix(".time.json")
    if out.exists() and timing.exists():
        return json.loads(timing.read_text())
    for p in (out, out.with_name(out.name.replace(".safetensors", ".ckpt.safetensors"))):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pssr", "train", str(DATA / "em" / "isbi2012_sstem_train.tif"),
           "--init", "em", *flags, "--seed", "0", "--no-parent-check", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(work / "train.log", "a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=work, env=env)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = {"wall_s": time.monotonic() - t0, "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)}
    timing.write_text(json.dumps(t))
    return t


def score(hr: np.ndarray, pred: np.ndarray) -> dict:
    planes = zip(pred.reshape((-1,) + pred.shape[-2:]), hr.reshape((-1,) + hr.shape[-2:]), strict=True)
    return {"psnr": psnr(pred, hr), "ssim": ssim(pred, hr), "psnr_per_plane": [psnr(p, h) for p, h in planes]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pssr-adapt"))
    ap.add_argument("--docs", action="store_true", help="write docs/models/adapt-em.json")
    ap.add_argument("--only", type=int, nargs="*", help="train only these VARIANTS indices (then stop)")
    args = ap.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    held = tests()
    lrs = {name: microscope(hr) for name, hr in held.items()}
    lr_path = work / "standin_lr.tif"  # the user's "real" low-resolution scan: SBEM block 2
    if not lr_path.exists():
        tifffile.imwrite(lr_path, next(iter(lrs.values())), imagej=True, metadata={"axes": "ZYX"})
    fit = estimate_noise(tifffile.imread(lr_path)[0])
    runs = {}
    for i, (label, flags, steps) in enumerate(VARIANTS):
        if args.only is not None and i not in args.only:
            continue
        out = work / f"v{i}-{steps}.safetensors"
        flags = [f.replace("{lr}", str(lr_path)) for f in flags] + [
            "--steps",
            str(steps),
            "--val-every",
            str(steps),
        ]
        t = train_run(work, flags, out)
        meta = read_metadata(out)
        runs[f"v{i}"] = {
            "label": label, "steps": steps, "flags": flags, **t,
            "crappifier": meta["crappifier"], "parent_check": meta["training"].get("parent_check"),
        }  # fmt: skip
        print(f"{label}, {steps} steps: {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU", flush=True)
    if args.only is not None:
        return 0

    results = {}
    for name, hr_full in held.items():
        lr = lrs[name]
        hr = crop_to_scale(hr_full, lr.shape, SCALE)
        rows = {"bilinear": score(hr, bilinear(lr, SCALE))}
        _, _, pred = evaluate_model(hr, "em", lr=lr, axes="ZYX")
        rows["parent em"] = score(hr, pred)
        for key, run in runs.items():
            _, _, pred = evaluate_model(
                hr, str(work / f"{key}-{run['steps']}.safetensors"), lr=lr, axes="ZYX"
            )
            rows[key] = score(hr, pred)
        results[name] = rows
        print(f"scored {name}", flush=True)

    report = {
        "what": "issue 27 item 4: the adaptation recipe on a stand-in microscope (see the script's docstring)",
        "microscope": MICROSCOPE,
        "noise_fit_of_the_standin_lr": fit,
        "pssr_em_noise_from_fit": noise_params("pssr-em", fit, SCALE),
        "em_noise_from_fit": noise_params("em", fit, SCALE),
        "train_data": "isbi2012_sstem_train.tif (all 30 sections; the parent em saw 0-24)",
        "machine": f"{platform.machine()} CPU, 1 torch thread per training process (2 cores shared)",
        "runs": runs,
        "results": results,
    }
    (work / "results.json").write_text(json.dumps(report, indent=2))
    print(table(report))
    if args.docs:
        (DOCS / "adapt-em.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def table(report: dict) -> str:
    """Markdown: one row per variant, a column per held-out test (PSNR, and vs parent / bilinear)."""
    names = list(report["results"])
    head = "| variant | steps | " + " | ".join(f"{n}: PSNR (dB) / vs parent / vs bilinear" for n in names)
    lines = [head + " | parent check (held-out ISBI patches) | train time |", "|" + "---|" * (len(names) + 4)]
    keys = ["bilinear", "parent em", *report["runs"]]
    for k in keys:
        run = report["runs"].get(k)
        label, steps = (run["label"], str(run["steps"])) if run else (k, "-")
        cells = []
        for n in names:
            rows = report["results"][n]
            v, par, bil = rows[k]["psnr"], rows["parent em"]["psnr"], rows["bilinear"]["psnr"]
            cells.append(f"{v:.2f} / {v - par:+.2f} / {v - bil:+.2f}")
        chk, cost = "-", "-"
        if run:
            c = run["parent_check"]
            chk = f"{c['psnr_finetune'] - c['psnr_parent']:+.2f} dB: keeps the {c['kept']}" if c else "-"
            cost = f"{run['wall_s'] / 60:.1f} min wall ({run['cpu_s'] / 60:.1f} CPU-min)"
        lines.append(f"| {label} | {steps} | " + " | ".join(cells) + f" | {chk} | {cost} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
