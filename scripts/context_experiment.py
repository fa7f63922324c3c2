"""Section (Z) context: a 3-section model vs a single-section one (issue 11, item 3).

    python scripts/context_experiment.py probe            # which volumes are consecutive
    python scripts/context_experiment.py fibsem --steps 150 --patch 32 --docs
    python scripts/context_experiment.py golgi --steps 150 --docs

``probe`` measures the correlation of neighbouring slices (a consecutive stack has high
adjacent and low distant correlation).  The EPFL FIB-SEM slices are documented as not
consecutive, but their file numbers and correlations show runs of 3-4 consecutive 5 nm
slices (0000-0003, 0045-0048, 0061-0063, 0089-0091, 0161-0164).  ``fibsem`` trains on the
first four runs (each its own source, so context never spans two runs) and tests on run
0161-0164, which the built-in ``em`` never saw (Lucchi et al. 2012, IEEE TMI 31:474).
``golgi`` uses the near-isotropic Golgi ZYX stack (0.35 um xy, 0.39 um z; NEUBIAS
training-resources, CC-BY 4.0): sections 0-16 train, 18-24 are held out (17 is a gap).

Both variants fine-tune the same parent (``em`` / ``fluo``) with its own degradation and
noise jitter, the same steps, batch, patch, learning rate and seed: ``1 section`` keeps the
parent's input; ``3 sections`` widens it to z-1, z, z+1 with the neighbours' first-layer
weights at zero (pssr.nn.model.widen_inputs: at step 0 it computes what the parent does);
``3 sections, spread init`` gives each of the three sections a third of the parent's
first-layer weights instead (at step 0 the first layer sees the mean of the three
sections: a z-average with a third of the noise variance on a static structure).
Held-out sections are degraded independently (seed 0) and restored with their held-out
neighbours (edge-replicated at the ends of the held-out block), whole planes.
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

FIB = DATA / "em" / "epfl_fibsem_train"
FIB_TRAIN_RUNS = [(0, 1, 2, 3), (45, 46, 47, 48), (61, 62, 63), (89, 90, 91)]
FIB_TEST_RUN = (161, 162, 163, 164)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def probe() -> dict:
    """Adjacent vs distant slice correlation of every shared volume."""
    out: dict[str, dict] = {}
    files = sorted(FIB.glob("*.tif"))
    ims = [tifffile.imread(f)[::2, ::2] for f in files]
    out["epfl_fibsem_train (files in name order)"] = {
        "pairs": [
            {"a": a.name, "b": b.name, "corr": round(_corr(x, y), 3)}
            for a, b, x, y in zip(files[:-1], files[1:], ims[:-1], ims[1:], strict=True)
        ]
    }
    for name in ("em/isbi2012_sstem_train.tif", "em/drosophila_l3_vnc_sstem.tif", "fluo/golgi_bfa_stack.tif"):
        v = tifffile.imread(DATA / name)[:, ::2, ::2]
        adj = [_corr(v[i], v[i + 1]) for i in range(len(v) - 1)]
        far = [_corr(v[i], v[(i + len(v) // 2) % len(v)]) for i in range(len(v))]
        out[name] = {
            "adjacent_mean": round(float(np.mean(adj)), 3),
            "adjacent_min": round(min(adj), 3),
            "distant_mean": round(float(np.mean(far)), 3),
        }
    return out


def _fib(idx: tuple[int, ...]) -> np.ndarray:
    return np.stack([tifffile.imread(FIB / f"training{i:04d}.tif") for i in idx])


SETUPS = {
    "fibsem": {
        "parent": "em",
        "train": lambda: [
            Source(_fib(r), f"epfl_fibsem_train {r[0]:04d}-{r[-1]:04d}") for r in FIB_TRAIN_RUNS
        ],
        "test": lambda: _fib(FIB_TEST_RUN),
        "test_name": "EPFL FIB-SEM slices 0161-0164 (4 consecutive 5 nm slices)",
        "patch": 48,
    },
    "golgi": {
        "parent": "fluo",
        "train": lambda: [
            Source(tifffile.imread(DATA / "fluo" / "golgi_bfa_stack.tif")[:17], "golgi_bfa_stack z0-16")
        ],
        "test": lambda: tifffile.imread(DATA / "fluo" / "golgi_bfa_stack.tif")[18:],
        "test_name": "golgi_bfa_stack.tif sections 18-24",
        "patch": 32,
    },
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=["probe", *SETUPS])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--patch", type=int, help="LR patch size (default: 48 fibsem, 32 golgi)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pssr-context"))
    ap.add_argument("--docs", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result file names (e.g. -s1)")
    args = ap.parse_args(argv)
    if args.name == "probe":
        rep = probe()
        print(json.dumps(rep, indent=1))
        if args.docs:
            (DOCS / "context-probe.json").write_text(json.dumps(rep, indent=2) + "\n")
        return 0

    setup = SETUPS[args.name]
    parent = load_model(setup["parent"])
    work = args.work / args.name
    work.mkdir(parents=True, exist_ok=True)
    sources = setup["train"]()
    crap = parent.crappifier
    cfg3 = type(parent.config).from_dict({**parent.config.to_dict(), "in_channels": 3})
    widened = widened_parent(setup["parent"], cfg3, work / "parent-3sections.safetensors")
    runs: dict[str, dict] = {}
    spread = widened_parent(setup["parent"], cfg3, work / "parent-3sections-spread.safetensors", spread=True)
    for label, cfg, init in (
        ("1 section", parent.config, setup["parent"]),
        ("3 sections", cfg3, widened),
        ("3 sections, spread init", cfg3, spread),
    ):
        out = work / f"{label.replace(' ', '_')}-s{args.seed}.safetensors"
        t = train_one(
            out,
            sources,
            crap,
            cfg,
            init=init,
            steps=args.steps,
            seed=args.seed,
            norm=parent.normalization,
            patch=args.patch or setup["patch"],
        )
        runs[label] = {**t, "path": str(out)}
        print(f"{label}: {t['steps']} steps, {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU", flush=True)

    test_hr = setup["test"]()
    # Nominal noise, no jitter.  Float input: noise relative to its 99.9th percentile, as the
    # training patches (read as float32) are; a uint16 stack far below 65535 would otherwise
    # be degraded far more strongly than anything in training.
    test_hr = test_hr if test_hr.dtype == np.uint8 else test_hr.astype(np.float32)
    lr = CrappifierConfig(crap.kind, crap.scale, dict(crap.params))(test_hr, rng=0)
    hr = crop_to_scale(test_hr, lr.shape, 4)
    rows = baselines(hr, lr)
    rows[f"built-in {setup['parent']}"] = score(hr, restore_planes(parent, lr))
    for label, run in runs.items():
        lm = load_model(run["path"])
        rows[label] = {**score(hr, restore_planes(lm, lr)), "run": label}
        if lm.frames > 1:  # the same model with its neighbours replaced by the centre section
            rows[f"{label}, neighbours replaced by the centre"] = score(
                hr, restore_planes(lm, lr, context=False)
            )
    test = f"{crap.kind} x1 noise"
    results = {test: rows}
    report = {
        "setup": args.name,
        "test": setup["test_name"],
        "parent": setup["parent"],
        "crappifier": crap.to_dict(),
        "steps": args.steps,
        "seed": args.seed,
        "patch": args.patch or setup["patch"],
        "machine": MACHINE,
        "train_sources": [s.name for s in sources],
        "runs": runs,
        "results": results,
    }
    (work / f"context-{args.name}{args.tag}.json").write_text(json.dumps(report, indent=2))
    print(table(results, runs, first_col="held-out test"))
    per_plane = {k: [round(p, 3) for p in v["psnr_per_plane"]] for k, v in rows.items()}
    print(json.dumps(per_plane))
    if args.docs:
        (DOCS / f"context-{args.name}{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
