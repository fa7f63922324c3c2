"""The step loop shared by ordinary training and NoGAN: bound, schedule, validation, checkpoints, Ctrl-C.

A :class:`Step` is one kind of optimisation step (supervised, critic, adversarial), split into
what an interrupt may undo (batch draw, forward, backward) and the update.  :class:`Run` is where
a run is (step, history, clock); :func:`run_steps` drives a step until the run's bound and
knows nothing about what the step trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from pssr.training.checkpoint import HeldCtrlC, StepBoundary

__all__ = ["Progress", "Run", "Step", "new_history", "run_steps"]


class Step(Protocol):
    """One kind of optimisation step, in two halves: what an interrupt may undo, and the update."""

    nets: list[torch.nn.Module]  # whose buffers an interrupted step restores

    def set_lr(self, progress: float) -> None:
        """Learning rate(s) at ``progress`` in [0, 1] of the run."""

    def compute(self, lr: np.ndarray, hr: np.ndarray, step: int) -> dict[str, float]:
        """Forward and backward for one batch; returns the step's losses; applies nothing."""

    def apply(self) -> None:
        """The optimizer update(s)."""


def new_history(
    per_step: Sequence[str] = ("loss",), validation: Sequence[str] = ("psnr", "psnr_bilinear")
) -> dict[str, list]:
    """An empty history: ``step`` and ``per_step`` losses, then ``val_step`` and ``val_<validation>``."""
    return {
        "step": [],
        **{k: [] for k in per_step},
        "val_step": [],
        **{f"val_{k}": [] for k in validation},
    }


@dataclass
class Run:
    """Where a run is: step count, history, clock and last validation (what checkpoints hold).

    ``cfg`` is a :class:`pssr.training.train.TrainConfig` (``steps``/``minutes``, ``batch``,
    ``val_every``, ``ckpt_every``).
    """

    cfg: Any
    history: dict[str, list] = field(default_factory=new_history)
    step: int = 0
    t0: float = field(default_factory=time.monotonic)
    last_val: dict[str, float] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        """Seconds of training so far (across resumes)."""
        return time.monotonic() - self.t0

    def finished(self) -> bool:
        """Whether the run has reached its bound."""
        if self.cfg.steps is not None and self.step >= self.cfg.steps:
            return True
        return self.cfg.minutes is not None and self.elapsed >= self.cfg.minutes * 60

    def progress(self) -> float:
        """Fraction of the run done (steps or minutes)."""
        return self.step / self.cfg.steps if self.cfg.steps else self.elapsed / (self.cfg.minutes * 60)

    def record(self, losses: dict[str, float]) -> None:
        """Count a completed step and its losses."""
        self.step += 1
        self.history["step"].append(self.step)
        for k, v in losses.items():
            self.history[k].append(v)

    def validation_due(self) -> bool:
        """Validate after every ``val_every`` steps and after the last step."""
        last = self.cfg.steps is not None and self.step == self.cfg.steps
        return self.step % self.cfg.val_every == 0 or last

    def record_validation(self, val: dict[str, float]) -> None:
        """Keep a validation result (the history's ``val_*`` keys) in the history."""
        self.last_val = val
        self.history["val_step"].append(self.step)
        for k in self.history:
            if k.startswith("val_") and k != "val_step":
                self.history[k].append(val[k[4:]])

    def state(self, sampler: Any, **extra: Any) -> dict[str, Any]:
        """What a checkpoint stores besides weights and optimizer moments."""
        return {
            "step": self.step,
            "history": self.history,
            "elapsed": self.elapsed,
            "sampler_rng": sampler.rng.bit_generator.state,
            "train_config": asdict(self.cfg),
            **extra,
        }

    def resume_from(self, state: dict[str, Any], sampler: Any) -> None:
        """Continue from a checkpoint's state."""
        self.step, self.history = state["step"], state["history"]
        self.t0 = time.monotonic() - state["elapsed"]
        sampler.rng.bit_generator.state = state["sampler_rng"]


class Progress:
    """The progress bar (``tqdm``; off when ``enabled`` is False)."""

    def __init__(self, run: Run, enabled: bool, desc: str = "train") -> None:
        total = run.cfg.steps
        self.bar = tqdm(
            total=total,
            initial=run.step,
            disable=not enabled,
            desc=desc,
            unit="step",
            bar_format=None if total else "{desc}: {n} steps [{elapsed}, {rate_fmt}{postfix}]",
        )

    def update(self, run: Run, losses: dict[str, float]) -> None:
        """Advance one step and show the latest losses and validation."""
        self.bar.update(1)
        post = {k: f"{v:.4f}" for k, v in losses.items()}
        if "psnr" in run.last_val:
            post["val_psnr"] = f"{run.last_val['psnr']:.2f}"
            post["bilinear"] = f"{run.last_val['psnr_bilinear']:.2f}"
        else:
            post.update({f"val_{k}": f"{v:.3f}" for k, v in run.last_val.items()})
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


def run_steps(
    step: Step,
    sampler: Any,
    run: Run,
    *,
    validate_now: Callable[[], dict[str, float]],
    checkpoint: Callable[[], None],
    bar: Progress,
    callback: Callable[[int, dict[str, float]], Any] | None = None,
) -> bool:
    """Run ``step`` until ``run`` is finished; True if ``callback`` stopped it.

    Each step: draw a batch and compute gradients (an interrupt undoes this, see
    :class:`~pssr.training.checkpoint.StepBoundary`), then apply the update, count the step, validate
    and checkpoint as one unit during which Ctrl-C waits (:class:`~pssr.training.checkpoint.HeldCtrlC`).
    On an interrupt, checkpointing is the caller's job (the run is then at a step boundary).
    """
    with HeldCtrlC() as ctrl_c:
        while not run.finished():
            step.set_lr(run.progress())
            boundary = StepBoundary.save(sampler, step.nets)
            try:
                lr_np, hr_np = sampler.sample(run.cfg.batch)
                losses = step.compute(lr_np, hr_np, run.step)
                ctrl_c.hold()
            except KeyboardInterrupt:
                boundary.restore(sampler, step.nets)
                raise
            step.apply()
            run.record(losses)
            if run.validation_due():
                run.record_validation(validate_now())
            if run.step % run.cfg.ckpt_every == 0:
                checkpoint()
            ctrl_c.release()
            # A step boundary: an interrupt from here on checkpoints step `run.step` as it is.
            bar.update(run, losses)
            if callback is not None and callback(run.step, {**losses, **run.last_val}) is False:
                return True
    return False
