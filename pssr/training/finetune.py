"""Where a training run starts: from scratch or from a parent model (fine-tuning).

One set-up for ``pssr train`` and the napari Train widget: :func:`model_start` turns the
architecture options a user gave (or did not give) and an optional parent (``--init``, the
widget's start model) into the network configuration, the parent model and how the new model's
metadata names its parent (built-in name or absolute path, and the file's sha256).
:func:`pssr.training.train.parent_check` then compares a finished fine-tune with its parent on
held-out patches of the training sources and (``keep_better``) keeps the better of the two, so that
adapting a model to a microscope never leaves the user with a model that is worse than the one they
started from, on their own held-out images; :func:`check_summary` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pssr.errors import PssrError

__all__ = [
    "ARCH_FLAGS",
    "Start",
    "check_summary",
    "describe_parent",
    "fine_tune_config",
    "model_start",
]


#: Architecture flags of ``pssr train``: (flag, argparse dest, ModelConfig field, default).
ARCH_FLAGS = (
    ("--arch", "arch", "arch", "srunet"),
    ("--size", "size", "size", "base"),
    ("--scale", "scale", "scale", 4),
    ("--frames", "frames", "in_channels", 1),
    ("--attention", "attention", "attention", False),
)


def describe_parent(ref: str) -> dict[str, str]:
    """How a fine-tuned model's metadata names its parent: built-in name or absolute path, sha256.

    The sha256 of the parent file identifies it exactly even after a built-in is retrained
    in a later release or a file is moved or overwritten.
    """
    import hashlib

    from pssr.nn.modelfile import builtin_models, resolve_model

    path = resolve_model(ref)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    name = str(ref) if str(ref) in builtin_models() else str(Path(path).resolve())
    return {"init_from": name, "init_sha256": h.hexdigest()}


def fine_tune_config(ref: str, **given):
    """The parent model and the architecture a fine-tune of it must use.

    ``given`` holds the architecture options the user set explicitly (``arch``, ``size``,
    ``scale``, ``frames``, ``attention``; ``None`` = not given).  Options not given come from
    the parent; a given one that differs from it is an error, because fine-tuning copies the
    parent's weights into the same network -- except ``frames`` from a single-frame srunet
    parent, whose input is then spread over the frames (:func:`pssr.training.train.load_init`).

    Returns
    -------
    (LoadedModel, ModelConfig)
    """
    from pssr.nn.modelfile import load_model

    parent = load_model(ref)
    pc = parent.config
    frames = given.get("frames")
    if frames is not None and frames != pc.in_channels:
        from pssr.nn.model import ModelConfig
        from pssr.training.train import widenable

        wide = ModelConfig.from_dict({**pc.to_dict(), "in_channels": frames})
        if widenable(pc, wide):  # --init em --frames 3: the parent's input spread over 3 sections
            pc = wide
    for flag, dest, fld, _default in ARCH_FLAGS:
        value = given.get(dest)
        if value is not None and value != getattr(pc, fld):
            raise PssrError(
                f"{flag} {value} differs from the --init model {str(ref)!r} ({fld}={getattr(pc, fld)!r}): "
                "fine-tuning keeps the parent's architecture. Drop "
                f"{flag} (it then comes from the parent) or train from scratch without --init."
            )
    return parent, pc


@dataclass
class Start:
    """The network a run trains, its parent (``None`` from scratch) and how the model names it."""

    config: Any  # pssr.nn.model.ModelConfig
    parent: Any = None  # pssr.nn.modelfile.LoadedModel
    init: str | None = None
    description: dict[str, str] = field(default_factory=dict)


def model_start(init: str | None, **given: Any) -> Start:
    """The start of a training run: ``given`` maps ARCH_FLAGS dests to values (``None`` = not given).

    From scratch, options not given take their defaults; with ``init``, they come from the parent
    and a given one that differs is refused (:func:`fine_tune_config`).
    """
    from pssr.nn.model import ModelConfig

    if not init:
        opts = {fld: default if given.get(d) is None else given[d] for _f, d, fld, default in ARCH_FLAGS}
        return Start(ModelConfig(**opts))
    parent, cfg = fine_tune_config(init, **given)
    rec = describe_parent(init)
    return Start(cfg, parent, rec["init_from"], {"init_sha256": rec["init_sha256"]})


def check_summary(check: dict[str, Any], parent: str) -> str:
    """One line saying which model a fine-tune kept and why (for the CLI and the napari status).

    ``check`` is the record of :func:`pssr.training.train.parent_check` (``training.parent_check``).
    """
    d = check["psnr_finetune"] - check["psnr_parent"]
    where = f"{check['patches']} held-out patches of the training images"
    if not check.get("held_out", True):
        where = f"{check['patches']} patches of the training images (too small to hold any out)"
    scores = (
        f"fine-tune {check['psnr_finetune']:.2f} dB vs parent {parent} {check['psnr_parent']:.2f} dB "
        f"({d:+.2f} dB) on {where}"
    )
    if check["kept"] == "fine-tune":
        return f"kept the fine-tune: {scores}"
    if check["applied"]:
        return (
            f"kept the parent {parent} (its weights are saved): the fine-tune did not beat it, {scores}; "
            "try the parent's own degradation (no preset), fewer steps or more images"
        )
    return (
        f"the fine-tune does NOT beat its parent {parent} and was saved anyway (--no-parent-check): {scores}"
    )
