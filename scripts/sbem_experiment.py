"""Issue 27 item 2: does adding SBEM block 1 to the `em` recipe help on volumes no model saw?

    PYTHONPATH=. python scripts/sbem_experiment.py \
        --model "em (before SBEM)=/path/em-before.safetensors" \
        --model "em + SBEM block 1=/path/em-sbem.safetensors" [--model LABEL=PATH ...] [--docs]

Every ``--model`` is scored (and the shipped ``em-3d``, with its Z neighbours) on four held-out EM
sets, each a block of consecutive sections, none sampled by any of the models' training:

* ``isbi``  ISBI 2012 ssTEM sections 25-29 (4 nm pixels, 50 nm sections; the em recipe's held-out part);
* ``epfl``  EPFL FIB-SEM slices training0161-0164 (5 nm isotropic; held out likewise);
* ``sbem2`` CDeep3M SBEM block 2, 10 sections (Haberl et al. 2018; block 1, another part of the
  same sample that does not join it, is what the new recipe adds);
* ``l3vnc`` *Drosophila* L3 VNC ssTEM, 20 sections (Gerhard et al. 2013, CC BY-NC-SA 3.0).

Degradations: ``pssr-em`` nominal (the em models' own crappifier without its noise jitter) and the
physical point-scan ``em`` preset at its defaults; seed 0, restored whole-plane
(``_experiment_common.restore_planes``), scored with the paper-style PSNR / SSIM per plane
(averaged), against bilinear, bicubic and the best Gaussian smoother (chosen on the test itself),
exactly as scripts/evaluate_gpu_models.py does. Writes ``docs/models/sbem.json`` and with
``--docs`` the crops ``docs/models/sbem-<test>.png``; prints the markdown table.
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
from context_experiment import FIB_TEST_RUN, _fib
from evaluate_gpu_models import figure, nominal, paired, run_test
from finetune_experiment import DATA, DOCS

from pssr.degrade.crappify import get_preset
from pssr.nn.modelfile import load_model, read_metadata, resolve_model

TESTS = {
    "isbi": "ISBI 2012 ssTEM sections 25-29",
    "epfl": "EPFL FIB-SEM slices 0161-0164",
    "sbem2": "CDeep3M SBEM block 2, sections 0-9 (never trained on)",
    "l3vnc": "L3 VNC ssTEM sections 0-19 (never trained on)",
}


def load_test(name: str) -> np.ndarray:
    em = DATA / "em"
    if name == "isbi":
        return tifffile.imread(em / "isbi2012_sstem_train.tif")[25:30]
    if name == "epfl":
        return _fib(FIB_TEST_RUN)
    if name == "sbem2":
        return tifffile.imread(em / "cdeep3m_sbem_block2.tif")
    return tifffile.imread(em / "drosophila_l3_vnc_sstem.tif")


def train_info(path: Path) -> dict:
    t = read_metadata(path)["training"]
    return {
        "file": str(path),
        "command": t.get("command"),
        "steps": t.get("steps"),
        "minutes": t.get("minutes"),
        "machine": t.get("machine"),
        "data": [d["path"] for d in t.get("data", [])],
        "previous": (t.get("previous_training") or {}).get("command"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="LABEL=PATH (the first is the reference)")
    ap.add_argument("--tests", nargs="*", default=list(TESTS), choices=list(TESTS))
    ap.add_argument("--docs", action="store_true", help="write the crop figures into docs/models/")
    ap.add_argument("--out", type=Path, default=DOCS / "sbem.json")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    specs = dict(m.split("=", 1) for m in args.model)
    models = {label: (load_model(Path(p)), "context") for label, p in specs.items()}
    em3 = load_model("em-3d")
    models["em-3d (Z context)"] = (em3, "context")
    ref = next(iter(specs))
    degs = {"pssr-em nominal": nominal(models[ref][0]), "em point-scan": get_preset("em", 4)}
    results, pairs = {}, {}
    for test in args.tests:
        hr = load_test(test)
        results[test] = {"name": TESTS[test], "shape": list(hr.shape), "degradations": {}}
        fig_rows = []
        for dname, deg in degs.items():
            t0 = time.monotonic()
            rows, preds = run_test(hr, deg, models)
            results[test]["degradations"][dname] = {
                "crappifier": deg.to_dict(),
                "rows": rows,
                "seconds": time.monotonic() - t0,
            }
            for label in specs:
                if label != ref:
                    pairs[f"{test} / {dname} / {label} - {ref}"] = paired(rows, label, ref)
            fig_rows.append((f"{dname}, plane {hr.shape[0] // 2}", preds, hr.shape[0] // 2))
            print(
                f"{test} / {dname}: " + ", ".join(f"{k[:32]} {v['psnr']:.2f}" for k, v in rows.items()),
                flush=True,
            )
        if args.docs:
            figure(DOCS / f"sbem-{test}.png", TESTS[test], fig_rows)
    lines = [
        "| test | degradation | method | PSNR (dB) | SSIM | vs bilinear | vs " + ref + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for test, r in results.items():
        for dname, d in r["degradations"].items():
            rows = d["rows"]
            for k, v in rows.items():
                if k.startswith("bilinear + Gaussian"):
                    continue
                lines.append(
                    f"| {test} | {dname} | {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | "
                    f"{v['psnr'] - rows['bilinear']['psnr']:+.2f} dB | {v['psnr'] - rows[ref]['psnr']:+.2f} dB |"
                )
    table = "\n".join(lines)
    print(table)
    for k, p in pairs.items():
        print(
            f"{k}: better on {p['positive']}/{p['n']} planes, per-plane {p['min']:+.2f}..{p['max']:+.2f} dB"
        )
    report = {
        "command": "PYTHONPATH=. python scripts/sbem_experiment.py "
        + " ".join(f'--model "{m}"' for m in args.model),
        "machine": f"{platform.machine()} CPU (2 cores shared with other jobs)",
        "reference": ref,
        "models": {label: train_info(Path(p)) for label, p in specs.items()}
        | {"em-3d (Z context)": train_info(resolve_model("em-3d"))},
        "results": results,
        "paired_per_plane": pairs,
        "table": table,
        "seconds": time.monotonic() - t_start,
    }
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
