"""Score the GPU-trained models (H100 session) against the built-ins on held-out real data.

    PYTHONPATH=. python scripts/evaluate_gpu_models.py --gpu-dir /work/gpu_models --docs

(``--l3-sections 10`` scores only L3 VNC sections 0-9 if the full volume is too slow.)

Models: the built-ins ``em`` / ``fluo`` (pssr/models) and the files of ``--gpu-dir``:
``em.safetensors`` (fine-tuned from ``em``), ``em-3d.safetensors`` (3 input sections, from
``em`` spread over the sections), ``fluo.safetensors`` (fine-tuned from ``fluo``); all made by
``scripts/train_builtin.py NAME --init ... --device cuda --batch 32`` (benchmarks/gpu_session.sh;
the exact command is read from each file's metadata).

Held-out tests (never sampled by any of these models):

* EM, each a block of consecutive sections (ZYX):
  ``isbi``  ISBI 2012 ssTEM sections 25-29 (4 nm, 50 nm sections);
  ``epfl``  EPFL FIB-SEM slices training0161-0164 (5 nm isotropic, a consecutive run);
  ``l3vnc`` *Drosophila* L3 VNC ssTEM sections 0-19 (4.6 nm, 45-50 nm sections; Gerhard et al.
  2013, CC BY-NC-SA 3.0): a volume none of these models was trained on.
  Degradations: ``pssr-em`` nominal (the ``em`` models' own crappifier without its jitter) and
  the physical point-scan ``em`` preset at its defaults.
* Fluorescence, single images: ``bpae-actin`` (BPAE_actin.tif) and ``aics-c2``
  (AICS_12_134_C2.tif), read as float32; degradations ``fluo`` nominal (the ``fluo`` models'
  crappifier without jitter) and the original ``pssr-fluo``.

Every test set is degraded once with seed 0 and restored whole-plane by every method
(``_experiment_common.restore_planes``, as scripts/context_experiment.py does).  ``em-3d``
restores the stack with each section's real neighbours (edge-replicated at the two ends of the
block, as pssr predict and scripts/context_experiment.py do), as an ablation with its neighbours
replaced by the centre section, and (beyond the brief, a diagnosis) with the block ends
mirrored: the first section gets section 1 as both neighbours, the last section n-2.  Training
samples at a stack end see a replicated neighbour degraded with *independent* noise
(pssr.training.data.PairSampler crappifies every frame separately), while an edge-replicated test input
repeats the very same noisy section; mirroring gives the ends a real, independently noisy
neighbour instead.  Scores are the
paper-style PSNR / SSIM of pssr.quality.metrics (per plane, averaged); the "best smoother" is bilinear
followed by the Gaussian (sigma in HR px from finetune_experiment.SIGMAS) that scores best on the
test itself.  "mean shift" is mean(prediction) - mean(HR) as a fraction of the HR 0.1-99.9
percentile range (PSNR/SSIM fit an affine map first, so they do not see brightness shifts).
"overall" = the mean of the test sets' scores (each set counts once).

Writes ``docs/models/gpu-models.json`` and, with ``--docs``, the crops
``docs/models/gpu-models-<test>.png``; prints the markdown tables.
"""

# ruff: noqa: E402 (the scripts folder and the checkout go on sys.path first)
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import torch
from _experiment_common import baselines, restore_planes, score
from context_experiment import FIB_TEST_RUN, _fib
from finetune_experiment import DATA, DOCS

from pssr.degrade.crappify import CrappifierConfig, get_preset
from pssr.nn.modelfile import load_model, read_metadata, resolve_model
from pssr.quality.metrics import bicubic, bilinear, crop_to_scale, ssim

torch.set_num_threads(1)
SEED = 0
GPU_MACHINE = "NVIDIA H100"


def em_tests(l3_sections: int) -> dict[str, tuple[np.ndarray, str]]:
    isbi = tifffile.imread(DATA / "em" / "isbi2012_sstem_train.tif")
    l3 = tifffile.imread(DATA / "em" / "drosophila_l3_vnc_sstem.tif")[:l3_sections]
    return {
        "isbi": (isbi[25:30], "ISBI 2012 ssTEM sections 25-29"),
        "epfl": (_fib(FIB_TEST_RUN), "EPFL FIB-SEM slices 0161-0164"),
        "l3vnc": (l3, f"L3 VNC ssTEM sections 0-{l3_sections - 1} (never trained on)"),
    }


def fluo_tests() -> dict[str, tuple[np.ndarray, str]]:
    f = DATA / "fluo"
    return {
        "bpae-actin": (tifffile.imread(f / "BPAE_actin.tif").astype(np.float32), "BPAE_actin.tif"),
        "aics-c2": (tifffile.imread(f / "AICS_12_134_C2.tif").astype(np.float32), "AICS_12_134_C2.tif"),
    }


def nominal(lm) -> CrappifierConfig:
    """The model's own crappifier without its noise jitter."""
    c = lm.crappifier
    return CrappifierConfig(c.kind, c.scale, dict(c.params))


def full_score(hr: np.ndarray, pred: np.ndarray) -> dict:
    """score() plus per-plane SSIM and the mean brightness shift (fraction of the HR range)."""
    s = score(hr, pred)
    h3, p3 = hr.reshape((-1,) + hr.shape[-2:]), pred.reshape((-1,) + pred.shape[-2:])
    s["ssim_per_plane"] = [ssim(p, h) for p, h in zip(p3, h3, strict=True)]
    lo, hi = np.percentile(hr, [0.1, 99.9])
    s["mean_shift"] = float((pred.astype(np.float64).mean() - hr.astype(np.float64).mean()) / (hi - lo))
    return s


def run_test(hr_full, deg: CrappifierConfig, models: dict[str, tuple], scale: int = 4):
    """Degrade (seed 0), restore with every method; returns (rows, predictions)."""
    lr = deg(hr_full, rng=SEED)
    hr = crop_to_scale(hr_full, lr.shape, scale)
    if lr.ndim == 2:  # a single image: degraded as itself, restored as a stack of one plane
        lr, hr = lr[None], hr[None]
    rows = {}
    for k, v in baselines(hr, lr, scale).items():
        if k.startswith("bilinear + Gaussian"):
            continue  # only the best smoother is reported
        rows[k] = v
    rows["bilinear"] = full_score(hr, bilinear(lr, scale))
    rows["bicubic"] = full_score(hr, bicubic(lr, scale))
    preds = {"LR input (nearest)": lr, "bilinear": bilinear(lr, scale)}
    for label, (lm, mode) in models.items():
        t0 = time.monotonic()
        if mode == "mirror":  # ends get their inner neighbour (z-1 := z+1) instead of a copy of themselves
            k = lm.frames // 2
            p = restore_planes(lm, np.pad(lr, ((k, k), (0, 0), (0, 0)), mode="reflect"))[k:-k]
        else:
            p = restore_planes(lm, lr, context=mode == "context")
        rows[label] = {**full_score(hr, p), "restore_s": time.monotonic() - t0}
        preds[label] = p
    preds["HR (ground truth)"] = hr
    return rows, preds


def overall(per_set: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Mean over test sets of each method's PSNR / SSIM (best smoother: each set's own best)."""
    sets = list(per_set.values())
    methods = [k for k in sets[0] if not k.startswith("best smoother")]
    out = {}
    for m in ["best smoother", *methods]:
        vals = [
            next(v for k, v in s.items() if k.startswith(m)) if m == "best smoother" else s[m] for s in sets
        ]
        out[m] = {
            "psnr": float(np.mean([v["psnr"] for v in vals])),
            "ssim": float(np.mean([v["ssim"] for v in vals])),
        }
    # plane-weighted, for reference
    for m in methods:
        out[m]["psnr_plane_weighted"] = float(np.mean(sum((s[m]["psnr_per_plane"] for s in sets), [])))
    return out


def paired(rows: dict, a: str, b: str) -> dict:
    d = np.array(rows[a]["psnr_per_plane"]) - np.array(rows[b]["psnr_per_plane"])
    return {
        "a": a,
        "b": b,
        "positive": int((d > 0).sum()),
        "n": int(d.size),
        "min": float(d.min()),
        "max": float(d.max()),
        "per_plane": [round(float(x), 3) for x in d],
    }


def table(results: dict, train: dict) -> str:
    lines = [
        "| test | degradation | method | PSNR (dB) | SSIM | vs bilinear | vs best smoother | mean shift | training |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for test, degs in results.items():
        for deg, rows in degs.items():
            bil = rows["bilinear"]
            top_k = next(k for k in rows if k.startswith("best smoother"))
            top = rows[top_k]
            for k, v in [(top_k, top)] + [(k, v) for k, v in rows.items() if k != top_k]:
                tr = next((t for n, t in train.items() if k.startswith(n)), None)
                cost = "-" if tr is None else tr["short"]
                shift = f"{v['mean_shift']:+.3f}" if "mean_shift" in v else "-"
                lines.append(
                    f"| {test} | {deg} | {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | "
                    f"{v['psnr'] - bil['psnr']:+.2f} dB / {v['ssim'] - bil['ssim']:+.3f} | "
                    f"{v['psnr'] - top['psnr']:+.2f} dB / {v['ssim'] - top['ssim']:+.3f} | {shift} | {cost} |"
                )
    return "\n".join(lines)


def figure(path: Path, title: str, fig_rows: list[tuple[str, dict[str, np.ndarray], int]], size: int = 160):
    """One row per (label, predictions, plane); columns: HR, LR, bilinear, models.

    Raw intensities on the HR crop's grey scale (no per-method fit, so brightness shifts show).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = fig_rows[0][1]
    fixed = ("HR (ground truth)", "LR input (nearest)", "bilinear")
    order = [*fixed, *(k for k in first if k not in fixed)]
    fig, axs = plt.subplots(
        len(fig_rows), len(order), figsize=(1.75 * len(order), 1.95 * len(fig_rows)), squeeze=False
    )
    for r, (label, preds, plane) in enumerate(fig_rows):
        hr = preds["HR (ground truth)"][plane]
        y0, x0 = (hr.shape[0] - size) // 2 // 4 * 4, (hr.shape[1] - size) // 2 // 4 * 4
        lo, hi = np.percentile(hr[y0 : y0 + size, x0 : x0 + size], [0.5, 99.5])
        for c, name in enumerate(order):
            a = preds[name][plane]
            if name.startswith("LR"):
                a = np.kron(a, np.ones((4, 4), a.dtype))
            ax = axs[r, c]
            ax.imshow(
                a[y0 : y0 + size, x0 : x0 + size], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest"
            )
            ax.set_title(name if r == 0 else "", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=5.5)
    fig.suptitle(f"held out: {title}, {size}x{size} HR px centre crops (raw grey values)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    from PIL import Image

    Image.open(path).convert("L").save(path, optimize=True)  # greyscale PNG: a third of the size


def train_info(name: str, path: Path) -> dict:
    t = read_metadata(path)["training"]
    cfg = t.get("config", {})
    workers = cfg.get("loader_workers")
    return {
        "file": str(path),
        "command": t.get("command"),
        "steps": t.get("steps"),
        "minutes": t.get("minutes"),
        "batch": cfg.get("batch"),
        "loader_workers": workers,
        "patch": t.get("patch"),
        "init": (t.get("previous_training") or {}).get("command"),
        "short": f"{GPU_MACHINE}, {t.get('minutes')} min, {t.get('steps')} steps x batch {cfg.get('batch')}, "
        f"{workers} loader workers",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-dir", type=Path, default=Path("/work/gpu_models"))
    ap.add_argument(
        "--l3-sections", type=int, default=20, help="L3 VNC sections 0..N-1 to score (default all 20)"
    )
    ap.add_argument(
        "--only", choices=["em", "fluo"], help="score one family only (the JSON keeps the other's results)"
    )
    ap.add_argument("--docs", action="store_true", help="write the crop figures into docs/models/")
    ap.add_argument("--out", type=Path, default=DOCS / "gpu-models.json")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    report = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    train = {
        "GPU em-3d": train_info("em-3d", args.gpu_dir / "em-3d.safetensors"),
        "GPU em": train_info("em", args.gpu_dir / "em.safetensors"),
        "GPU fluo": train_info("fluo", args.gpu_dir / "fluo.safetensors"),
    }
    builtin = {n: train_info(n, resolve_model(n)) for n in ("em", "fluo")}
    for b in builtin.values():
        b["short"] = f"{b['minutes']} min, {b['steps']} steps x batch {b['batch']} (CPU)"
    results = report.get("results", {})
    timing = report.get("timing_s", {})
    figs = {"isbi": 2, "epfl": 1, "l3vnc": None, "bpae-actin": 0, "aics-c2": 0}

    families = [args.only] if args.only else ["em", "fluo"]
    for fam in families:
        t_fam = time.monotonic()
        if fam == "em":
            em_b = load_model("em")
            em3 = load_model(args.gpu_dir / "em-3d.safetensors")
            models = {
                "built-in em": (em_b, "context"),
                "GPU em": (load_model(args.gpu_dir / "em.safetensors"), "context"),
                "GPU em-3d (Z context)": (em3, "context"),
                "GPU em-3d, neighbours replaced by the centre": (em3, "centre"),
                "GPU em-3d (Z context, block ends mirrored)": (em3, "mirror"),
            }
            degs = {"pssr-em nominal": nominal(em_b), "em point-scan": get_preset("em", 4)}
            tests = em_tests(args.l3_sections)
        else:
            fl_b = load_model("fluo")
            models = {
                "built-in fluo": (fl_b, "context"),
                "GPU fluo": (load_model(args.gpu_dir / "fluo.safetensors"), "context"),
            }
            degs = {"fluo nominal": nominal(fl_b), "pssr-fluo": get_preset("pssr-fluo", 4)}
            tests = fluo_tests()
        for test, (hr, name) in tests.items():
            t0 = time.monotonic()
            results[test] = {"name": name, "degradations": {}}
            fig_rows = []
            plane = figs[test] if figs[test] is not None else hr.shape[0] // 2
            for dname, deg in degs.items():
                rows, preds = run_test(hr, deg, models)
                results[test]["degradations"][dname] = {"crappifier": deg.to_dict(), "rows": rows}
                keep = {k: preds[k] for k in preds if "neighbours replaced" not in k and "mirrored" not in k}
                fig_rows.append((f"{dname}, plane {plane}", keep, plane))
                if fam == "em" and dname == "pssr-em nominal":  # the first section: a block end
                    fig_rows.append((f"{dname}, plane 0 (block end)", keep, 0))
                print(
                    f"{test} / {dname}: " + ", ".join(f"{k[:30]} {v['psnr']:.2f}" for k, v in rows.items()),
                    flush=True,
                )
            if args.docs:
                figure(DOCS / f"gpu-models-{test}.png", name, fig_rows)
            timing[test] = time.monotonic() - t0
        timing[fam] = time.monotonic() - t_fam

    # Summaries: overall per family and degradation, paired per-plane comparisons.
    summary, pairs = {}, {}
    fam_tests = {"em": ["isbi", "epfl", "l3vnc"], "fluo": ["bpae-actin", "aics-c2"]}
    for fam, tl in fam_tests.items():
        if not all(t in results for t in tl):
            continue
        degs_ = list(results[tl[0]]["degradations"])
        for d in degs_:
            summary[f"{fam} / {d}"] = overall({t: results[t]["degradations"][d]["rows"] for t in tl})
            for t in tl:
                rows = results[t]["degradations"][d]["rows"]
                comps = (
                    [
                        ("GPU em", "built-in em"),
                        ("GPU em-3d (Z context)", "built-in em"),
                        ("GPU em-3d (Z context)", "GPU em"),
                        ("GPU em-3d (Z context)", "GPU em-3d, neighbours replaced by the centre"),
                        ("GPU em-3d (Z context, block ends mirrored)", "GPU em"),
                    ]
                    if fam == "em"
                    else [("GPU fluo", "built-in fluo")]
                )
                pairs[f"{t} / {d}"] = [paired(rows, a, b) for a, b in comps]

    total = time.monotonic() - t_start
    report = {
        "command": "PYTHONPATH=. python scripts/evaluate_gpu_models.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": SEED,
        "l3_sections": args.l3_sections,
        "eval_machine": f"{platform.machine()} CPU, 1 torch thread (2 cores shared)",
        "models": {**train, **{f"built-in {k}": v for k, v in builtin.items()}},
        "results": results,
        "overall": summary,
        "paired_per_plane_psnr": pairs,
        "timing_s": {**timing, "last_run_total": total},
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    tbl_results = {t: {d: v["rows"] for d, v in r["degradations"].items()} for t, r in results.items()}
    print(table(tbl_results, {**train, **{f"built-in {k}": v for k, v in builtin.items()}}))
    print()
    print("| overall (mean of test sets) | method | PSNR (dB) | SSIM | vs bilinear | vs best smoother |")
    print("|---|---|---|---|---|---|")
    for key, rows in summary.items():
        bil, top = rows["bilinear"], rows["best smoother"]
        for k, v in rows.items():
            print(
                f"| {key} | {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['psnr'] - bil['psnr']:+.2f} dB / "
                f"{v['ssim'] - bil['ssim']:+.3f} | {v['psnr'] - top['psnr']:+.2f} dB / {v['ssim'] - top['ssim']:+.3f} |"
            )
    print()
    for key, ps in pairs.items():
        for p in ps:
            print(
                f"{key}: {p['a']} - {p['b']}: {p['positive']}/{p['n']} planes positive, "
                f"min {p['min']:+.3f}, max {p['max']:+.3f} dB; per plane {p['per_plane']}"
            )
    print(f"evaluation wall time {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
