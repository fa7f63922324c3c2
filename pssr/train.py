"""The training loop: AdamW + one-cycle, validation against bilinear, checkpoints, resume.

Checkpoints are safetensors files too (weights, optimizer moments, torch RNG state) with
the step, history and the patch sampler's generator state in their metadata, so an
interrupted run (Ctrl-C or a kill) resumes from the last checkpoint and, with
``steps``, reproduces an uninterrupted run exactly on the CPU.  Every checkpoint is a step
boundary: a Ctrl-C before a step's update undoes the step's batch draw (see ``_Boundary``),
and one during the update waits until the step is complete (see ``_HeldCtrlC``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open
from tqdm.auto import tqdm

from pssr.data import PairSampler
from pssr.model import ModelConfig, build_model
from pssr.modelfile import _atomic_save, save_model

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "pick_device", "train"]

LOSSES = ("l1", "mse", "ssim", "ms-ssim", "l1+ssim", "l1+ms-ssim")


@dataclass
class TrainConfig:
    """Training hyper-parameters (saved with the model).

    ``steps`` or ``minutes`` bound the run; with ``minutes`` the one-cycle schedule
    follows elapsed time instead of steps.
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
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("give steps or minutes to bound training.")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1.")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes={self.minutes} must be > 0.")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is unknown; use one of {LOSSES}.")
        if self.batch < 1:
            raise ValueError(f"batch={self.batch} must be >= 1.")


def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU (or the one named, checked: see :mod:`pssr.devices`)."""
    from pssr.devices import resolve_device

    return torch.device(resolve_device(name))


# ------------------------------------------------------------------------------- losses
def _gauss_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _ssim_parts(x: torch.Tensor, y: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term (Gaussian 11x11 window)."""
    w = _gauss_window().to(x)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx**2
    syy = F.conv2d(y * y, w) - my**2
    sxy = F.conv2d(x * y, w) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    return (lum * cs).mean(), cs.mean()


def ssim_torch(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM (Gaussian 11x11 window), differentiable."""
    return _ssim_parts(x, y, data_range)[0]


# Wang et al. 2003 weights for the first three scales, renormalised (patches of ~100-200 px
# cannot be halved five times with an 11-px window).
_MS_WEIGHTS = (0.0448, 0.2856, 0.3001)


def ms_ssim_torch(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Multi-scale SSIM over as many of three scales as the patch allows (>= 11 px per side)."""
    vals: list[torch.Tensor] = []
    levels = 1
    while levels < len(_MS_WEIGHTS) and min(x.shape[-2:]) // 2**levels >= 11:
        levels += 1
    w = torch.tensor(_MS_WEIGHTS[:levels], dtype=x.dtype, device=x.device)
    w = w / w.sum()
    for i in range(levels):
        s, cs = _ssim_parts(x, y, data_range)
        # Contrast-structure at the finer scales, full SSIM at the coarsest (clamped for the power).
        vals.append(torch.clamp(s if i == levels - 1 else cs, min=1e-6))
        if i < levels - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(vals) ** w)


def loss_fn(name: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss ``name`` (see :data:`LOSSES`)."""
    if name == "l1":
        return F.l1_loss(pred, target)
    if name == "mse":
        return F.mse_loss(pred, target)
    if name == "ssim":
        return 1 - ssim_torch(pred, target)
    if name == "ms-ssim":
        return 1 - ms_ssim_torch(pred, target)
    if name == "l1+ms-ssim":
        return F.l1_loss(pred, target) + 0.2 * (1 - ms_ssim_torch(pred, target))
    return F.l1_loss(pred, target) + 0.2 * (1 - ssim_torch(pred, target))


def one_cycle(progress: float, pct_start: float = 0.25, div: float = 25.0, final_div: float = 1e4) -> float:
    """Learning-rate multiplier of a cosine one-cycle schedule at ``progress`` in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    if p < pct_start:
        a = p / pct_start
        return 1 / div + (1 - 1 / div) * (1 - math.cos(math.pi * a)) / 2
    a = (p - pct_start) / (1 - pct_start)
    return 1 / final_div + (1 - 1 / final_div) * (1 + math.cos(math.pi * a)) / 2


# --------------------------------------------------------------------------- validation
def _val_psnr(pred: np.ndarray, hr: np.ndarray) -> float:
    from pssr.metrics import psnr

    return psnr(pred[:, 0], hr[:, 0])


@torch.no_grad()
def validate(net: torch.nn.Module, lr: np.ndarray, hr: np.ndarray, scale: int, device) -> dict[str, float]:
    """Paper-style PSNR/SSIM of the model and of bilinear upsampling on held-out patches."""
    from pssr.metrics import bilinear, ssim

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


# --------------------------------------------------------------------------- checkpoints
def _ckpt_tensors(net, opt) -> dict[str, torch.Tensor]:
    t = {f"model.{k}": v for k, v in net.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            t[f"opt.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    t["rng.torch"] = torch.get_rng_state()
    return t


def save_checkpoint(path: Path, net, opt, state: dict[str, Any]) -> None:
    """Atomic checkpoint (weights, optimizer moments, RNG states, progress)."""
    _atomic_save(_ckpt_tensors(net, opt), {"pssr_ckpt": json.dumps(state)}, path)


def load_checkpoint(path: Path, net, opt) -> dict[str, Any]:
    """Restore a checkpoint into ``net`` and ``opt``; returns its state dict."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint {str(p)!r} does not exist; check --resume.")
    try:
        with safe_open(str(p), framework="pt") as f:
            state = json.loads((f.metadata() or {})["pssr_ckpt"])
        t = load_file(str(p))
    except Exception as e:
        raise ValueError(f"{str(p)!r} is not a readable pssr checkpoint ({e}).") from e
    net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    sd = opt.state_dict()
    new_state: dict[int, dict[str, Any]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            new_state.setdefault(int(pid), {})[name] = v
    sd["state"] = new_state
    opt.load_state_dict(sd)
    torch.set_rng_state(t["rng.torch"])
    return state


# ------------------------------------------------------------------------ step boundaries
@dataclass
class _Boundary:
    """What drawing a batch and the forward pass change, saved at the start of a step.

    Until the update is applied, a step has changed only these: the sampler's generator (the
    batch it drew), torch's generator, and module buffers such as batch-norm running
    statistics.  An interrupt before the update restores them, so that the checkpoint it
    writes is exactly the state after the previous step (a checkpoint taken with the RNG one
    batch ahead made a resumed run train on other batches from then on).
    """

    sampler_rng: dict[str, Any]
    torch_rng: torch.Tensor
    buffers: dict[str, torch.Tensor]

    @classmethod
    def save(cls, sampler: PairSampler, net: torch.nn.Module) -> _Boundary:
        return cls(
            sampler.rng.bit_generator.state,
            torch.get_rng_state(),
            {k: b.detach().clone() for k, b in net.named_buffers()},
        )

    def restore(self, sampler: PairSampler, net: torch.nn.Module) -> None:
        sampler.rng.bit_generator.state = self.sampler_rng
        torch.set_rng_state(self.torch_rng)
        with torch.no_grad():
            for k, b in net.named_buffers():
                b.copy_(self.buffers[k])


class _HeldCtrlC:
    """Ctrl-C interrupts at once, except between :meth:`hold` and :meth:`release`.

    The update, the step count, the history, validation and the periodic checkpoint are one
    unit: a Ctrl-C that arrives while they run is delivered when they are all done, so it
    never leaves the weights of step k+1 with the step count and history of step k.  Only
    the main thread receives signals, so elsewhere (the napari worker) this does nothing.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._holding = False
        self._pending: tuple[int, Any] | None = None

    def __enter__(self) -> _HeldCtrlC:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):  # not SIG_IGN / SIG_DFL: those are left alone
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self._holding:
            self._pending = (signum, frame)
        else:
            self._previous(signum, frame)

    def hold(self) -> None:
        self._holding = True

    def release(self) -> None:
        self._holding = False
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._previous(*pending)  # Python's default handler raises KeyboardInterrupt here


# --------------------------------------------------------------------------------- train
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
) -> Path:
    """Train a super-resolution model and save it to ``out`` (``.safetensors``).

    A checkpoint ``<out>.ckpt.safetensors`` is written every ``ckpt_every`` steps and
    on Ctrl-C (of the last completed step); pass it as ``resume`` to continue: with
    ``steps``, the result is bit-identical to an uninterrupted run on the CPU.  A training curve is saved as
    ``<out>.curve.png``.  ``callback(step, info)`` is called after each step and may
    return ``False`` to stop (used by the napari widget's Cancel).  ``init`` starts from the
    weights of an existing model file with the same architecture (fine-tuning).

    Returns
    -------
    Path
        The model file.
    """
    cfg = config or TrainConfig()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {str(out)!r} must end in .safetensors.")
    if not out.resolve().parent.is_dir():
        raise ValueError(f"output folder {str(out.resolve().parent)!r} does not exist; create it first.")
    if not os.access(out.resolve().parent, os.W_OK):
        raise ValueError(f"output folder {str(out.resolve().parent)!r} is not writable.")
    if model_config.scale != sampler.scale or model_config.in_channels != sampler.frames:
        raise ValueError(
            f"model (scale {model_config.scale}, {model_config.in_channels} frames) does not match "
            f"the data (scale {sampler.scale}, {sampler.frames} frames)."
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    sampler.rng = np.random.default_rng(cfg.seed)
    net = build_model(model_config).to(device)
    if init is not None and not resume:
        from pssr.modelfile import load_model

        src = load_model(init)
        if src.config != model_config:
            raise ValueError(
                f"--init model {str(init)!r} has config {src.config.to_dict()}, which differs from the "
                f"model being trained ({model_config.to_dict()}); fine-tuning needs the same architecture."
            )
        net.load_state_dict(src.net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = out.with_name(out.name.removesuffix(".safetensors") + ".ckpt.safetensors")
    val_lr, val_hr = sampler.validation_set(cfg.val_patches)
    history: dict[str, list] = {
        "step": [],
        "loss": [],
        "val_step": [],
        "val_psnr": [],
        "val_psnr_bilinear": [],
    }
    step, elapsed0 = 0, 0.0
    if resume:
        st = load_checkpoint(Path(resume), net, opt)
        step, history, elapsed0 = st["step"], st["history"], st["elapsed"]
        sampler.rng.bit_generator.state = st["sampler_rng"]
        logger.info("resumed from %s at step %d", resume, step)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    t0 = time.monotonic() - elapsed0
    total = cfg.steps
    bar = tqdm(
        total=total,
        initial=step,
        disable=not progress,
        desc="train",
        unit="step",
        bar_format=None if total else "{desc}: {n} steps [{elapsed}, {rate_fmt}{postfix}]",
    )
    last_val: dict[str, float] = {}
    net.train()

    def state() -> dict[str, Any]:
        return {
            "step": step,
            "history": history,
            "elapsed": time.monotonic() - t0,
            "sampler_rng": sampler.rng.bit_generator.state,
            "train_config": asdict(cfg),
        }

    interrupted = False
    try:
        with _HeldCtrlC() as ctrl_c:
            while True:
                elapsed = time.monotonic() - t0
                if cfg.steps is not None and step >= cfg.steps:
                    break
                if cfg.minutes is not None and elapsed >= cfg.minutes * 60:
                    break
                prog = step / cfg.steps if cfg.steps else elapsed / (cfg.minutes * 60)
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * one_cycle(prog)
                # 1. Draw a batch, forward, backward: undone by an interrupt (see _Boundary).
                boundary = _Boundary.save(sampler, net)
                try:
                    lr_np, hr_np = sampler.sample(cfg.batch)
                    x, y = torch.from_numpy(lr_np).to(device), torch.from_numpy(hr_np).to(device)
                    with torch.autocast(device.type, enabled=amp):
                        pred = net(x)
                    loss = loss_fn(cfg.loss, pred.float(), y)
                    if not torch.isfinite(loss):
                        raise RuntimeError(
                            f"training diverged at step {step} (loss {loss.item()}); lower --lr "
                            f"(now {cfg.lr}) or check the data for NaNs."
                        )
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    ctrl_c.hold()
                except KeyboardInterrupt:
                    boundary.restore(sampler, net)
                    raise
                # 2. Apply the update and record it: completed whole, Ctrl-C waits (see _HeldCtrlC).
                scaler.step(opt)
                scaler.update()
                step += 1
                history["step"].append(step)
                history["loss"].append(loss.item())
                if step % cfg.val_every == 0 or (cfg.steps is not None and step == cfg.steps):
                    last_val = validate(net, val_lr, val_hr, sampler.scale, device)
                    history["val_step"].append(step)
                    history["val_psnr"].append(last_val["psnr"])
                    history["val_psnr_bilinear"].append(last_val["psnr_bilinear"])
                if step % cfg.ckpt_every == 0:
                    save_checkpoint(ckpt, net, opt, state())
                ctrl_c.release()
                # 3. A step boundary: an interrupt from here on checkpoints step `step` as it is.
                bar.update(1)
                post = {"loss": f"{history['loss'][-1]:.4f}"}
                if last_val:
                    post["val_psnr"] = f"{last_val['psnr']:.2f}"
                    post["bilinear"] = f"{last_val['psnr_bilinear']:.2f}"
                bar.set_postfix(post, refresh=False)
                if (
                    callback is not None
                    and callback(step, {"loss": history["loss"][-1], **last_val}) is False
                ):
                    interrupted = True
                    break
    except KeyboardInterrupt:
        save_checkpoint(ckpt, net, opt, state())
        bar.close()
        logger.warning("interrupted at step %d; resume with --resume %s", step, ckpt)
        raise
    bar.close()
    if interrupted:
        save_checkpoint(ckpt, net, opt, state())
    final = validate(net, val_lr, val_hr, sampler.scale, device)
    minutes = (time.monotonic() - t0) / 60
    meta = {
        "normalization": sampler.norm.to_dict(),
        "crappifier": sampler.crappifier.to_dict() if sampler.crappifier else None,
        "context_axis": "T/Z" if sampler.frames > 1 else None,
        "training": {
            "data": sampler.describe(),
            "paired": sampler.lr is not None,
            "patch": sampler.patch,
            "steps": step,
            "minutes": round(minutes, 2),
            "machine": f"{platform.machine()} {device.type} ({torch.get_num_threads()} threads)",
            "config": asdict(cfg),
            "stopped_early": interrupted,
            "init_from": str(init) if init else None,
            **(description or {}),
        },
        "metrics": {"validation": final},
    }
    path = save_model(out, net.cpu(), model_config, meta, half=half)
    try:
        save_curve(history, out.with_name(out.name.removesuffix(".safetensors") + ".curve.png"))
    except Exception as e:  # a plot must never lose a trained model
        logger.warning("could not save the training curve: %s", e)
    logger.info(
        "saved %s after %d steps (%.1f min): val PSNR %.2f dB vs bilinear %.2f dB",
        path,
        step,
        minutes,
        final["psnr"],
        final["psnr_bilinear"],
    )
    return path


def save_curve(history: dict[str, list], path: Path) -> Path:
    """Plot loss and validation PSNR against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps, loss = np.array(history["step"]), np.array(history["loss"])
    ax[0].plot(steps, loss, lw=0.5, alpha=0.4, label="batch")
    if len(loss) > 20:
        k = max(1, len(loss) // 50)
        sm = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax[0].plot(steps[k - 1 :], sm, lw=1.5, label=f"mean of {k}")
    ax[0].set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    ax[0].legend()
    if history["val_step"]:
        ax[1].plot(history["val_step"], history["val_psnr"], "o-", label="model")
        ax[1].plot(history["val_step"], history["val_psnr_bilinear"], "--", label="bilinear")
        ax[1].legend()
    ax[1].set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR (held-out patches)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
