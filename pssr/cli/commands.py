"""``pssr train``, ``evaluate``, ``predict`` and ``models`` (torch-backed subcommands)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pssr.degrade.crappify import PRESETS
from pssr.errors import PssrError
from pssr.training.finetune import ARCH_FLAGS, model_start

logger = logging.getLogger("pssr")


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a super-resolution model")
    t.add_argument("hr", nargs="+", help="high-resolution images/stacks/folders (TIFF, PNG, zarr)")
    t.add_argument(
        "--lr", nargs="+", dest="lr_paths", help="matching real low-resolution files (paired training)"
    )
    t.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="crappifier for synthetic pairs (with --init: default the model's own)",
    )
    t.add_argument("--params", help="JSON crappifier parameters")
    t.add_argument(
        "--jitter",
        type=float,
        default=1.0,
        help="randomise the noise strength by up to this factor either way (default 1: off; with "
        "--init and no --preset: the model's own range)",
    )
    t.add_argument(
        "--noise-from",
        help="fit the crappifier noise to this real low-resolution image (with --init and no --preset: "
        "only the noise level of the --init model's own degradation is refitted)",
    )
    t.add_argument("--scale", type=int, help="pixel-size factor (default 4, or the --init model's)")
    t.add_argument("--out", required=True, help="model file to write (.safetensors)")
    t.add_argument(
        "--frames", type=int, help="input frames t-k..t+k (PSSR-MF), odd (default 1, or the --init model's)"
    )
    t.add_argument("--axes", help="axes of the inputs, e.g. TYX")
    bound = t.add_mutually_exclusive_group()
    bound.add_argument("--steps", type=int)
    bound.add_argument("--minutes", type=float)
    t.add_argument("--resume", help="checkpoint to continue from (<out>.ckpt.safetensors)")
    t.add_argument(
        "--init",
        help="fine-tune: start from this model (built-in em, em-3d, fluo, fluo-mf or a .safetensors file); "
        "architecture, scale, frames and (without --preset/--lr) the degradation come from it; "
        "--init em --frames 3 spreads a single-frame model over 3 sections (Z/T context)",
    )
    t.add_argument(
        "--no-parent-check",
        action="store_true",
        help="with --init: save the fine-tune even when it scores below its parent on held-out patches "
        "of the training images (by default the better of the two is saved, and the output says which)",
    )
    t.add_argument("--arch", choices=["srunet", "pssr-resunet"], help="network (default srunet)")
    t.add_argument("--size", choices=["small", "base", "large"], help="network size (default base)")
    t.add_argument("--attention", action="store_true", default=None, help="self-attention (pssr-resunet)")
    t.add_argument("--patch", type=int, default=48, help="LR patch size (default 48)")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--learning-rate", type=float, default=1e-3)
    t.add_argument(
        "--loss",
        default="l1",
        choices=["l1", "mse", "ssim", "ms-ssim", "l1+ssim", "l1+ms-ssim", "feature", "l1+feature"],
        help="training loss; 'feature' compares images through the shipped in-domain feature network "
        "(encoder of a microscopy denoising autoencoder), 'l1+feature' adds it to L1 (default l1)",
    )
    t.add_argument(
        "--feature-weight", type=float, help="weight of the feature term in l1+feature (default 1)"
    )
    t.add_argument(
        "--style-weight",
        type=float,
        help="weight of the Gram (texture) term of the feature losses (default 0)",
    )
    g = t.add_argument_group("NoGAN (--gan)")
    g.add_argument(
        "--gan",
        action="store_true",
        help="NoGAN: pretrain the generator (--steps/--minutes, --loss, can start from --init), pretrain a "
        "critic on generated vs real patches, then a short adversarial phase",
    )
    g.add_argument("--critic-steps", type=int, help="critic pretraining steps (default 200)")
    g.add_argument("--gan-steps", type=int, help="adversarial steps (default 100)")
    g.add_argument("--adv-weight", type=float, help="weight of the adversarial term (default 0.01)")
    g.add_argument("--critic-lr", type=float, help="critic learning rate (default 2e-4)")
    g.add_argument(
        "--gan-lr", type=float, help="generator learning rate in the adversarial phase (default 1e-4)"
    )
    t.add_argument("--val-every", type=int, default=200)
    t.add_argument("--ckpt-every", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="processes that draw training patches ahead (default 0: in the training process); on a GPU "
        "the sampler is the bottleneck: use about the CPU cores minus one. Batches depend on the seed "
        "and step only, so any N>0 trains on the same patches",
    )
    t.add_argument("--half", action="store_true", help="store weights as float16 (half size)")
    t.set_defaults(func=cmd_train)


#: ``pssr train`` flags that only NoGAN uses: (flag, argparse dest = NoGanConfig field).
_GAN_FLAGS = (
    ("--critic-steps", "critic_steps"),
    ("--gan-steps", "gan_steps"),
    ("--adv-weight", "adv_weight"),
    ("--critic-lr", "critic_lr"),
    ("--gan-lr", "gan_lr"),
)


def _check_loss_flags(args: argparse.Namespace) -> dict | None:
    """Reject flag combinations that would be silently ignored; the NoGAN options (None without --gan)."""
    from pssr.errors import PssrError

    feature = args.loss in ("feature", "l1+feature")
    for flag, dest in (("--feature-weight", "feature_weight"), ("--style-weight", "style_weight")):
        value = getattr(args, dest)
        if value is not None and not feature:
            raise PssrError(
                f"{flag} {value} applies to the feature losses only, not --loss {args.loss}; "
                f"add --loss l1+feature or drop {flag}."
            )
    if args.feature_weight is not None and args.loss == "feature":
        raise PssrError(
            f"--feature-weight {args.feature_weight} weighs the feature term against L1 in "
            "--loss l1+feature; --loss feature has no L1 term: use --loss l1+feature or drop "
            "--feature-weight."
        )
    given = {dest: getattr(args, dest) for _flag, dest in _GAN_FLAGS if getattr(args, dest) is not None}
    if not args.gan:
        if given:
            flag = next(f for f, d in _GAN_FLAGS if d in given)
            raise PssrError(
                f"{flag} {given[flag[2:].replace('-', '_')]} applies to --gan only; add --gan or drop {flag}."
            )
        return None
    return given


def warn_units(noise_from: str, fit: dict[str, float], hr: Any) -> bool:
    """Warn when the noise image and the HR image seem to be in different intensity units.

    The fitted noise is added in the noise image's intensity units (the same detector's counts).
    """
    import numpy as np

    from pssr.degrade.crappify import full_scale_of
    from pssr.util import strided_sample

    dt = np.dtype(hr.dtype)
    hr_fs = full_scale_of(strided_sample(hr) if dt.kind == "f" else np.zeros(1, dt))
    ratio = hr_fs / float(fit["full_scale"])
    if not 1 / 8 <= ratio <= 8:
        logger.warning(
            "the noise fitted on %s is added in that image's intensity units (full scale %g), but the "
            "high-resolution images reach a full scale of %g: if they are not in the same units (the same "
            "detector's counts), convert one of them, or give the noise with --params",
            noise_from, fit["full_scale"], hr_fs,
        )  # fmt: skip
        return True
    return False


def _train_crappifier(args: argparse.Namespace, parent, scale: int, hr_sources=None):
    """The degradation of synthetic training pairs.

    ``--preset`` (with ``--params``, ``--noise-from``, ``--jitter``), else the ``--init`` model's own.
    """
    from pssr.degrade.crappify import CrappifierConfig, estimate_noise, get_preset, noise_params

    own = parent.crappifier if parent is not None and not args.preset else None
    if not args.preset and own is None:
        raise PssrError(
            "give --preset (synthetic pairs from HR) or --lr (real pairs)"
            + (f"; the --init model {args.init!r} records no degradation to reuse." if parent else ".")
        )
    preset = args.preset or own.kind  # preset names equal crappifier kinds
    given = json.loads(args.params) if args.params else {}
    params = dict(own.params) if own else {}
    if args.noise_from:
        import numpy as np

        from pssr.io import formats as io

        ref = io.read_image(args.noise_from)
        fit = estimate_noise(np.asarray(ref.data[(0,) * (ref.data.ndim - 2)]))  # as crappify: its own dtype
        fitted = noise_params(preset, fit, scale)
        logger.info("noise fitted on %s: %s; %s parameters %s", args.noise_from, fit, preset, fitted)
        params.update(fitted)  # the fit replaces the parent's noise level
        for src in hr_sources or []:  # each HR source (a folder's files too); one warning
            if warn_units(args.noise_from, fit, src.data):
                break
    params.update(given)  # explicit --params win over the fit and the parent's
    base = get_preset(preset, scale, **params)
    jitter = dict(own.jitter) if own and args.jitter == 1 else {}
    if args.jitter > 1:
        key = {"em": "dose", "fluo": "photons"}.get(base.kind, "var_factor")
        jitter = {key: (1 / args.jitter, args.jitter)}
    crap = CrappifierConfig(base.kind, scale, base.params, jitter)
    if own is not None:
        logger.info("degradation from the --init model: %s", crap.to_dict())
    return crap


def cmd_train(args: argparse.Namespace) -> int:
    """Train from HR (synthetic pairs) or HR + LR (real pairs), from scratch or from --init."""
    import sys

    from pssr.training.data import PairSampler, load_sources
    from pssr.training.train import TrainConfig, train

    out = Path(args.out)
    if out.exists():
        raise PssrError(
            f"--out {str(out)!r} already exists"
            + ("; a resumed run writes a new model file" if args.resume else "")
            + ": choose another path or remove it."
        )
    stem = out.name.removesuffix(".safetensors")
    for ckpt in (out.with_name(stem + ".ckpt.safetensors"), out.with_name(stem + ".gen.ckpt.safetensors")):
        if ckpt.exists() and not args.resume:  # no model yet, a checkpoint: an interrupted run
            raise PssrError(
                f"{str(ckpt)!r} is the checkpoint of an interrupted run to {str(out)!r}: continue it with "
                f"--resume {ckpt}, or delete the checkpoint to start again."
            )
    from pssr.blockwise.integrity import check_distinct

    ckpts = [out.with_name(stem + ext) for ext in (".ckpt.safetensors", ".gen.ckpt.safetensors")]
    check_distinct([*args.hr, *(args.lr_paths or []), args.noise_from], [out, *ckpts])
    nogan = _check_loss_flags(args)
    if args.no_parent_check and (not args.init or args.gan):
        raise PssrError(
            "--no-parent-check turns off the check of a fine-tune against its parent: it needs --init"
            + (" and is not for --gan (adversarial fine-tunes are not checked against the parent's PSNR)"
               if args.gan else "")
            + "; drop --no-parent-check."
        )  # fmt: skip
    start = model_start(args.init, **{d: getattr(args, d) for _f, d, _c, _v in ARCH_FLAGS})
    parent, mcfg = start.parent, start.config
    scale, frames = mcfg.scale, mcfg.in_channels
    hr = load_sources(args.hr, axes=args.axes)
    lr = load_sources(args.lr_paths, axes=args.axes) if args.lr_paths else None
    guessed = [s.name for s in hr if not s.axes_known]
    if frames > 1 and guessed:
        logger.warning(
            "the axes of %s were guessed (%s): the model will record its frames as coming from T "
            "or Z, and take T, else Z, on 4D inputs; pass --axes TYX (timelapse) or --axes ZYX "
            "(sections) so it records which",
            guessed[0] if len(guessed) == 1 else f"{len(guessed)} inputs", hr[0].axes,
        )  # fmt: skip
    crap = None if lr is not None else _train_crappifier(args, parent, scale, hr)
    sampler = PairSampler(
        hr,
        scale,
        crappifier=crap,
        lr=lr,
        patch=args.patch,
        frames=frames,
        rng=args.seed,
        norm=parent.normalization if parent is not None else None,
    )
    # pssr.training.train records init_from; the parent's sha256 travels in the description.
    init_ref, sha = start.init, start.description
    steps = args.steps if args.steps or args.minutes else 2000
    tcfg = TrainConfig(
        steps=steps if not args.minutes else None,
        minutes=args.minutes,
        batch=args.batch,
        lr=args.learning_rate,
        loss=args.loss,
        val_every=args.val_every,
        ckpt_every=args.ckpt_every,
        seed=args.seed,
        device=args.device,
        loader_workers=args.loader_workers,
        **{k: getattr(args, k) for k in ("feature_weight", "style_weight") if getattr(args, k) is not None},
    )
    run = dict(
        resume=args.resume,
        progress=not args.quiet,
        description={"command": "pssr " + " ".join(sys.argv[1:]), **sha},
        half=args.half,
        init=init_ref,
    )
    if nogan is not None:
        from pssr.training.nogan import NoGanConfig, train_nogan

        path = train_nogan(sampler, mcfg, out, tcfg, NoGanConfig(**nogan), **run)
    else:
        path = train(sampler, mcfg, out, tcfg, keep_better=not args.no_parent_check, **run)
    from pssr.nn.modelfile import read_metadata

    meta = read_metadata(path)
    v = meta["metrics"]["validation"]
    print(
        f"wrote {path}: validation PSNR {v['psnr']:.2f} dB (bilinear {v['psnr_bilinear']:.2f} dB), "
        f"SSIM {v['ssim']:.3f} (bilinear {v['ssim_bilinear']:.3f})"
    )
    check = meta["training"].get("parent_check") if nogan is None else None
    if check:
        from pssr.training.finetune import check_summary

        print(check_summary(check, args.init))
    return 0


def _add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="PSNR/SSIM/NRMSE of a model against bilinear and bicubic")
    e.add_argument("hr", help="high-resolution ground truth")
    e.add_argument("--model", default="em")
    e.add_argument("--lr", dest="lr_path", help="real low-resolution input (default: crappify HR)")
    e.add_argument("--preset", help="crappifier for HR (default: the model's own)")
    e.add_argument("--params", help="JSON crappifier parameters")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--axes")
    e.add_argument("--tta", action="store_true")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Print the metrics table."""
    from pssr.io import formats as io
    from pssr.quality.evaluate import evaluate_model

    hr = io.read_image(args.hr, axes=args.axes, lazy=False)
    lr = io.read_image(args.lr_path, axes=args.axes, lazy=False).data if args.lr_path else None
    res, _, _ = evaluate_model(
        hr.data,
        args.model,
        lr=lr,
        preset=args.preset,
        params=json.loads(args.params) if args.params else None,
        seed=args.seed,
        axes=hr.axes,
        tta=args.tta,
    )
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{'method':<10} {'PSNR (dB)':>10} {'SSIM':>8} {'NRMSE':>8}")
    for k, v in res.items():
        print(f"{k:<10} {v['psnr']:>10.2f} {v['ssim']:>8.4f} {v['nrmse']:>8.4f}")
    d = res["model"]["psnr"] - res["bilinear"]["psnr"]
    print(f"model - bilinear: {d:+.2f} dB")
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="restore an image, stack, timelapse or volume")
    _predict_args(p)
    p.set_defaults(func=cmd_predict)
    q = sub.add_parser(
        "plan",
        help="before a big run: blocks (total, populated, skipped, done), output size, disk, memory and "
        "time from restoring a few real blocks here; writes nothing",
    )
    _predict_args(q)
    q.set_defaults(func=cmd_plan)


def _predict_args(p) -> None:
    p.add_argument(
        "input",
        help="TIFF, PNG, zarr, OME-Zarr, N5, Neuroglancer precomputed or FILE.h5:/DATASET; zarr, N5 and "
        "precomputed also as s3://, gs:// or http(s):// URLs",
    )
    p.add_argument(
        "output",
        help="output .tif, .ome.zarr or .precomputed (Neuroglancer); the latter two also as s3:// "
        "or gs:// URLs",
    )
    p.add_argument(
        "--model", default="em", help="built-in name (em, em-3d, fluo, fluo-mf) or .safetensors file"
    )
    p.add_argument("--axes", help="input axes, e.g. TYX for a timelapse stored as a plain stack")
    p.add_argument("--tile", type=int, help="block size in input pixels (default: from free memory)")
    p.add_argument("--tta", action="store_true", help="8-fold test-time augmentation (+ uncertainty map)")
    p.add_argument(
        "--frames",
        default="model",
        choices=["model", "auto"],
        help="multi-frame models (fluo-mf): model = all the model's frames; auto = register the neighbour "
        "frames to the centre one and fall back to the single-frame model (fluo) where they still "
        "disagree more than in training (safer on fast motion or mitoses; slower)",
    )
    p.add_argument("--float32", action="store_true", help="float32 output instead of the input dtype")
    p.add_argument("--fidelity", action="store_true", help="also write a consistency map and summary")
    p.add_argument(
        "--noise", default="fit", help="noise model for --fidelity: fit, model, or JSON {gain, sigma}"
    )
    p.add_argument(
        "--empty-threshold",
        type=float,
        default=0.01,
        help="skip blocks whose normalised range is below this (0: never)",
    )
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help='fsspec options for an input URL, e.g. \'{"endpoint_url": "https://...", "anon": true}\' '
        "(default: the SDKs' environment/profile chain; never printed or stored)",
    )
    p.add_argument(
        "--mask",
        help="restore only where this mask (TIFF/zarr, 2D or the input's dimensions, at the input's "
        "resolution or lower) is non-zero; other blocks are skipped like blocks without input data",
    )
    p.add_argument("--workers", type=int, help="dask LocalCluster worker processes")
    p.add_argument("--scheduler", help="address of a running dask scheduler")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="network compute precision (auto: float16 on CUDA, measured within 1/1000 of the output range "
        "of float32; float32 elsewhere; bfloat16/float16 via autocast)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnxruntime"],
        help="what runs the network (auto: ONNX Runtime on the CPU at float32 when installed, "
        "pip install 'pssr-toolkit[onnx]'; torch otherwise)",
    )
    p.add_argument(
        "--memory",
        help="memory budget for the automatic tile, per process/worker (default 2GB on the CPU, "
        "8GB of GPU memory on CUDA; at most half of what is free), e.g. 4GB",
    )
    p.add_argument(
        "--region",
        help="restore only this region, in input pixels: z0:z1,y0:y1,x0:x1 (the last axes; open ends "
        "allowed, e.g. 0:64,:,1024:); Y and X grow to the block grid (docs/distributed.md)",
    )
    p.add_argument(
        "--region-world",
        help="the region in the input's world coordinates (its pixel size and origin), by axis name, "
        "e.g. z=1000:2000,y=4um:8.5um,x=0:4000 (a length unit suffix converts)",
    )
    p.add_argument(
        "--full-output",
        action="store_true",
        help="write the region into an .ome.zarr of the whole input's size that several runs fill "
        "region by region (at once if their regions do not overlap); the last one finishes it",
    )
    p.add_argument(
        "--no-disk-check",
        action="store_true",
        help="run even when the output's uncompressed size exceeds the free disk space",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def cmd_plan(args: argparse.Namespace) -> int:
    """``pssr plan``: what ``pssr predict`` with the same arguments would do, and cost."""
    args.quiet = True
    res = cmd_predict(args, dry_run=True)
    p = res.summary
    region = (
        "whole input"
        if not p["region"]
        else ", ".join(f"{a.lower()} {lo}:{hi}" for a, (lo, hi) in zip(p["axes"], p["region"], strict=True))
    )
    lines = [
        f"input:   {args.input} {p['axes']} {tuple(p['input_shape'])}; region: {region}"
        + (" (into a full-size output)" if p["full_output"] else ""),
        f"blocks:  {p['blocks']} (tile {p['tile']}, halo {p['halo']}): {p['blocks_populated']} populated, "
        f"{p['blocks_skipped']} skipped (no stored input chunk), {p['blocks_done']} already done, "
        f"{p['blocks_to_do']} to restore",
        f"output:  {args.output} {tuple(p['output_shape'])} {p['output_dtype']}, "
        f"{p['pyramid_levels']} level(s)",
        f"disk:    up to {_gb(p['disk_needed_bytes'])} needed (uncompressed), "
        f"{_gb(p['disk_free_bytes'])} free in {p['disk_free_dir']}"
        + ("" if p["disk_needed_bytes"] <= p["disk_free_bytes"] else ": DOES NOT FIT"),
    ]
    mem = f"memory:  about {_gb(p['network_memory_bytes'])} for the network at this tile"
    if "peak_rss_bytes" in p:
        mem += f"; peak {_gb(p['peak_rss_bytes'])} measured restoring {p['blocks_timed']} blocks here"
    lines.append(mem)
    if "estimated_seconds" in p:
        sec = p["estimated_seconds"]
        lines.append(
            f"time:    {p['seconds_per_block']:.3g} s per block on {p['device']} ({p['backend']}, "
            f"{p['precision']}) -> about {sec / 3600:.2f} h for {p['blocks_to_do']} blocks in one process"
        )
    print("\n".join(lines))
    return 0 if p["disk_needed_bytes"] <= p["disk_free_bytes"] else 1


def cmd_predict(args: argparse.Namespace, dry_run: bool = False):
    """Restore a file."""
    from pssr.blockwise.predict import restore

    noise = json.loads(args.noise) if args.noise.strip().startswith("{") else args.noise
    if args.workers or args.scheduler:
        import distributed  # noqa: F401  (configures its loggers on import; quiet them here)

        for name in list(logging.root.manager.loggerDict):
            if name.startswith("distributed") and not args.debug:
                logging.getLogger(name).setLevel(logging.WARNING)
    res = restore(
        args.input,
        model=args.model,
        output=args.output,
        axes=args.axes,
        tile=args.tile,
        tta=args.tta,
        frames=args.frames,
        dtype="float32" if args.float32 else "input",
        fidelity=args.fidelity,
        noise=noise,
        empty_threshold=args.empty_threshold,
        workers=args.workers,
        scheduler=args.scheduler,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        memory=args.memory,
        overwrite=args.overwrite,
        resume=args.resume,
        mask=args.mask,
        progress=not args.quiet,
        storage_options=args.storage_options,
        region=args.region,
        region_world=args.region_world,
        full_output=args.full_output,
        dry_run=dry_run,
        disk_check=not args.no_disk_check,
    )
    if dry_run:
        return res
    s = res.summary
    if s.get("complete") is False:
        why = (
            "other runs are still writing it; the last one finishes it"
            if s["other_runs_writing"]
            else "run the other regions (or the command without --region) to finish it"
        )
        print(
            f"wrote {s['blocks']} blocks of {args.output} ({s['empty_blocks']} empty, {s['seconds']} s); "
            f"the output has {s['output_blocks_done']} of {s['output_blocks']} blocks done: {why}."
        )
        return 0
    skipped = (
        f"{s['skipped_blocks']} skipped (no input data or masked out), " if s.get("skipped_blocks") else ""
    )
    print(
        f"wrote {args.output} ({res.axes}, {s['blocks']} blocks, {skipped}{s['empty_blocks']} empty, "
        f"{s['seconds']} s, {s.get('device', '?')}, {s.get('precision', '?')}, {s.get('backend', '?')}; "
        "verified)"
    )
    if "single_frame_blocks" in s:
        print(
            f"--frames auto: {s['single_frame_blocks']} of {s['blocks']} blocks restored from their centre "
            "frame alone (single-frame fallback: the neighbour frames disagreed)"
        )
    if s.get("retries"):
        print(f"retried {s['retries']} failed requests (HTTP 5xx/429, dropped connections, timeouts)")
    if "fidelity" in s:
        f = s["fidelity"]
        print(
            f"fidelity: {100 * f['frac_beyond_3sigma']:.2f}% of input pixels beyond 3 sigma "
            f"(a faithful restoration: about {100 * f['expected_frac_if_faithful']:.2f}%)"
        )
        for b in f["worst_blocks"][:3]:
            print(
                f"  inspect plane {b['plane']} y {b['y']} x {b['x']}: "
                f"{100 * b['frac_beyond_3sigma']:.1f}% beyond 3 sigma, max |z| {b['max_abs_z']}"
            )
    return 0


def _add_models(sub) -> None:
    m = sub.add_parser("models", help="list the built-in models")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    """List built-in models with their metadata."""
    from pssr.nn.modelfile import builtin_models, read_metadata

    rows = []
    for name, path in builtin_models().items():
        meta = read_metadata(path)
        tr = meta.get("training", {})
        val = meta.get("metrics", {}).get("validation", {})
        rows.append(
            {
                "name": name,
                "scale": meta["scale"],
                "frames": meta["frames"],
                "modality": tr.get("modality", ""),
                "data": [d["path"] for d in tr.get("data", [])],
                "steps": tr.get("steps"),
                "val_psnr": val.get("psnr"),
                "val_psnr_bilinear": val.get("psnr_bilinear"),
                "crappifier": meta.get("crappifier"),
                "path": str(path),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no built-in models installed")
        return 0
    for r in rows:
        vp = f"{r['val_psnr']:.2f}" if r["val_psnr"] is not None else "?"
        vb = f"{r['val_psnr_bilinear']:.2f}" if r["val_psnr_bilinear"] is not None else "?"
        print(f"{r['name']:<8} {r['scale']}x  {r['frames']} frame(s)  {r['modality']}")
        print(
            f"         trained {r['steps']} steps on {len(r['data'])} source(s) with "
            f"{(r['crappifier'] or {}).get('kind', 'real pairs')}; validation PSNR {vp} dB "
            f"(bilinear {vb} dB)"
        )
    return 0


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="write a model as a bioimage.io package (Fiji/deepImageJ, bioimageio)")
    x.add_argument("model", help="built-in name (em, em-3d, fluo, fluo-mf) or .safetensors file")
    x.add_argument("out", help="package to write (.zip)")
    x.add_argument(
        "--test-input",
        help="low-resolution image for the package's test (default: a bundled sample of the modality)",
    )
    x.add_argument("--name", help="short model name (default: the model's own)")
    x.add_argument("--author", action="append", dest="authors", help="author name (repeatable)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing package")
    x.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model as a bioimage.io model package."""
    from pssr.nn.export import export_bioimageio
    from pssr.nn.modelfile import resolve_model

    resolve_model(args.model)  # a clear error for a wrong name before the slow imports
    out = export_bioimageio(
        args.model,
        args.out,
        test_input=args.test_input,
        name=args.name,
        authors=args.authors,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {out} (bioimage.io model, weights pytorch_state_dict + torchscript); "
        f"check it with: bioimageio test {out}"
    )
    return 0


REGISTER = [_add_predict, _add_train, _add_evaluate, _add_models, _add_export]
