"""Regenerate the built-in models in pssr/models from ../shared/data.

    python scripts/train_builtin.py em [--minutes 30] [--threads 1]
    python scripts/train_builtin.py fluo
    python scripts/train_builtin.py fluo-mf
    python scripts/train_builtin.py em-3d --init em --device cuda --loader-workers 5 --batch 32

Held-out data (never sampled for training; used by scripts/evaluate_builtin.py):
  em:      ISBI sections 25-29 and EPFL slices training0161-0164
  fluo:    BPAE_actin and AICS_12_134_C2
  fluo-mf: frames 24-29 of both timelapses; and two whole movies no model has seen (MF_UNSEEN:
           zebrafish YSL nuclei, Drosophila embryo H2B), scored as unseen-movie rows
  em-3d:   as em (ISBI sections 25-29, EPFL slices 0161-0164); it trains on the consecutive
           runs only (ISBI 0-24 and the EPFL runs 0000-0003, 0045-0048, 0061-0063, 0089-0091,
           each its own source so that Z context never spans two runs)
``--init em`` starts a multi-frame recipe from the single-section built-in with each section
given a third of its first-layer weights (pssr.training.train.load_init; ``spread:em``, the form em-3d's
stored command uses, means the same).
The exact invocation is stored in each model's metadata ("training.command").
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import numpy as np
import tifffile

from pssr.degrade.crappify import CrappifierConfig
from pssr.nn.model import ModelConfig
from pssr.training.data import PairSampler, Source
from pssr.training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "pssr" / "models"

SBEM_TRAIN = "cdeep3m_sbem_block1.tif"
SBEM_TEST = "cdeep3m_sbem_block2.tif"
EPFL_TEST = ("training0161.tif", "training0162.tif", "training0163.tif", "training0164.tif")
FLUO_TRAIN = ("BPAE_mito.tif", "BPAE_nuclei.tif", "AICS_12_134_C0.tif", "AICS_12_134_C1.tif")
FLUO_TEST = ("BPAE_actin.tif", "AICS_12_134_C2.tif")
MF_FILES = ("mitocheck_nuclei_timelapse.tif", "golgi_bfa_timelapse.tif")
MF_UNSEEN = ("zebrafish_ysl_nuclei_timelapse.tif", "drosophila_embryo_h2b_timelapse.tif")
MF_TRAIN_FRAMES = slice(0, 24)
MF_TEST_FRAMES = slice(24, 30)


def em_sources(split: str, sbem: bool = False) -> list[Source]:
    """ISBI ssTEM and EPFL FIB-SEM (the shipped ``em``), split into train / test.

    ``sbem=True`` adds SBEM block 1 to the training split (``--with-sbem``): the variant of
    scripts/sbem_experiment.py, which gains +0.33/+0.45 dB on SBEM block 2 but loses 0.01-0.03 dB
    on every held-out ISBI and EPFL section, so it is not shipped (docs/models/experiments.md).
    SBEM block 2 (another part of the same sample) and the L3 VNC ssTEM volume are never
    sampled by any recipe: they are scored as unseen volumes (``em_unseen``).
    """
    isbi = tifffile.imread(DATA / "em" / "isbi2012_sstem_train.tif")
    files = sorted((DATA / "em" / "epfl_fibsem_train").glob("*.tif"))
    if split == "train":
        srcs = [Source(isbi[:25], "isbi2012_sstem_train.tif[0:25]")]
        srcs += [
            Source(tifffile.imread(f), f"epfl_fibsem_train/{f.name}")
            for f in files
            if f.name not in EPFL_TEST
        ]
        if sbem:
            srcs.append(Source(tifffile.imread(DATA / "em" / SBEM_TRAIN), SBEM_TRAIN))
    else:
        srcs = [Source(isbi[25:], "isbi2012_sstem_train.tif[25:30]")]
        srcs += [
            Source(tifffile.imread(f), f"epfl_fibsem_train/{f.name}") for f in files if f.name in EPFL_TEST
        ]
    return srcs


def em_unseen() -> list[Source]:
    """EM volumes that no built-in model samples: SBEM block 2 and the L3 VNC ssTEM stack."""
    return [
        Source(tifffile.imread(DATA / "em" / n), n, axes="ZYX")
        for n in (SBEM_TEST, "drosophila_l3_vnc_sstem.tif")
    ]


EPFL_RUNS = ((0, 1, 2, 3), (45, 46, 47, 48), (61, 62, 63), (89, 90, 91))


def em3d_sources(split: str) -> list[Source]:
    """Consecutive sections only: ISBI ssTEM and the consecutive EPFL FIB-SEM runs (one source each).

    The test split holds the same sections as ``em``'s, as stacks (each section with its neighbours).
    """
    isbi = tifffile.imread(DATA / "em" / "isbi2012_sstem_train.tif")
    fib = DATA / "em" / "epfl_fibsem_train"
    if split != "train":
        test = np.stack([tifffile.imread(fib / f) for f in EPFL_TEST])
        return [
            Source(isbi[25:], "isbi2012_sstem_train.tif[25:30]", axes="ZYX"),
            Source(test, "epfl_fibsem_train/training0161-0164", axes="ZYX"),
        ]
    srcs = [Source(isbi[:25], "isbi2012_sstem_train.tif[0:25]", axes="ZYX")]
    for run in EPFL_RUNS:
        stack = np.stack([tifffile.imread(fib / f"training{i:04d}.tif") for i in run])
        srcs.append(Source(stack, f"epfl_fibsem_train/training{run[0]:04d}-{run[-1]:04d}", axes="ZYX"))
    return srcs  # axes: the model records "Z" as its context axis


def fluo_sources(split: str) -> list[Source]:
    """BPAE widefield and AICS spinning-disk single images."""
    names = FLUO_TRAIN if split == "train" else FLUO_TEST
    return [Source(tifffile.imread(DATA / "fluo" / n).astype(np.float32), n) for n in names]


def mf_sources(split: str) -> list[Source]:
    """The two live-cell timelapses, frames split in time."""
    sl = MF_TRAIN_FRAMES if split == "train" else MF_TEST_FRAMES
    return [
        Source(
            tifffile.imread(DATA / "fluo" / n).astype(np.float32)[sl],
            f"{n}[{sl.start}:{sl.stop}]",
            axes="TYX",
        )
        for n in MF_FILES
    ]


def mf_unseen() -> list[Source]:
    """The timelapses no built-in model has seen (issue 27), whole: scored, never trained on."""
    return [Source(tifffile.imread(DATA / "fluo" / n).astype(np.float32), n, axes="TYX") for n in MF_UNSEEN]


RECIPES = {
    "em": {
        "sources": em_sources,
        "crappifier": CrappifierConfig("pssr-em", 4, {}, {"var_factor": (0.3, 3.0)}),
        "model": ModelConfig(scale=4, in_channels=1, size="base"),
        "patch": 48,
        "modality": "EM (scanning / serial-section), 4x pixel size",
        "pixel_size": "trained at 4-5 nm HR pixels (16-20 nm input pixels)",
    },
    "em-3d": {
        "sources": em3d_sources,
        "crappifier": CrappifierConfig("pssr-em", 4, {}, {"var_factor": (0.3, 3.0)}),
        "model": ModelConfig(scale=4, in_channels=3, size="base"),
        "patch": 48,
        "modality": "EM volumes of aligned, near-isotropic sections (FIB-SEM, 5 nm): 4x pixel size, each "
        "section restored with its two Z neighbours as input",
        "pixel_size": "trained at 4-5 nm HR pixels (16-20 nm input pixels), 5-50 nm sections",
    },
    "fluo": {
        "sources": fluo_sources,
        "crappifier": CrappifierConfig("fluo", 4, {}, {"photons": (0.3, 3.0)}),
        "model": ModelConfig(scale=4, in_channels=1, size="base"),
        "patch": 48,
        "modality": "fluorescence (confocal / widefield), 4x pixel size, single frame",
        "pixel_size": "trained at 65-108 nm HR pixels (0.26-0.43 um input pixels)",
    },
    "fluo-mf": {
        "sources": mf_sources,
        "crappifier": CrappifierConfig("fluo", 4, {}, {"photons": (0.3, 3.0)}),
        "model": ModelConfig(scale=4, in_channels=5, size="small"),
        "patch": 24,
        "modality": "fluorescence live-cell timelapse, 4x pixel size, 5 frames (PSSR-MF)",
        "pixel_size": "trained at 0.35 um and uncalibrated HR pixels",
        "unseen_movies": mf_unseen,
    },
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(RECIPES))
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--init",
        default=None,
        help="fine-tune from this model file or built-in (a single-frame one is spread over the frames)",
    )
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--size", choices=["small", "base", "large"], help="network size (default: the recipe's)")
    ap.add_argument("--loss", default="l1", help="training loss (default l1, as the built-ins were trained)")
    ap.add_argument(
        "--with-sbem",
        action="store_true",
        help="em only: add SBEM block 1 to the training sources (the variant of scripts/sbem_experiment.py)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    r = dict(RECIPES[args.name])
    if args.with_sbem:
        if args.name != "em":
            ap.error("--with-sbem applies to the em recipe only")
        r["sources"] = lambda split: em_sources(split, sbem=True)
    if args.size:
        r["model"] = ModelConfig(scale=4, in_channels=r["model"].in_channels, size=args.size)
    frames = r["model"].in_channels
    out = args.out or OUT / f"{args.name}.safetensors"
    if args.init and args.init.startswith("spread:"):
        # The form the shipped em-3d was made with: pssr.training.train.load_init itself spreads a single-frame
        # parent over a multi-frame recipe's sections, so spread:NAME is NAME.
        args.init = args.init.split(":", 1)[1]
    sampler = PairSampler(
        r["sources"]("train"),
        4,
        crappifier=r["crappifier"],
        patch=r["patch"],
        frames=frames,
        val_fraction=0.1,
        rng=args.seed,
    )
    cfg = TrainConfig(
        steps=args.steps,
        minutes=None if args.steps else args.minutes,
        batch=args.batch,
        lr=args.lr,
        loss=args.loss,
        val_every=250,
        ckpt_every=250,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        loader_workers=args.loader_workers,
    )
    cmd = "python scripts/train_builtin.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    desc = {
        "command": cmd,
        "name": args.name,
        "modality": r["modality"],
        "pixel_size": r["pixel_size"],
        "citation": "see docs/models/ and ../shared/data/SOURCES.md",
        "held_out": [s.name for s in r["sources"]("test")]
        + ([s.name for s in em_unseen()] if args.name.startswith("em") else []),
    }
    if args.init:
        from pssr.nn.modelfile import read_metadata, resolve_model

        prev = read_metadata(resolve_model(args.init))["training"]
        desc["previous_training"] = {k: prev.get(k) for k in ("command", "steps", "minutes")}
    train(sampler, r["model"], out, cfg, description=desc, half=True, init=args.init)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
