"""The training loop: AdamW + one-cycle, validation against bilinear, checkpoints, resume.

:func:`train` wires small parts together: a step (:class:`SupervisedStep`: one optimisation
step, split into the part an interrupt can undo and the update), :func:`run_steps` (the
loop: bound, schedule, validation, checkpoints, Ctrl-C), :func:`validate`, the checkpoint
format (:mod:`pssr.training.checkpoint`), a progress bar (:class:`Progress`) and the model file's
training record (:func:`training_metadata`).  NoGAN (:mod:`pssr.training.nogan`) runs its critic and
adversarial phases through the same loop.

An interrupted run (Ctrl-C or a kill) resumes from the last checkpoint and, with ``steps``,
reproduces an uninterrupted run exactly on the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pssr.errors import PssrError
from pssr.nn.model import ModelConfig, build_model
from pssr.nn.modelfile import save_model
from pssr.training.checkpoint import load_checkpoint, save_checkpoint
from pssr.training.data import PairSampler
from pssr.training.loader import ParallelBatches
from pssr.training.loop import Progress, Run, new_history, run_steps
from pssr.training.losses import FEATURE_LOSSES, LOSSES, FeatureLoss, default_feature_loss, loss_fn
from pssr.training.losses import (
    ms_ssim_torch as ms_ssim_torch,  # re-exported: tests and callers use pssr.training.train's
)
from pssr.training.losses import ssim_torch as ssim_torch
from pssr.util import check_folder

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "parent_check", "pick_device", "train", "widenable"]

#: The CLI flag of each :class:`TrainConfig` field, for messages.
FLAGS = {"lr": "--learning-rate", "steps": "--steps", "minutes": "--minutes", "batch": "--batch"}


@dataclass
class TrainConfig:
    """Training hyper-parameters (saved with the model).

    ``steps`` or ``minutes`` bound the run; with ``minutes`` the one-cycle schedule
    follows elapsed time instead of steps.  ``seed`` seeds torch (weight initialisation);
    the patches come from the sampler's own generator (``PairSampler(rng=...)``), which
    :func:`train` uses as it is.  ``feature_weight`` and ``style_weight`` apply to the
    feature losses only (see :mod:`pssr.training.losses`).
    """

    steps: int | None = 2000
    minutes: float | None = None
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "l1"
    val_every: int = 200
    val_patches: int = 16
    ckpt_every: int = 200
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    loader_workers: int = 0
    feature_weight: float = 1.0
    style_weight: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise PssrError("give steps or minutes to bound training.")
        if self.steps is not None and self.steps < 1:
            raise PssrError(f"steps={self.steps} must be >= 1.")
        if self.minutes is not None and not self.minutes > 0:
            raise PssrError(f"minutes={self.minutes} must be > 0.")
        if self.loss not in LOSSES:
            raise PssrError(f"loss={self.loss!r} is unknown; use one of {LOSSES}.")
        if self.batch < 1:
            raise PssrError(f"batch={self.batch} must be >= 1.")
        if not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise PssrError(
                f"loader_workers={self.loader_workers!r} must be an integer >= 0 (0: draw patches in the "
                "training process); give --loader-workers 0..N (on a GPU, about the CPU cores minus one)."
            )
        if self.feature_weight < 0 or self.style_weight < 0:
            raise PssrError(
                f"feature_weight={self.feature_weight}, style_weight={self.style_weight}: "
                "weights must be >= 0; give a non-negative --feature-weight / --style-weight."
            )
        if self.style_weight and self.loss not in FEATURE_LOSSES:
            raise PssrError(
                f"style_weight={self.style_weight} applies to the feature losses {FEATURE_LOSSES}, not "
                f"loss={self.loss!r}; use --loss l1+feature or drop --style-weight."
            )


def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU (or the one named, checked: see :mod:`pssr.nn.devices`)."""
    from pssr.nn.devices import resolve_device

    return torch.device(resolve_device(name))


def one_cycle(progress: float, pct_start: float = 0.25, div: float = 25.0, final_div: float = 1e4) -> float:
    """Learning-rate multiplier of a cosine one-cycle schedule at ``progress`` in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    if p < pct_start:
        a = p / pct_start
        return 1 / div + (1 - 1 / div) * (1 - math.cos(math.pi * a)) / 2
    a = (p - pct_start) / (1 - pct_start)
    return 1 / final_div + (1 - 1 / final_div) * (1 + math.cos(math.pi * a)) / 2


def feature_loss_for(cfg: TrainConfig, device: torch.device) -> FeatureLoss | None:
    """The feature loss ``cfg`` needs (on ``device``), or None."""
    if cfg.loss not in FEATURE_LOSSES:
        return None
    return default_feature_loss(cfg.style_weight).to(device)


# --------------------------------------------------------------------------- validation
def _val_psnr(pred: np.ndarray, hr: np.ndarray) -> float:
    from pssr.quality.metrics import psnr

    return psnr(pred[:, 0], hr[:, 0])


@torch.no_grad()
def validate(net: torch.nn.Module, lr: np.ndarray, hr: np.ndarray, scale: int, device) -> dict[str, float]:
    """Paper-style PSNR/SSIM of the model and of bilinear upsampling on held-out patches."""
    from pssr.quality.metrics import bilinear, ssim

    net.eval()
    pred = net(torch.from_numpy(lr).to(device)).float().cpu().numpy()
    net.train()
    centre = lr[:, lr.shape[1] // 2]
    bil = bilinear(centre, scale)[:, None]
    return {
        "psnr": _val_psnr(pred, hr),
        "ssim": ssim(pred[:, 0], hr[:, 0]),
        "psnr_bilinear": _val_psnr(bil, hr),
        "ssim_bilinear": ssim(bil[:, 0], hr[:, 0]),
    }


# ----------------------------------------------------------------------------- one step
class SupervisedStep:
    """Forward, loss and backward (:meth:`compute`), then the optimizer update (:meth:`apply`)."""

    def __init__(self, net, opt, cfg: TrainConfig, device: torch.device, features: FeatureLoss | None = None):
        self.net, self.opt, self.cfg, self.device = net, opt, cfg, device
        self.nets = [net]
        self.features = features
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def set_lr(self, progress: float) -> None:
        """One-cycle learning rate at ``progress`` in [0, 1]."""
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * one_cycle(progress)

    def loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The configured loss (``loss_fn`` is looked up here, so tests can intercept it)."""
        if self.features is None:
            return loss_fn(self.cfg.loss, pred.float(), y)
        return loss_fn(
            self.cfg.loss, pred.float(), y, features=self.features, feature_weight=self.cfg.feature_weight
        )

    def compute(self, lr: np.ndarray, hr: np.ndarray, step: int) -> dict[str, float]:
        """Gradients for this batch; nothing is applied yet."""
        x, y = torch.from_numpy(lr).to(self.device), torch.from_numpy(hr).to(self.device)
        with torch.autocast(self.device.type, enabled=self.amp):
            pred = self.net(x)
        loss = self.loss(pred, y)
        check_finite(loss, step, self.cfg.lr)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return {"loss": loss.item()}

    def apply(self) -> None:
        """The optimizer update."""
        self.scaler.step(self.opt)
        self.scaler.update()


def check_finite(loss: torch.Tensor, step: int, lr: float, flag: str = "--learning-rate") -> None:
    """Stop with a clear message when training diverges."""
    if not torch.isfinite(loss):
        raise PssrError(
            f"training diverged at step {step} (loss {loss.item()}): the loss must stay finite; "
            f"lower {flag} (now {lr}) or check the data for NaNs."
        )


# --------------------------------------------------------------------------------- train
def check_out(out: str | os.PathLike) -> Path:
    """The model path, checked: ``.safetensors`` in an existing, writable folder."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise PssrError(f"--out {str(out)!r} must end in .safetensors.")
    check_folder(out, PssrError, "choose another --out")
    return out


def sibling(out: Path, suffix: str) -> Path:
    """``<out>`` with ``.safetensors`` replaced by ``suffix`` (e.g. ``.ckpt.safetensors``)."""
    return out.with_name(out.name.removesuffix(".safetensors") + suffix)


def check_sampler(sampler: PairSampler, model_config: ModelConfig) -> None:
    """The model must fit the data's scale and frames."""
    if model_config.scale != sampler.scale or model_config.in_channels != sampler.frames:
        raise PssrError(
            f"model (scale {model_config.scale}, {model_config.in_channels} frames) does not match "
            f"the data (scale {sampler.scale}, {sampler.frames} frames); use --scale/--frames of the data."
        )


def load_init(net: torch.nn.Module, init: str | os.PathLike, model_config: ModelConfig) -> None:
    """Copy the weights of the model file ``init`` into ``net`` (same architecture).

    A single-frame srunet parent may start a multi-frame model of otherwise the same
    architecture (``--init em --frames 3``): every frame gets an equal share of the parent's
    first-layer weights (:func:`pssr.nn.model.widen_inputs` with ``spread=True``), so on a static
    scene the new model starts by computing what the parent computes on the frames' mean.
    """
    from pssr.nn.model import widen_inputs
    from pssr.nn.modelfile import load_model

    src = load_model(init)
    if src.config != model_config and widenable(src.config, model_config):
        logger.info("--init %s: its single-frame input spread over %d frames", init, model_config.in_channels)
        net.load_state_dict(widen_inputs(src.net.state_dict(), src.config, model_config, spread=True))
        return
    if src.config != model_config:
        raise PssrError(
            f"--init model {str(init)!r} has config {src.config.to_dict()}, which differs from the "
            f"model being trained ({model_config.to_dict()}); fine-tuning needs the same architecture "
            "(or, from a single-frame srunet, the same with more --frames)."
        )
    net.load_state_dict(src.net.state_dict())


#: Held-out patches the parent check scores: more than validation's 16, because it compares two
#: close models (paired, on the same patches), drawn with their own seed.
CHECK_PATCHES = 64
CHECK_SEED = 4321


def parent_check(
    net: Any,
    init: Any,
    model_config: Any,
    sampler: Any,
    device: Any,
    *,
    keep_better: bool,
    patches: int = CHECK_PATCHES,
) -> dict[str, Any]:
    """Score a fine-tune and its parent on held-out patches; with ``keep_better``, keep the better.

    The patches come from the validation region of every training source (their last planes or
    rows, never sampled for training: :meth:`pssr.training.data.PairSampler.validation_set`),
    degraded exactly as the training pairs were (the same crappifier, jitter included, or the real
    LR of paired training). "Parent" is the network as the fine-tune started: the ``init`` model's
    weights (a single-frame parent spread over the frames, as :func:`load_init`
    starts it). When the fine-tune does not score a higher PSNR than the parent and
    ``keep_better`` is set, the parent's weights are loaded into ``net`` (which is then saved).

    Returns
    -------
    dict
        The record the model's metadata keeps (``training.parent_check``): both PSNRs and SSIMs,
        which was kept (``"fine-tune"`` or ``"parent"``), whether the choice was applied
        (``keep_better``) and whether the patches were really held out.

    Notes
    -----
    The patches are synthetic where the training pairs were: the check protects against a
    fine-tune that drifts or overfits on the user's images, not against a training degradation
    that differs from the real microscope (on the degradation it was trained with, a fine-tune
    usually wins). That is why a fine-tune starts from the parent's own degradation by default.
    """
    lr, hr = sampler.validation_set(patches, seed=CHECK_SEED)
    start = build_model(model_config).to(device)
    load_init(start, init, model_config)
    tuned = validate(net, lr, hr, sampler.scale, device)
    parent = validate(start, lr, hr, sampler.scale, device)
    better = tuned["psnr"] > parent["psnr"]
    kept = "fine-tune" if better else "parent"
    if keep_better and not better:
        net.load_state_dict(start.state_dict())
    held_out = all(train != val for train, val in sampler.regions)
    return {
        "kept": kept,
        "applied": bool(keep_better),
        "patches": int(len(lr)),
        "held_out": held_out,
        "psnr_finetune": round(float(tuned["psnr"]), 4),
        "psnr_parent": round(float(parent["psnr"]), 4),
        "psnr_bilinear": round(float(tuned["psnr_bilinear"]), 4),
        "ssim_finetune": round(float(tuned["ssim"]), 4),
        "ssim_parent": round(float(parent["ssim"]), 4),
        "where": (
            "validation region of the training sources (its planes/rows are not training positions; "
            "multi-frame and motion-augmented patches may read neighbouring planes/rows of it), "
            if held_out
            else "patches of the training images themselves (too small to hold any part out), "
        )
        + ("real LR of the pairs" if sampler.lr is not None else "degraded as the training pairs"),
    }


def widenable(parent: ModelConfig, child: ModelConfig) -> bool:
    """Whether ``child`` is ``parent`` (single-frame srunet) with more input frames only."""
    same = {k: v for k, v in parent.to_dict().items() if k != "in_channels"}
    return (
        parent.arch == "srunet"
        and parent.in_channels == 1
        and child.in_channels > 1
        and {k: v for k, v in child.to_dict().items() if k != "in_channels"} == same
    )


def training_metadata(
    sampler: PairSampler,
    run: Run,
    device: torch.device,
    *,
    init: Any,
    stopped_early: bool,
    final: dict[str, float],
    description: dict[str, Any] | None = None,
    features: FeatureLoss | None = None,
) -> dict[str, Any]:
    """The model file's record of how it was trained."""
    loss = {"name": run.cfg.loss}
    if features is not None:
        meta = getattr(features, "meta", {})
        loss.update(
            feature_net={"name": meta.get("name"), "file": meta.get("file"), "sha256": meta.get("sha256")},
            feature_weight=run.cfg.feature_weight,
            style_weight=run.cfg.style_weight,
        )
    return {
        "normalization": sampler.norm.to_dict(),
        "crappifier": sampler.crappifier.to_dict() if sampler.crappifier else None,
        "context_axis": _context_axis(sampler) if sampler.frames > 1 else None,
        "training": {
            "data": sampler.describe(),
            "paired": sampler.lr is not None,
            "patch": sampler.patch,
            "steps": run.step,
            "minutes": round(run.elapsed / 60, 2),
            "machine": f"{platform.machine()} {device.type} ({torch.get_num_threads()} threads)",
            "config": asdict(run.cfg),
            "loss": loss,
            "stopped_early": stopped_early,
            "init_from": str(init) if init else None,
            **(description or {}),
        },
        "metrics": {"validation": final},
    }


def finish(net, model_config: ModelConfig, out: Path, meta: dict[str, Any], history, *, half: bool) -> Path:
    """Save the model and its training curve; log the result."""
    path = save_model(out, net.cpu(), model_config, meta, half=half)
    try:
        save_curve(history, sibling(out, ".curve.png"))
    except Exception as e:  # a plot must never lose a trained model
        logger.warning("could not save the training curve: %s", e)
    final = meta["metrics"]["validation"]
    logger.info(
        "saved %s after %d steps (%.1f min): val PSNR %.2f dB vs bilinear %.2f dB",
        path,
        meta["training"]["steps"],
        meta["training"]["minutes"],
        final["psnr"],
        final["psnr_bilinear"],
    )
    return path


def setup(cfg: TrainConfig) -> torch.device:
    """Threads, device and torch's seed for a run."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    return device


def _context_axis(sampler: PairSampler) -> str:
    """The axis a multi-frame model's neighbours came from, as its metadata records it.

    "T" or "Z" when every training source says the same (axes from metadata or given with
    ``--axes``), else "T/Z" (prediction then takes T, else Z): a plain multi-page TIFF reads as
    ZYX whether it is a stack or a timelapse, so a guessed axis is never recorded as a fact.
    """
    if not all(s.axes_known for s in sampler.hr):
        return "T/Z"
    found = {"T" if "T" in s.axes else "Z" if "Z" in s.axes else None for s in sampler.hr}
    return found.pop() if len(found) == 1 and None not in found else "T/Z"  # type: ignore[return-value]


def train(
    sampler: PairSampler,
    model_config: ModelConfig,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    description: dict[str, Any] | None = None,
    callback=None,
    half: bool = False,
    init: str | os.PathLike | None = None,
    identity_extra: dict[str, Any] | None = None,
    keep_better: bool = False,
) -> Path:
    """Train a super-resolution model and save it to ``out`` (``.safetensors``).

    A checkpoint ``<out>.ckpt.safetensors`` is written every ``ckpt_every`` steps and
    on Ctrl-C (of the last completed step); pass it as ``resume`` to continue: with
    ``steps``, the result is bit-identical to an uninterrupted run on the CPU.  A training curve is saved as
    ``<out>.curve.png``.  ``callback(step, info)`` is called after each step and may
    return ``False`` to stop (used by the napari widget's Cancel).  ``init`` starts from the
    weights of an existing model file with the same architecture (fine-tuning).  A resume must
    use the settings, network, parent and data the checkpoint was written with (else refused,
    naming what differs).  ``out`` is written at the end, replacing a file of that name (the
    ``pssr train`` command refuses an existing one).

    With ``init``, the fine-tune is compared with its start (the parent's weights) on held-out
    patches of the training sources (their validation region, never a training position, though
    multi-frame and motion-augmented patches may read neighbouring planes/rows of it; degraded
    as in training; :func:`parent_check`) and the metadata records both scores
    (``training.parent_check``). With ``keep_better`` (``pssr train --init`` and the napari Train
    widget), the better of the two is saved: the parent's weights when the fine-tune does not beat it.

    Patches are drawn with the sampler's own generator (``PairSampler(rng=...)``), not reseeded
    here; ``config.seed`` seeds torch (the initial weights).  The command line passes the same
    ``--seed`` to both.

    Returns
    -------
    Path
        The model file.

    Examples
    --------
    Two steps of a tiny network on synthetic pairs (HR degraded on the fly with the ``em`` preset):

    >>> import numpy as np
    >>> from pssr.degrade.crappify import get_preset
    >>> from pssr.nn.model import ModelConfig
    >>> from pssr.nn.modelfile import load_model
    >>> from pssr.training.data import PairSampler, Source
    >>> hr = np.random.default_rng(0).random((2, 96, 96), dtype=np.float32)
    >>> sampler = PairSampler([Source(hr)], 4, crappifier=get_preset("em", 4), patch=8, rng=0, min_std=0)
    >>> config = TrainConfig(steps=2, batch=2, val_every=2, val_patches=2, ckpt_every=2, device="cpu")
    >>> train(sampler, ModelConfig(widths=(4, 8), blocks=1), "tiny.safetensors", config, progress=False)
    PosixPath('tiny.safetensors')
    >>> load_model("tiny.safetensors").config.scale
    4
    """
    cfg = config or TrainConfig()
    out = check_out(out)
    check_sampler(sampler, model_config)
    with ExitStack() as stack:
        # Worker processes are started before torch touches the device (forked workers use numpy only).
        batches = (
            stack.enter_context(ParallelBatches(sampler, cfg.loader_workers, cfg.batch))
            if cfg.loader_workers
            else sampler
        )
        opts = dict(resume=resume, progress=progress, description=description, callback=callback, init=init)
        opts.update(half=half, extra=identity_extra, keep_better=keep_better)
        return _train(sampler, batches, model_config, out, cfg, **opts)


# What a resumed run must share with the run that wrote its checkpoint (else the model file
# would record settings that trained only part of it): the training settings that change the
# weights, the network and the data.
_RESUME_FIXED = (
    "steps", "minutes", "batch", "lr", "weight_decay", "loss", "seed",
    "feature_weight", "style_weight", "extra",
)  # fmt: skip


def _content(src: Any) -> str:
    """A cheap fingerprint of a source's content: 32x32 px crops on a 3x3 grid of up to 4 planes.

    Read lazily through ``src.read`` (about 37 k pixels whatever the source's size).
    """
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    size = min(32, src.h, src.w)
    planes = sorted({int(round(t)) for t in np.linspace(0, src.n - 1, min(4, src.n))})
    for t in planes:
        for y in np.linspace(0, src.h - size, 3).astype(int):
            for x in np.linspace(0, src.w - size, 3).astype(int):
                h.update(np.ascontiguousarray(src.read([t], int(y), int(x), size, size)).tobytes())
    return h.hexdigest()


def _init_ref(init: Any) -> str | None:
    """What a run started from: the sha256 of the parent model file (a built-in's or a path's)."""
    if init is None:
        return None
    from pssr.nn.modelfile import resolve_model
    from pssr.util import file_sha256

    try:
        return file_sha256(resolve_model(init))
    except Exception:  # not a file pssr can resolve: its name is what the run recorded
        return str(init)


def run_identity(
    sampler: PairSampler, model_config: ModelConfig, cfg: TrainConfig, init: Any = None
) -> dict[str, Any]:
    """The settings a checkpoint records so that a resume can be checked against them."""
    return {
        "network": model_config.to_dict(),
        "training": {k: v for k, v in asdict(cfg).items() if k in _RESUME_FIXED},
        "start": {"init_sha256": _init_ref(init)},
        "data": {
            # shapes, regions and a content fingerprint, not paths: the same data may be resumed
            # from another folder
            "sources": [
                {**{k: v for k, v in d.items() if k != "path"}, "content": _content(src)}
                for d, src in zip(sampler.describe(), sampler.hr, strict=True)
            ],
            "lr_sources": [_content(s) for s in sampler.lr] if sampler.lr is not None else None,
            "context_axis": _context_axis(sampler) if sampler.frames > 1 else None,
            "paired": sampler.lr is not None,
            "crappifier": sampler.crappifier.to_dict() if sampler.crappifier else None,
            "patch": sampler.patch,
            "frames": sampler.frames,
            "scale": sampler.scale,
            "normalization": sampler.norm.to_dict(),
        },
    }


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def check_resume(resume: str | os.PathLike, identity: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint with settings other than the ones it was written with."""
    from pssr.training.checkpoint import checkpoint_state

    before = checkpoint_state(Path(resume)).get("identity")
    if before is None:  # a checkpoint of an older pssr: the network is still checked when loaded
        return
    now = json.loads(json.dumps(identity))  # the same JSON round trip the checkpoint went through
    if ("nogan" in before) != ("nogan" in now):
        raise PssrError(
            f"--resume {str(resume)!r}: the checkpoint is of a "
            + (
                "--gan (NoGAN) run; resume it with --gan"
                if "nogan" in before
                else "run without --gan; drop --gan"
            )
            + " and the rest of its command, or start a new run without --resume."
        )
    diffs = []
    for part in sorted(set(now) | set(before)):
        b, n = before.get(part) or {}, now.get(part) or {}
        for k in sorted(set(b) | set(n)):
            if b.get(k) == n.get(k):
                continue
            if k in ("sources", "lr_sources") and isinstance(b.get(k), list) and isinstance(n.get(k), list):
                if len(b[k]) != len(n[k]):
                    diffs.append(f"{part}.{k}: {len(b[k])} in the checkpoint, {len(n[k])} now")
                else:  # name the sources (in order) that differ
                    diffs += [
                        f"{part}.{k}[{i}] (source {i + 1}): {_short(x)} in the checkpoint, {_short(y)} now"
                        for i, (x, y) in enumerate(zip(b[k], n[k], strict=True))
                        if x != y
                    ]
            else:
                diffs.append(f"{part}.{k}: {_short(b.get(k))} in the checkpoint, {_short(n.get(k))} now")
    if diffs:
        raise PssrError(
            f"--resume {str(resume)!r}: this run's settings differ from the run that wrote the checkpoint ("
            + "; ".join(diffs[:6])
            + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            + "). Resume with the same command and data, or start a new run without --resume."
        )


def _train(
    sampler,
    batches,
    model_config,
    out,
    cfg,
    *,
    resume,
    progress,
    description,
    callback,
    half,
    init,
    extra=None,
    keep_better=False,
):
    """:func:`train` once the batches' source (the sampler or its :class:`ParallelBatches`) is set.

    ``extra`` joins the run's identity (the NoGAN settings of a --gan run's generator phase).
    """
    identity = {**run_identity(sampler, model_config, cfg, init), **(extra or {})}
    if resume:
        check_resume(resume, identity)
    device = setup(cfg)
    net = build_model(model_config).to(device)
    if init is not None and not resume:
        load_init(net, init, model_config)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = sibling(out, ".ckpt.safetensors")
    val_lr, val_hr = sampler.validation_set(cfg.val_patches)
    run = Run(cfg, new_history())
    if resume:
        state = load_checkpoint(Path(resume), net, opt)
        before = int(state.get("train_config", {}).get("loader_workers", 0) or 0)
        if bool(before) != bool(cfg.loader_workers):
            # The two modes draw different batches from the same generator state: the resumed run
            # would match neither uninterrupted run.  (Any two N >= 1 draw the same ones.)
            raise PssrError(
                f"--loader-workers {cfg.loader_workers}: the checkpoint {str(resume)!r} was written with "
                f"--loader-workers {before}; "
                + (
                    "resume with --loader-workers 0 (patches drawn in the training process)."
                    if not before
                    else "resume with any --loader-workers >= 1 (the same batches for any number)."
                )
            )
        run.resume_from(state, sampler)
        logger.info("resumed from %s at step %d", resume, run.step)
    if batches is not sampler:
        batches.seek(run.step)  # batch k depends on (generator state, k): a resume draws the same ones
    features = feature_loss_for(cfg, device)
    step = SupervisedStep(net, opt, cfg, device, features)
    bar = Progress(run, progress)

    def save() -> None:  # the checkpoint records the run's identity, which a resume must match
        save_checkpoint(ckpt, net, opt, run.state(sampler, identity=identity))

    net.train()
    try:
        stopped = run_steps(
            step,
            batches,
            run,
            validate_now=lambda: validate(net, val_lr, val_hr, sampler.scale, device),
            checkpoint=save,
            bar=bar,
            callback=callback,
        )
    except KeyboardInterrupt:
        save()
        bar.close()
        logger.warning("interrupted at step %d; resume with --resume %s", run.step, ckpt)
        raise
    bar.close()
    if stopped:
        save()
    check = None
    if init is not None:
        check = parent_check(net, init, model_config, sampler, device, keep_better=keep_better)
    final = validate(net, val_lr, val_hr, sampler.scale, device)  # of the kept network
    meta = training_metadata(
        sampler,
        run,
        device,
        init=init,
        stopped_early=stopped,
        final=final,
        description=description,
        features=features,
    )
    if check is not None:
        meta["training"]["parent_check"] = check
    return finish(net, model_config, out, meta, run.history, half=half)


def save_curve(history: dict[str, list], path: Path) -> Path:
    """Plot loss (and any other per-step losses, e.g. the critic's) and validation PSNR against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validation = [k for k in history if k.startswith("val_") and k != "val_step"]
    per_step = [k for k in history if k != "step" and not k.startswith("val_")]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = np.array(history["step"])
    for name in per_step:
        loss = np.array(history[name], float)
        if len(loss) != len(steps) or not len(loss):
            continue
        label = "batch" if name == "loss" else name
        ax[0].plot(steps, loss, lw=0.5, alpha=0.4, label=label)
        if len(loss) > 20:
            k = max(1, len(loss) // 50)
            sm = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax[0].plot(steps[k - 1 :], sm, lw=1.5, label=f"{label}: mean of {k}")
    ax[0].set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    ax[0].legend()
    if "val_psnr" in history and history["val_step"]:
        ax[1].plot(history["val_step"], history["val_psnr"], "o-", label="model")
        ax[1].plot(history["val_step"], history["val_psnr_bilinear"], "--", label="bilinear")
        ax[1].legend()
    elif history["val_step"]:  # e.g. the NoGAN critic's accuracy
        for k in validation:
            ax[1].plot(history["val_step"], history[k], "o-", label=k.removeprefix("val_"))
        ax[1].legend()
        ax[1].set(xlabel="step", ylabel="value", title="validation (held-out patches)")
    if "val_psnr" in history:
        ax[1].set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR (held-out patches)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
