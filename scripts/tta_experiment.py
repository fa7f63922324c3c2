"""Test-time augmentation (``--tta``, 8 flips/rotations averaged) on the built-ins' held-out data (issue 11).

    python scripts/tta_experiment.py [em em-3d fluo fluo-mf] [--docs]

The held-out images of each model's card (scripts/evaluate_builtin.py: same sources, the model's
nominal degradation, seed ``i`` for the i-th source) restored with and without ``tta=True``
(pssr.restore, whole planes), scored against bilinear, bilinear + Gaussian sigma 2 and the best
Gaussian smoother (sigma chosen on the test, which flatters it) in PSNR and SSIM, averaged over
the sources with the card's weights.  TTA costs 8x the network time.  Writes
``/tmp/pssr-tta/tta.json`` and, with ``--docs``, ``docs/models/tta.json``.
"""

# ruff: noqa: E402 (the scripts folder and the checkout go on sys.path first)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _experiment_common import MACHINE, baselines, score
from train_builtin import RECIPES

from pssr.blockwise.predict import restore
from pssr.nn.modelfile import load_model
from pssr.quality.metrics import crop_to_scale

ROOT = Path(__file__).resolve().parents[1]


def evaluate(name: str, models_dir: Path, seed: int = 0) -> dict:
    model = load_model(models_dir / f"{name}.safetensors")
    cfg = model.crappifier
    nominal = type(cfg)(cfg.kind, cfg.scale, cfg.params, {})
    s = model.scale
    rows: dict[str, list[dict[str, float]]] = {}
    weights, seconds = [], {"no TTA": 0.0, "TTA": 0.0}
    for i, src in enumerate(RECIPES[name]["sources"]("test")):
        hr = np.asarray(src.data[...], np.float32)
        axes = "TYX" if name == "fluo-mf" else ("ZYX" if hr.ndim == 3 else "YX")
        lr = nominal(hr, rng=seed + i)
        hr_c = crop_to_scale(hr, lr.shape, s)
        planes_hr = hr_c.reshape((-1,) + hr_c.shape[-2:])
        planes_lr = lr.reshape((-1,) + lr.shape[-2:])
        for label, tta in (("no TTA", False), ("TTA", True)):
            t = time.perf_counter()
            out = restore(
                lr, model=model, axes=axes, dtype="float32", tta=tta, backend="torch", progress=False
            )
            seconds[label] += time.perf_counter() - t
            pred = np.asarray(out.output).reshape(planes_hr.shape)
            rows.setdefault(f"{name}, {label}", []).append(score(planes_hr, pred))
        for k, v in baselines(planes_hr, planes_lr, s).items():
            rows.setdefault(k.split(" (")[0] if k.startswith("best") else k, []).append(v)
        weights.append(len(planes_hr))
        print(f"{name} {src.name}: done", flush=True)
    summary = {
        k: {m: float(np.average([r[m] for r in v], weights=weights)) for m in ("psnr", "ssim")}
        for k, v in rows.items()
    }
    return {
        "model": name,
        "test_sources": [src.name for src in RECIPES[name]["sources"]("test")],
        "degradation": nominal.to_dict(),
        "seed": seed,
        "summary": summary,
        "per_source": rows,
        "seconds": seconds,
    }


def table(results: dict[str, dict]) -> str:
    lines = [
        "| model (held-out set of its card) | method | PSNR (dB) | SSIM | vs bilinear | vs best smoother |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = r["summary"]
        bl, sm = s["bilinear"], s["best smoother"]
        for k in (
            "bilinear",
            "bilinear + Gaussian sigma 2",
            "best smoother",
            f"{name}, no TTA",
            f"{name}, TTA",
        ):
            v = s[k]
            lines.append(
                f"| {name} | {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['psnr'] - bl['psnr']:+.2f} dB / "
                f"{v['ssim'] - bl['ssim']:+.3f} | {v['psnr'] - sm['psnr']:+.2f} dB / {v['ssim'] - sm['ssim']:+.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=["em", "em-3d", "fluo", "fluo-mf"])
    ap.add_argument("--models-dir", type=Path, default=ROOT / "pssr" / "models")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pssr-tta"))
    ap.add_argument("--docs", action="store_true")
    args = ap.parse_args(argv)
    results = {n: evaluate(n, args.models_dir) for n in args.names}
    text = table(results)
    print(text)
    payload = {"machine": MACHINE, "command": "python scripts/tta_experiment.py " + " ".join(args.names),
               "results": results, "table": text}  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "tta.json").write_text(json.dumps(payload, indent=1))
    if args.docs:
        (ROOT / "docs" / "models" / "tta.json").write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
