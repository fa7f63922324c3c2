"""`fluo-mf` on movies no model has seen (issue 27, item 1).

    python scripts/multiframe_unseen.py measure --docs     # multiframe-unseen.json (and its table)
    python scripts/multiframe_unseen.py threshold --docs   # multiframe-threshold.json (--frames auto)
    python scripts/multiframe_unseen.py train --hold zebrafish_ysl_nuclei_timelapse.tif --steps 2000
    python scripts/multiframe_unseen.py score --model FILE --hold zebrafish_ysl_nuclei_timelapse.tif --docs
    python scripts/multiframe_unseen.py table              # the table of multiframe-unseen.json

Unseen movies (../shared/data/SOURCES.md; no built-in model trained on them): the zebrafish
yolk-syncytial-layer nuclei (30 frames) and the *Drosophila* syncytial embryo, GFP-histone
(43 frames).  Every frame is degraded as scripts/evaluate_builtin.py does (the model's own
crappifier at its nominal noise, the movie as float32, seed = index of the movie) and scored with
the paper-style metrics, frame by frame.

Variants, all with the shipped models and the same whole-frame inference:

* ``bilinear``, ``fluo`` (single frame), ``fluo-mf`` (t-2..t+2, edge frames replicated);
* probes: ``fluo-mf, no motion`` (the neighbours replaced by copies of the centre frame) and
  ``fluo-mf, shuffled`` (the neighbours taken from a fixed random permutation of the movie: far
  more motion, same domain);
* registration before the network: ``+ phase`` (each neighbour shifted by its global
  phase-correlation shift to the centre frame, scikit-image), ``+ flow tvl1`` / ``+ flow ilk``
  (each neighbour warped to the centre frame by scikit-image's optical flow);
* per-pixel agreement: ``+ agreement`` (each neighbour pixel replaced by the centre's where they
  disagree, pssr.blockwise.frames.agreement_weights) and the same after flow registration;
* the safeguard (``--frames auto``, pssr.blockwise.frames): ``fluo-mf`` where the frames agree
  and ``fluo`` where they do not, per frame.
"""

# ruff: noqa: E402 (the scripts folder and the checkout go on sys.path first)
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from pssr.blockwise.predict import restore
from pssr.nn.modelfile import LoadedModel, load_model
from pssr.nn.normalization import percentile_norm
from pssr.quality.metrics import bilinear, crop_to_scale, psnr, ssim
from pssr.util import strided_sample

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fluo"
DOCS = ROOT / "docs" / "models"
UNSEEN = ("zebrafish_ysl_nuclei_timelapse.tif", "drosophila_embryo_h2b_timelapse.tif")
TRAIN_MOVIES = ("mitocheck_nuclei_timelapse.tif", "golgi_bfa_timelapse.tif")
torch.set_num_threads(1)


def movie(name: str) -> np.ndarray:
    return tifffile.imread(DATA / name).astype(np.float32)


def normalised(lm: LoadedModel, lr: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = percentile_norm(strided_sample(lr), lm.normalization)
    return (lr - lo) / (hi - lo), float(lo), float(hi)


@torch.no_grad()
def run_net(lm: LoadedModel, stacks: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``stacks`` (N, F, h, w) normalised -> (N, H, W) in the input's units."""
    out = [lm.net(torch.from_numpy(np.ascontiguousarray(s, np.float32))[None])[0, 0].numpy() for s in stacks]
    return np.stack(out) * (hi - lo) + lo


def windows(x: np.ndarray, k: int, order: np.ndarray | None = None) -> np.ndarray:
    """(N, 2k+1, h, w): frames t-k..t+k, edge-replicated; ``order`` re-sequences the movie first."""
    n = len(x)
    seq = np.arange(n) if order is None else order
    pos = np.argsort(seq)  # where frame t sits in the sequence
    idx = [[seq[min(max(pos[t] + d, 0), n - 1)] for d in range(-k, k + 1)] for t in range(n)]
    return x[np.array(idx)]


def per_window(fn: Callable[[np.ndarray], np.ndarray], stacks: np.ndarray) -> np.ndarray:
    return np.stack([fn(s) for s in stacks])


def score(hr: np.ndarray, pred: np.ndarray) -> dict:
    per = [psnr(p, h) for p, h in zip(pred, hr, strict=True)]
    return {"psnr": float(np.mean(per)), "ssim": ssim(pred, hr), "psnr_per_frame": per}


def one_movie(name: str, i: int, mf: LoadedModel, sf: LoadedModel, nominal, seed: int) -> dict:
    """Every variant on one movie (its index ``i`` seeds the degradation)."""
    from pssr.blockwise import frames as fr

    k = mf.frames // 2
    hr_full = movie(name)
    if name in TRAIN_MOVIES:  # the frames every built-in held out
        hr_full = hr_full[24:]
    lr = nominal(hr_full, rng=seed + i)
    hr = crop_to_scale(hr_full, lr.shape, mf.scale)
    x, lo, hi = normalised(mf, lr)
    xs, slo, shi = normalised(sf, lr)
    win = windows(x, k)
    rng = np.random.default_rng(seed)
    t0 = time.monotonic()
    preds: dict[str, np.ndarray] = {"bilinear": bilinear(lr, mf.scale)}
    times: dict[str, float] = {}

    def timed(label: str, f: Callable[[], np.ndarray]) -> None:
        t = time.monotonic()
        preds[label] = f()
        times[label] = time.monotonic() - t

    timed("fluo", lambda: run_net(sf, xs[:, None], slo, shi))
    timed("fluo-mf", lambda: run_net(mf, win, lo, hi))
    timed(
        "fluo-mf, no motion (centre copies)",
        lambda: run_net(mf, np.repeat(x[:, None], mf.frames, 1), lo, hi),
    )
    order = rng.permutation(len(x))
    timed("fluo-mf, shuffled neighbours", lambda: run_net(mf, windows(x, k, order), lo, hi))
    # No motion, same domain and independent noise: the neighbours are the centre frame's HR
    # image degraded again (independent noise), as a still scene would be acquired.
    still = np.stack(
        [nominal(np.repeat(h[None], mf.frames, 0), rng=seed + 100 + t) for t, h in enumerate(hr_full)]
    )
    still[:, k] = lr
    timed(
        "fluo-mf, no motion (centre frame re-acquired)",
        lambda: run_net(mf, (still - lo) / (hi - lo), lo, hi),
    )
    for method in ("phase", "tvl1", "ilk"):
        timed(
            f"fluo-mf + register ({method})",
            lambda m=method: run_net(mf, per_window(lambda s: fr.register_window(s, m), win), lo, hi),
        )
    timed(
        "fluo-mf + agreement",
        lambda: run_net(mf, per_window(fr.agreement_window, win), lo, hi),
    )
    timed(
        "fluo-mf + register (tvl1) + agreement",
        lambda: run_net(
            mf, per_window(lambda s: fr.agreement_window(fr.register_window(s, "tvl1")), win), lo, hi
        ),
    )
    res = {}

    def auto_run() -> np.ndarray:
        res["auto"] = restore(lr, model="fluo-mf", axes="TYX", dtype="float32", progress=False, frames="auto")
        return res["auto"].output

    timed("fluo-mf --frames auto (restore)", auto_run)
    timed(
        "fluo-mf (restore)",
        lambda: restore(lr, model="fluo-mf", axes="TYX", dtype="float32", progress=False).output,
    )
    timed(
        "fluo (restore)",
        lambda: restore(lr, model="fluo", axes="TYX", dtype="float32", progress=False).output,
    )
    auto = res["auto"]
    dis = {"none": [fr.disagreement(s) for s in win]}
    dis.update({m: [fr.disagreement(fr.register_window(s, m)) for s in win] for m in ("ilk", "tvl1")})
    rows = {lab: score(hr, p) for lab, p in preds.items()}
    entry = {
        "frames": len(x),
        "held_out_frames": "24-29" if name in TRAIN_MOVIES else "all",
        "rows": rows,
        "disagreement": dis,
        "auto_single_frame_blocks": auto.summary["single_frame_blocks"],
        "seconds": times,
    }
    f = rows["fluo"]["psnr_per_frame"]
    for lab, r in rows.items():
        d = np.array(r["psnr_per_frame"]) - np.array(f)
        print(
            f"{name[:28]:<28} {lab:<40} {r['psnr']:.2f} {r['ssim']:.3f} vs fluo {d.mean():+.2f} "
            f"(worst {d.min():+.2f}, {int((d < -0.1).sum())} frames < -0.1)",
            flush=True,
        )
    for m, v in dis.items():
        print(f"  disagreement {m} {np.round(v, 3).tolist()}", flush=True)
    print(
        f"  auto: {auto.summary['single_frame_blocks']} single-frame blocks ({time.monotonic() - t0:.0f} s)"
    )
    return entry


def measure(seed: int = 0) -> dict:
    """Every variant on both unseen movies and on the held-out frames 24-29 of the training movies.

    Movie ``j`` of ``UNSEEN + TRAIN_MOVIES`` is degraded with seed ``seed + j`` (the unseen movies
    as scripts/evaluate_builtin.py degrades them).
    """
    mf, sf = load_model("fluo-mf"), load_model("fluo")
    nominal = type(mf.crappifier)(mf.crappifier.kind, mf.crappifier.scale, mf.crappifier.params, {})
    out: dict = {"degradation": nominal.to_dict(), "seed": seed, "movies": {}}
    for j, name in enumerate(UNSEEN + TRAIN_MOVIES):
        out["movies"][name] = one_movie(name, j, mf, sf, nominal, seed)
    return out


def threshold(seed: int = 0) -> dict:
    """Disagreement after registration on every window of ``fluo-mf``'s own training frames.

    MitoCheck and Golgi frames 0-23 (what ``fluo-mf`` was trained on), degraded at nominal noise
    as in evaluation, windows t-2..t+2 within those frames.  The ``--frames auto`` threshold is the
    largest value seen (pssr.blockwise.frames.AUTO); the unseen movies play no part in it.
    """
    from pssr.blockwise import frames as fr

    mf = load_model("fluo-mf")
    nominal = type(mf.crappifier)(mf.crappifier.kind, mf.crappifier.scale, mf.crappifier.params, {})
    out: dict = {"rule": "max over the training windows", "per_movie": {}}
    for i, name in enumerate(TRAIN_MOVIES):
        lr = nominal(movie(name)[:24], rng=seed + i)
        x, _, _ = normalised(mf, lr)
        win = windows(x, mf.frames // 2)
        d = {m: [fr.disagreement(fr.register_window(w, m)) for w in win] for m in fr.REGISTRATION}
        d["none"] = [fr.disagreement(w) for w in win]
        out["per_movie"][name] = d
        print(name, {m: f"max {max(v):.4f} median {np.median(v):.4f}" for m, v in d.items()}, flush=True)
    out["max"] = {
        m: max(max(out["per_movie"][n][m]) for n in TRAIN_MOVIES) for m in (*fr.REGISTRATION, "none")
    }
    print("max", out["max"])
    return out


MOTION = (1.0, 2.0)  # the recipe of docs/models/experiments.md (issue 11, item 5)


def train_sources(hold: str) -> list:
    """Every shared timelapse but ``hold``, plus stacks and single images as pseudo-time.

    The training movies give frames 0-23 only (24-29 stay held out); motion augmentation moves the
    frames of the stacks and repeated images.
    """
    from pssr.training.data import Source

    srcs = [Source(movie(n)[:24], f"{n}[0:24]", axes="TYX") for n in TRAIN_MOVIES]
    srcs += [Source(movie(n), n, axes="TYX") for n in UNSEEN if n != hold]
    stack = tifffile.imread(DATA / "golgi_bfa_stack.tif").astype(np.float32)
    srcs.append(Source(stack, "golgi_bfa_stack.tif (Z as pseudo-time)", axes="TYX"))
    for n in ("AICS_12_134_C0.tif", "BPAE_nuclei.tif"):
        img = tifffile.imread(DATA / n).astype(np.float32)[:512, :512]
        srcs.append(Source(np.repeat(img[None], 5, 0), f"{n}[:512, :512] x5 (pseudo-time)", axes="TYX"))
    return srcs


def train_held_out(hold: str, steps: int, seed: int, work: Path) -> dict:
    """The zero-init, motion-augmented 5-frame fine-tune of ``fluo``, ``hold`` never sampled."""
    from _experiment_common import train_one, widened_parent

    parent = load_model("fluo")
    cfg5 = type(parent.config).from_dict({**parent.config.to_dict(), "in_channels": 5})
    work.mkdir(parents=True, exist_ok=True)
    init = widened_parent("fluo", cfg5, work / "fluo-5frames-widened.safetensors")
    out = work / f"mf-hold-{hold.split('_')[0]}-{steps}-s{seed}.safetensors"
    srcs = train_sources(hold)
    t = train_one(
        out,
        srcs,
        parent.crappifier,
        cfg5,
        init=init,
        steps=steps,
        seed=seed,
        norm=parent.normalization,
        patch=32,
        motion=MOTION,
    )
    return {**t, "path": str(out), "held_out": hold, "sources": [s.name for s in srcs], "motion": MOTION}


def score_trained(path: Path, hold: str, seed: int = 0) -> dict:
    """A model from ``train`` on the movie it never saw, and on the training movies' frames 24-29."""
    from pssr.blockwise import frames as fr

    tm, mf, sf = load_model(path), load_model("fluo-mf"), load_model("fluo")
    nominal = type(mf.crappifier)(mf.crappifier.kind, mf.crappifier.scale, mf.crappifier.params, {})
    out = {"model": str(path), "held_out": hold, "movies": {}}
    for name in (hold, *TRAIN_MOVIES):
        j = (UNSEEN + TRAIN_MOVIES).index(name)  # the seed measure() degrades it with
        hr_full = movie(name)[24:] if name in TRAIN_MOVIES else movie(name)
        lr = nominal(hr_full, rng=seed + j)
        hr = crop_to_scale(hr_full, lr.shape, mf.scale)
        x, lo, hi = normalised(tm, lr)
        xs, slo, shi = normalised(sf, lr)
        win = windows(x, tm.frames // 2)
        reg = per_window(lambda w: fr.register_window(w, "ilk"), win)
        preds = {
            "bilinear": bilinear(lr, mf.scale),
            "fluo": run_net(sf, xs[:, None], slo, shi),
            "fluo-mf": run_net(mf, win, lo, hi),
            "fluo-mf + register (ilk)": run_net(mf, reg, lo, hi),
            "trained 5-frame": run_net(tm, win, lo, hi),
            "trained 5-frame + register (ilk)": run_net(tm, reg, lo, hi),
        }
        rows = {k: score(hr, v) for k, v in preds.items()}
        out["movies"][name] = {
            "frames": len(x),
            "held_out_frames": "24-29" if name in TRAIN_MOVIES else "all",
            "rows": rows,
            "seconds": {},
        }
    print(table(out))
    return out


def table(res: dict) -> str:
    """Markdown: one row per (movie, variant), per-frame PSNR compared with ``fluo`` on the same frame."""
    lines = [
        "| movie | variant | PSNR (dB) | SSIM | vs bilinear | vs fluo, mean | worst frame vs fluo "
        "| frames > 0.1 dB below fluo | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["movies"].items():
        rows = m["rows"]
        ref = np.array(rows["fluo"]["psnr_per_frame"])
        label = f"{name} ({m['frames']} frames{', 24-29' if m['held_out_frames'] != 'all' else ''})"
        for k, v in rows.items():
            d = np.array(v["psnr_per_frame"]) - ref
            sec = m["seconds"].get(k)
            lines.append(
                f"| {label} | {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | "
                f"{v['psnr'] - rows['bilinear']['psnr']:+.2f} | {d.mean():+.2f} | {d.min():+.2f} | "
                f"{int((d < -0.1).sum())} | {'-' if sec is None else f'{sec:.1f}'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["measure", "train", "threshold", "score", "table"])
    ap.add_argument("--model", type=Path, help="score: a model file from train")
    ap.add_argument("--hold", choices=UNSEEN, help="train: the unseen movie kept out of training")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pssr-mf-unseen"))
    ap.add_argument("--docs", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "train":
        t = train_held_out(args.hold, args.steps, args.seed, args.work)
        print(json.dumps(t, indent=1))
        return 0
    if args.what == "threshold":
        res = threshold()
        if args.docs:
            (DOCS / "multiframe-threshold.json").write_text(json.dumps(res, indent=1) + "\n")
        return 0
    if args.what == "score":
        res = score_trained(args.model, args.hold)
        if args.docs:
            tag = args.hold.split("_")[0]
            (DOCS / f"multiframe-trained-hold-{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
        return 0
    if args.what == "table":
        print(table(json.loads((DOCS / "multiframe-unseen.json").read_text())))
        return 0
    res = measure()
    print(table(res))
    if args.docs:
        (DOCS / "multiframe-unseen.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
