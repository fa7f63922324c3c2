"""NoGAN training (fast.ai's "decrappify"): pretrain the generator, then the critic, then a short GAN.

1. **Generator pretraining**: ordinary training (:func:`pssr.training.train.train`, any loss, optionally
   from ``init``) to ``<out>.gen.safetensors``.
2. **Critic pretraining**: the generator frozen, a small convolutional critic (:class:`Critic`)
   learns to classify high-resolution patches as real or generated (binary cross-entropy);
   its accuracy on the held-out validation patches is tracked.
3. **Adversarial phase**: a short run in which the generator minimises its content loss plus
   ``adv_weight`` x the critic's cross-entropy of calling its output real, while the critic
   keeps learning; the critic's loss is tracked (a critic near chance, loss ~0.69, can no
   longer tell the generator's output from real patches).

Phases 2 and 3 share one checkpoint, ``<out>.ckpt.safetensors`` (both networks, both
optimizers, the phase and its step), resumable bit-identically on the CPU like ordinary
training; an interrupted phase 1 resumes from ``<out>.gen.ckpt.safetensors``.  Each phase
draws patches from its own generator seeded by ``(seed, phase)``, so a phase is reproducible
from the pretrained generator alone.  The critic is trained here only; the model file holds
the generator, and the critic's history is in its metadata and curve.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pssr.errors import PssrError
from pssr.nn.model import ModelConfig
from pssr.training.checkpoint import checkpoint_state, load_checkpoint, save_checkpoint
from pssr.training.data import PairSampler
from pssr.training.loop import Progress, Run, new_history, run_steps
from pssr.training.losses import critic_loss, generator_adversarial_loss, loss_fn
from pssr.training.train import (
    TrainConfig,
    check_finite,
    check_out,
    check_resume,
    check_sampler,
    feature_loss_for,
    finish,
    pick_device,
    run_identity,
    sibling,
    train,
    training_metadata,
    validate,
)
from pssr.util import file_sha256

logger = logging.getLogger(__name__)

__all__ = ["Critic", "NoGanConfig", "critic_accuracy", "train_nogan"]

PHASES = ("generator", "critic", "gan")


@dataclass
class NoGanConfig:
    """The critic and adversarial phases (the generator's pretraining is the :class:`TrainConfig`)."""

    critic_steps: int = 200
    gan_steps: int = 100
    adv_weight: float = 0.01
    critic_lr: float = 2e-4
    gan_lr: float = 1e-4
    critic_width: int = 32

    def __post_init__(self) -> None:
        for name in ("critic_steps", "gan_steps", "critic_width"):
            if getattr(self, name) < 1:
                raise PssrError(
                    f"{name}={getattr(self, name)} must be >= 1; give --{name.replace('_', '-')} 1 or more."
                )
        for name in ("adv_weight", "critic_lr", "gan_lr"):
            if not getattr(self, name) > 0:
                raise PssrError(
                    f"{name}={getattr(self, name)} must be > 0; give a positive --{name.replace('_', '-')}."
                )


class Critic(nn.Module):
    """A patch critic: strided convolutions to a map of real-vs-generated logits (PatchGAN-like).

    Four stride-2 convolutions (``width``, 2x, 4x, 8x channels, LeakyReLU, no normalisation
    layers) and a 3x3 convolution to one logit per ~46-px receptive field.
    """

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(4):
            w = width * 2**i
            layers += [nn.Conv2d(c, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = w
        layers.append(nn.Conv2d(c, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, H/16, W/16)``: > 0 means "real"."""
        return self.body(x)


@torch.no_grad()
def critic_accuracy(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fraction of patches the critic classifies right (mean logit > 0 = real)."""
    was = critic.training
    critic.eval()
    r = critic(real).mean(dim=(1, 2, 3)) > 0
    f = critic(fake).mean(dim=(1, 2, 3)) <= 0
    critic.train(was)
    return float(torch.cat([r, f]).float().mean())


# ------------------------------------------------------------------------------- steps
class CriticStep:
    """Critic pretraining: the frozen generator's output vs real patches, cross-entropy."""

    def __init__(self, gen, critic, opt, cfg: TrainConfig, device: torch.device) -> None:
        self.gen, self.critic, self.opt, self.cfg, self.device = gen, critic, opt, cfg, device
        self.nets = [critic]

    def set_lr(self, progress: float) -> None:
        """Constant learning rate."""
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr

    def compute(self, lr: np.ndarray, hr: np.ndarray, step: int) -> dict[str, float]:
        """Critic gradients for one batch."""
        x, y = torch.from_numpy(lr).to(self.device), torch.from_numpy(hr).to(self.device)
        with torch.no_grad():
            fake = self.gen(x).float()
        real_logits, fake_logits = self.critic(y), self.critic(fake)
        loss = critic_loss(real_logits, fake_logits)
        check_finite(loss, step, self.cfg.lr, "--critic-lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        acc = (torch.cat([real_logits.mean((1, 2, 3)) > 0, fake_logits.mean((1, 2, 3)) <= 0])).float().mean()
        return {"loss": loss.item(), "accuracy": float(acc)}

    def apply(self) -> None:
        """The critic's update."""
        self.opt.step()


class AdversarialStep:
    """Generator: content loss + ``adv_weight`` x adversarial term; critic: real vs generated."""

    def __init__(self, gen, critic, g_opt, d_opt, cfg: TrainConfig, adv_weight: float, device, features):
        self.gen, self.critic, self.g_opt, self.d_opt = gen, critic, g_opt, d_opt
        self.cfg, self.adv_weight, self.device, self.features = cfg, adv_weight, device, features
        self.nets = [gen, critic]

    def set_lr(self, progress: float) -> None:
        """Constant, small learning rates (the phase is short)."""
        for g in self.g_opt.param_groups:
            g["lr"] = self.cfg.lr

    def compute(self, lr: np.ndarray, hr: np.ndarray, step: int) -> dict[str, float]:
        """Generator and critic gradients for one batch."""
        x, y = torch.from_numpy(lr).to(self.device), torch.from_numpy(hr).to(self.device)
        fake = self.gen(x).float()
        kw = (
            {}
            if self.features is None
            else {"features": self.features, "feature_weight": self.cfg.feature_weight}
        )
        content = loss_fn(self.cfg.loss, fake, y, **kw)
        adv = generator_adversarial_loss(self.critic(fake))
        g_loss = content + self.adv_weight * adv
        check_finite(g_loss, step, self.cfg.lr, "--gan-lr")
        self.g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        # The generator's backward also reached the critic: its own gradients start afresh.
        self.d_opt.zero_grad(set_to_none=True)
        d_loss = critic_loss(self.critic(y), self.critic(fake.detach()))
        check_finite(d_loss, step, self.cfg.lr, "--critic-lr")
        d_loss.backward()
        return {"loss": content.item(), "adversarial": adv.item(), "critic_loss": d_loss.item()}

    def apply(self) -> None:
        """Both updates."""
        self.g_opt.step()
        self.d_opt.step()


# ------------------------------------------------------------------------------ phases
@dataclass
class _Phases:
    """What the critic and adversarial phases share (built once per run)."""

    sampler: PairSampler
    cfg: TrainConfig
    ncfg: NoGanConfig
    device: torch.device
    gen: nn.Module
    critic: nn.Module
    g_opt: torch.optim.Optimizer
    d_opt: torch.optim.Optimizer
    ckpt: Path
    progress: bool
    val: tuple[np.ndarray, np.ndarray]
    critic_accuracy: list[float] = dataclasses.field(default_factory=list)
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)  # what a resume must match

    def nets(self) -> dict[str, nn.Module]:
        return {"model": self.gen, "critic": self.critic}

    def opts(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt": self.g_opt, "critic_opt": self.d_opt}

    def phase_config(self, phase: str) -> TrainConfig:
        n = self.ncfg
        steps, lr = (n.critic_steps, n.critic_lr) if phase == "critic" else (n.gan_steps, n.gan_lr)
        return dataclasses.replace(
            self.cfg, steps=steps, minutes=None, lr=lr, val_every=min(self.cfg.val_every, steps)
        )

    def validate_critic(self) -> dict[str, float]:
        x, y = (torch.from_numpy(a).to(self.device) for a in self.val)
        with torch.no_grad():
            fake = self.gen(x).float()
        return {"accuracy": critic_accuracy(self.critic, y, fake)}

    def validate_gen(self) -> dict[str, float]:
        return validate(self.gen, *self.val, self.sampler.scale, self.device)

    def run(self, phase: str, state: dict[str, Any] | None) -> Run:
        """Run ``phase`` ("critic" or "gan") to its end, from ``state`` (a checkpoint's) if given."""
        cfg = self.phase_config(phase)
        if phase == "critic":
            run = Run(cfg, new_history(("loss", "accuracy"), ("accuracy",)))
            step = CriticStep(self.gen, self.critic, self.d_opt, cfg, self.device)
            validate_now = self.validate_critic
        else:
            run = Run(cfg, new_history(("loss", "adversarial", "critic_loss")))
            features = feature_loss_for(cfg, self.device)
            step = AdversarialStep(
                self.gen,
                self.critic,
                self.g_opt,
                self.d_opt,
                cfg,
                self.ncfg.adv_weight,
                self.device,
                features,
            )
            validate_now = self.validate_gen
        if state is not None:
            run.resume_from(state, self.sampler)
        else:
            self.sampler.rng = np.random.default_rng((self.cfg.seed, PHASES.index(phase)))
        bar = Progress(run, self.progress, desc=phase)

        def checkpoint() -> None:
            extra = {"phase": phase, "critic_val_accuracy": self.critic_accuracy, "identity": self.identity}
            save_checkpoint(self.ckpt, self.nets(), self.opts(), run.state(self.sampler, **extra))

        self.gen.train(phase == "gan")  # frozen while the critic pretrains
        self.critic.train()
        try:
            run_steps(step, self.sampler, run, validate_now=validate_now, checkpoint=checkpoint, bar=bar)
        except KeyboardInterrupt:
            checkpoint()
            bar.close()
            logger.warning(
                "interrupted in the %s phase at step %d; resume with --resume %s", phase, run.step, self.ckpt
            )
            raise
        bar.close()
        checkpoint()  # the phase's end: a resume goes on with the next phase
        return run


def _resume_point(resume: str | os.PathLike | None) -> tuple[str, dict[str, Any] | None]:
    if not resume:
        return "generator", None
    state = checkpoint_state(Path(resume))
    return state.get("phase", "generator"), state


def train_nogan(
    sampler: PairSampler,
    model_config: ModelConfig,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    nogan: NoGanConfig | None = None,
    *,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    description: dict[str, Any] | None = None,
    half: bool = False,
    init: str | os.PathLike | None = None,
) -> Path:
    """Train a generator with the NoGAN schedule and save it to ``out`` (see the module docstring).

    ``config`` is the generator pretraining (and the content loss of the adversarial phase);
    ``nogan`` the critic and adversarial phases.  ``resume`` is ``<out>.gen.ckpt.safetensors``
    (interrupted in pretraining) or ``<out>.ckpt.safetensors`` (later).  Writes ``out``, the
    pretrained generator ``<out>.gen.safetensors`` and curves ``<out>[.gen|.critic].curve.png``.
    """
    cfg, ncfg = config or TrainConfig(), nogan or NoGanConfig()
    out = check_out(out)
    check_sampler(sampler, model_config)
    gen_path, ckpt = sibling(out, ".gen.safetensors"), sibling(out, ".ckpt.safetensors")
    phase, state = _resume_point(resume)
    whole = {**run_identity(sampler, model_config, cfg, init), "nogan": asdict(ncfg)}
    if phase == "generator":
        if gen_path.exists() and not resume:
            later = ckpt if ckpt.exists() else sibling(out, ".gen.ckpt.safetensors")
            raise PssrError(
                f"{str(gen_path)!r} exists (a pretrained generator of an earlier --gan run): resume that run "
                f"with --resume {later}, or remove it to start again."
            )
        if gen_path.exists():  # pretraining finished, killed before the critic's first checkpoint
            check_resume(resume, whole)
            logger.info("the generator phase had finished (%s): starting the critic phase", gen_path)
            state = None
        else:
            train(
                sampler, model_config, gen_path, cfg, resume=resume, progress=progress, half=False, init=init,
                identity_extra={"nogan": whole["nogan"]},
            )  # fmt: skip
    from pssr.nn.modelfile import load_model, read_metadata

    device = pick_device(cfg.device)
    gen = load_model(gen_path).net.to(device)
    torch.manual_seed(cfg.seed + 1)  # the critic's initial weights (restored from a checkpoint on resume)
    critic = Critic(1, ncfg.critic_width).to(device)
    g_opt = torch.optim.AdamW(gen.parameters(), lr=ncfg.gan_lr, weight_decay=cfg.weight_decay)
    d_opt = torch.optim.AdamW(critic.parameters(), lr=ncfg.critic_lr, weight_decay=cfg.weight_decay)
    ph = _Phases(
        sampler,
        cfg,
        ncfg,
        device,
        gen,
        critic,
        g_opt,
        d_opt,
        ckpt,
        progress,
        sampler.validation_set(cfg.val_patches),
        identity=whole,  # the later phases' checkpoints record the whole run
    )
    if state is not None and phase != "generator":
        check_resume(resume, ph.identity)
        load_checkpoint(Path(resume), ph.nets(), ph.opts())
        ph.critic_accuracy = state.get("critic_val_accuracy", [])
    for name in ("critic", "gan") if phase != "gan" else ("gan",):
        run = ph.run(name, state if (state is not None and phase == name) else None)
        if name == "critic":
            ph.critic_accuracy = run.history["val_accuracy"]
            _save_critic_curve(run.history, sibling(out, ".critic.curve.png"))
    meta = training_metadata(
        sampler,
        run,
        device,
        init=init,
        stopped_early=False,
        final=ph.validate_gen(),
        description=description,
        features=feature_loss_for(cfg, device),
    )
    meta["training"]["nogan"] = {
        **asdict(ncfg),
        "pretrained_generator": {"file": gen_path.name, "sha256": file_sha256(gen_path)},
        "pretrain_config": asdict(cfg),
        "critic_val_accuracy": ph.critic_accuracy,
        "critic_loss_last": run.history["critic_loss"][-10:],
    }
    meta["training"]["steps"] = read_metadata(gen_path)["training"]["steps"] + run.step  # generator updates
    return finish(gen, model_config, out, meta, run.history, half=half)


def _save_critic_curve(history: dict[str, list], path: Path) -> None:
    from pssr.training.train import save_curve

    try:
        save_curve(history, path)
    except Exception as e:  # a plot must never lose a trained model
        logger.warning("could not save the critic curve: %s", e)
