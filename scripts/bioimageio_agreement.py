"""How closely bioimage.io consumers reproduce ``pssr predict``, whole-image and tiled.

Each built-in model is exported with ``pssr export`` and run by bioimageio.core, whole-image and
tiled, against ``pssr.restore``.

For each model: a real held-out image (degraded with the model's own crappifier, or a real
timelapse for ``fluo-mf``) is restored by pssr (CPU, float32, its default tiling) and by
bioimageio.core from the exported package, once without blocking (``bioimageio predict``'s
default) and once tiled (``blocksize_parameter``).  The table gives the largest absolute
difference divided by the range of pssr's output, over the whole image and over an edge band
of ``halo`` input pixels.  bioimageio's output (in the input's normalised units) is mapped back
to the input's units with the input's own percentiles, as ``pssr predict`` does.

    PYTHONPATH=$PWD python scripts/bioimageio_agreement.py [--out docs/bioimageio_agreement.json]

Needs bioimageio.core (the dev extra).  A few minutes per model on 2 CPU cores (the tiled runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    for d in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data", Path("/work/shared/data")):
        if d.is_dir():
            return d
    raise SystemExit("the shared data folder (shared/data) is not here")


def _inputs() -> dict[str, np.ndarray]:
    """Held-out LR images per built-in model, of sizes the packages accept (``min + n * step``)."""
    from pssr.degrade.crappify import crappify

    d = _data_dir()
    em_hr = np.asarray(tifffile.imread(d / "em" / "epfl_fibsem_train" / "training0164.tif"), np.float32)
    fl_hr = np.asarray(tifffile.imread(d / "fluo" / "BPAE_actin.tif"), np.float32)
    if fl_hr.ndim == 3:
        fl_hr = fl_hr[0]
    s = 4
    em = crappify(em_hr[: 188 * s, : 252 * s], "pssr-em", scale=s, rng=0)  # 188 x 252
    fl = crappify(fl_hr[: 168 * s, : 272 * s], "fluo", scale=s, rng=0)  # 168 x 272
    mf = np.asarray(tifffile.imread(d / "fluo" / "golgi_bfa_timelapse.tif"), np.float32)
    mf = mf[24:29, :132, :136]  # a real timelapse, 5 x 132 x 136
    return {"em": np.asarray(em, np.float32), "fluo": np.asarray(fl, np.float32), "fluo-mf": mf}


def _bioimageio(pkg: Path, x: np.ndarray, frames: int, n: int | None, normalised: bool = False) -> np.ndarray:
    """bioimageio.core's output for ``x`` ((y, x) or (frames, y, x)): whole image, or tiled with ``n``.

    ``normalised``: ``x`` is already normalised (the package's preprocessing is skipped).
    """
    from bioimageio.core import predict
    from bioimageio.core.digest_spec import create_sample_for_model
    from bioimageio.spec import load_description

    descr = load_description(pkg)
    inp = x[None] if x.ndim == 2 else x
    c = inp.shape[0] // 2
    inp = inp[c - frames // 2 : c + frames // 2 + 1][None]  # (batch, channel, y, x)
    sample = create_sample_for_model(descr, inputs={"raw": inp})
    out = predict(model=descr, inputs=sample, blocksize_parameter=n, skip_preprocessing=normalised)
    return np.asarray(out.members["restored"].data)[0, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=7, help="blocksize parameter of the tiled run (default 7)")
    ap.add_argument("--models", default="em,fluo,fluo-mf")
    ap.add_argument(
        "--modes",
        default="whole,whole-pssr-norm,tiled",
        help="whole (bioimageio's default), whole-pssr-norm (whole, the input normalised as pssr does: "
        "the network, halo and border alone), tiled",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = ap.parse_args()
    import pssr
    from pssr.nn.export import EPS, export_bioimageio
    from pssr.nn.modelfile import load_model
    from pssr.nn.normalization import percentile_norm

    rows = []
    ins = _inputs()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            lm = load_model(name)
            x = ins[name]
            t0 = time.perf_counter()
            ref = np.asarray(
                pssr.restore(
                    x, model=name, dtype="float32", device="cpu", backend="torch", progress=False
                ).output,
                np.float32,
            )
            if lm.frames > 1:
                ref = ref[x.shape[0] // 2]
            pkg = export_bioimageio(name, Path(tmp) / f"{name}.zip")
            from pssr.nn.package import open_package

            with open_package(pkg) as p:
                input_units = bool(p.config.get("output_in_input_units", False))
            centre = (
                x[x.shape[0] // 2 - lm.frames // 2 : x.shape[0] // 2 + lm.frames // 2 + 1]
                if x.ndim == 3
                else x
            )
            lo, hi = percentile_norm(centre, lm.normalization)
            rng = float(ref.max() - ref.min())
            band = lm.halo * lm.scale
            modes = {"whole": None, "whole-pssr-norm": None, "tiled": args.n}
            for mode in args.modes.split(","):
                if mode == "whole-pssr-norm":
                    got = _bioimageio(pkg, (x - lo) / (hi - lo + EPS), lm.frames, None, normalised=True)
                else:
                    got = _bioimageio(pkg, x, lm.frames, modes[mode])
                if not input_units:
                    got = got * (hi - lo) + lo
                d = np.abs(got.astype(np.float64) - ref) / rng
                inner = d[band:-band, band:-band]
                rows.append(
                    {
                        "model": name,
                        "mode": mode,
                        "shape": list(x.shape),
                        "max_diff": float(d.max()),
                        "interior_max_diff": float(inner.max()) if inner.size else None,
                        "edge_band_px": lm.halo,
                        "worst_at": [int(v) for v in np.unravel_index(int(d.argmax()), d.shape)],
                    }
                )
                r = rows[-1]
                print(
                    f"{name:8s} {mode:6s} max |diff|/range {r['max_diff']:.2e}  interior "
                    f"{r['interior_max_diff']:.2e}  worst at {r['worst_at']} of {list(d.shape)} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"n": args.n, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
