"""Shared pieces of the issue-11 experiment scripts.

In-process training, whole-plane inference with an optional noise map, degradations with
scaled noise and markdown table rows.

The held-out splits, the scores and the classical baselines come from
``finetune_experiment.py`` so every table in docs/models/experiments.md is measured alike.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from finetune_experiment import SIGMAS, SMOOTH_SIGMA, score, smoother  # noqa: F401 (re-exported)

from pssr.degrade.crappify import CrappifierConfig
from pssr.nn.model import ModelConfig, widen_inputs
from pssr.nn.modelfile import LoadedModel, load_model, save_model
from pssr.nn.normalization import percentile_norm
from pssr.quality.metrics import bilinear
from pssr.training.data import PairSampler, Source, add_noise_map, noise_map_spec
from pssr.training.train import TrainConfig, train
from pssr.util import strided_sample

THREADS = 1
torch.set_num_threads(THREADS)
MACHINE = f"{platform.machine()} CPU, {THREADS} torch thread (2 cores shared with 3 other agents' jobs)"

# The parameter whose change scales each kind's noise, and how (std multiplier k).
NOISE_KEY = {"em": "dose", "fluo": "photons", "pssr-em": "var_factor", "pssr-fluo": "var_factor"}


def scaled(kind: str, k: float, scale: int = 4, **params) -> CrappifierConfig:
    """The ``kind`` degradation with every noise std multiplied by ``k`` (k=1: nominal)."""
    base = CrappifierConfig(kind, scale, params)
    p = base.full_params()
    if kind in ("em", "fluo"):
        key = NOISE_KEY[kind]
        new = {key: p[key] / k**2, "read_sigma": p["read_sigma"] * k}
    else:
        new = {"var_factor": p["var_factor"] * k**2}
    return CrappifierConfig(kind, scale, {**params, **new})


def widened_parent(parent: str, cfg: ModelConfig, path: Path, *, spread: bool = False) -> Path:
    """The parent model with inputs widened to ``cfg``, saved to ``path``.

    New input channels start at zero, or (``spread``) every frame gets an equal share of the
    parent's single-frame weights (see :func:`pssr.nn.model.widen_inputs`).
    """
    if path.exists():
        return path
    lm = load_model(parent)
    from pssr.nn.model import build_model

    net = build_model(cfg)
    net.load_state_dict(widen_inputs(lm.net.state_dict(), lm.config, cfg, spread=spread))
    meta = {k: v for k, v in lm.meta.items() if k in ("normalization", "crappifier", "context_axis")}
    meta["training"] = {"widened_from": parent, "spread": spread}
    save_model(path, net, cfg, meta)
    return path


def train_one(
    out: Path,
    sources: list[Source],
    crap: CrappifierConfig,
    mcfg: ModelConfig,
    *,
    init: Path | str | None,
    steps: int,
    seed: int,
    norm,
    noise_map: bool = False,
    motion: tuple[float, float] = (0.0, 0.0),
    patch: int = 48,
    lr: float = 1e-3,
    loss: str = "l1",
) -> dict:
    """Train in this process (cached by ``out``); returns wall / CPU time and steps."""
    timing = out.with_suffix(".time.json")
    if out.exists() and timing.exists():
        return json.loads(timing.read_text())
    sampler = PairSampler(
        sources,
        mcfg.scale,
        crappifier=crap,
        patch=patch,
        frames=mcfg.in_channels,
        rng=seed,
        norm=norm,
        noise_map=noise_map,
        motion=motion,
    )
    # One thread: on the shared, oversubscribed 2-core machine two threads spent most of their
    # time waiting for each other (measured: 2.4 s/step with one thread, 17.6 s with two).
    tcfg = TrainConfig(
        steps=steps,
        batch=8,
        lr=lr,
        val_every=steps,
        ckpt_every=10 * steps,
        seed=seed,
        threads=THREADS,
        loss=loss,
    )
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    train(sampler, mcfg, out, tcfg, progress=False, init=str(init) if init else None)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    t = {
        "wall_s": time.monotonic() - t0,
        "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "steps": steps,
        "seed": seed,
    }
    timing.write_text(json.dumps(t))
    return t


@torch.no_grad()
def restore_planes(
    lm: LoadedModel,
    lr: np.ndarray,
    *,
    noise: str | dict = "fit",
    full_scale: float = 255.0,
    context: bool = True,
) -> np.ndarray:
    """Restore every plane of ``lr`` ``(N, h, w)`` whole (no tiling), as ``pssr predict`` does.

    Normalisation from a strided sample of the whole input (as restore()); multi-frame
    models get planes ``t-k..t+k`` (edge-replicated); a noise-conditioned model gets
    :func:`pssr.training.data.add_noise_map` with :func:`pssr.training.data.noise_map_spec` (``noise``: "fit" on
    the first plane, "model", or a dict).
    """
    lr = np.asarray(lr, np.float32)
    lo, hi = percentile_norm(strided_sample(lr), lm.normalization)
    x = (lr - lo) / (hi - lo)
    n, f = len(x), lm.frames
    k = f // 2
    spec = None
    if lm.config.noise_map:
        spec = noise_map_spec(noise, plane=lr[0], crappifier=lm.crappifier, full_scale=full_scale)
    out = []
    for t in range(n):
        idx = [min(max(t + d, 0), n - 1) for d in range(-k, k + 1)] if context else [t] * f
        xin = x[idx]
        if spec is not None:
            xin = add_noise_map(xin, spec, lo=lo, hi=hi)
        y = lm.net(torch.from_numpy(np.ascontiguousarray(xin))[None])[0, 0].numpy()
        out.append(y * (hi - lo) + lo)
    return np.stack(out)


def baselines(hr: np.ndarray, lr: np.ndarray, scale: int = 4) -> dict[str, dict]:
    """bilinear, bilinear + Gaussian sigma 2 and the best smoother (sigma chosen on the test)."""
    rows = {
        "bilinear": score(hr, bilinear(lr, scale)),
        f"bilinear + Gaussian sigma {SMOOTH_SIGMA:g}": score(hr, smoother(lr, scale)),
    }
    best = max(({**score(hr, smoother(lr, scale, s)), "sigma": s} for s in SIGMAS), key=lambda m: m["psnr"])
    rows[f"best smoother (sigma {best['sigma']:g}, chosen on the test)"] = best
    return rows


def table(results: dict[str, dict[str, dict]], runs: dict[str, dict], first_col: str = "test") -> str:
    """Markdown: one row per (test, variant) with deltas vs bilinear, smoother sigma 2, best smoother."""
    lines = [
        f"| {first_col} | variant | PSNR (dB) | SSIM | vs bilinear | vs smoother sigma 2 | vs best smoother "
        "| train steps / time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for test, rows in results.items():
        bil = rows["bilinear"]
        smo = next(v for k, v in rows.items() if k.startswith("bilinear + Gaussian"))
        top = next(v for k, v in rows.items() if k.startswith("best smoother"))
        for k, v in rows.items():
            run = runs.get(v.get("run", ""), None)
            cost = "-"
            if run:
                cost = f"{run['steps']} steps / {run['wall_s'] / 60:.1f} min wall ({run['cpu_s'] / 60:.1f} CPU-min)"
            lines.append(
                f"| {test} | {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | "
                f"{v['psnr'] - bil['psnr']:+.2f} dB / {v['ssim'] - bil['ssim']:+.3f} | "
                f"{v['psnr'] - smo['psnr']:+.2f} dB / {v['ssim'] - smo['ssim']:+.3f} | "
                f"{v['psnr'] - top['psnr']:+.2f} dB / {v['ssim'] - top['ssim']:+.3f} | {cost} |"
            )
    return "\n".join(lines)
