"""Training checkpoints and step boundaries: what makes an interrupted run resume exactly.

A checkpoint is a safetensors file: the weights and optimizer moments of every network in the
run (one for ordinary training; generator and critic for NoGAN), torch's RNG state, and the
loss history as tensors; the step, elapsed time, the patch sampler's generator state and the
configuration are JSON in its header.  (The history used to be JSON too, so every checkpoint
rewrote a header that grew with every step; as tensors it costs 8 bytes a step.)

Every checkpoint is a step boundary.  A Ctrl-C before a step's update undoes the step's batch
draw and forward pass (:class:`StepBoundary`); one during the update waits until the step is
complete (:class:`HeldCtrlC`).
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open

from pssr.errors import PssrError
from pssr.nn.modelfile import atomic_save

__all__ = ["HeldCtrlC", "StepBoundary", "checkpoint_state", "load_checkpoint", "save_checkpoint"]

_HEADER = "pssr_ckpt"
_HISTORY = "history."


def _as_dict(obj: Any, name: str) -> dict[str, Any]:
    # One network (ordinary training) keeps the original key names: "model.*", "opt.*".
    return dict(obj) if isinstance(obj, Mapping) else {name: obj}


def _history_tensors(history: Mapping[str, Sequence[float]]) -> dict[str, torch.Tensor]:
    # Step counts stay integers; losses and metrics are float64, which holds a Python float exactly.
    return {
        _HISTORY + k: torch.tensor(list(v), dtype=torch.int64 if k.endswith("step") else torch.float64)
        for k, v in history.items()
    }


def save_checkpoint(
    path: Path,
    net: torch.nn.Module | Mapping[str, torch.nn.Module],
    opt: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
    state: dict[str, Any],
) -> None:
    """Write a checkpoint atomically.

    Parameters
    ----------
    path : Path
        The checkpoint file.
    net, opt
        The network and its optimizer, or mappings prefix -> network / optimizer (NoGAN saves
        ``{"model": generator, "critic": critic}`` and ``{"opt": ..., "critic_opt": ...}``).
    state : dict
        JSON-able progress (``step``, ``elapsed``, ``sampler_rng``, ...); its ``history`` (name ->
        list of numbers) is stored as tensors.
    """
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in _as_dict(net, "model").items():
        tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    for prefix, o in _as_dict(opt, "opt").items():
        for pid, st in o.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"{prefix}.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    header = {k: v for k, v in state.items() if k != "history"}
    history = state.get("history", {})
    tensors.update(_history_tensors(history))
    header["history_keys"] = list(history)
    atomic_save(tensors, {_HEADER: json.dumps(header)}, path)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    p = Path(path)
    if not p.is_file():
        raise PssrError(f"checkpoint {str(p)!r} does not exist; check --resume.")
    try:
        with safe_open(str(p), framework="pt") as f:
            state = json.loads((f.metadata() or {})[_HEADER])
        tensors = load_file(str(p))
    except Exception as e:
        raise PssrError(
            f"{str(p)!r} is not a readable pssr checkpoint ({e}); pass the <out>.ckpt.safetensors "
            "file that training wrote, or start again without --resume."
        ) from e
    if "history_keys" in state:
        state["history"] = {k: tensors[_HISTORY + k].tolist() for k in state.pop("history_keys")}
    return state, tensors


def checkpoint_state(path: Path) -> dict[str, Any]:
    """A checkpoint's progress (step, history, elapsed, configuration) without loading networks."""
    return _read(path)[0]


def load_checkpoint(
    path: Path,
    net: torch.nn.Module | Mapping[str, torch.nn.Module],
    opt: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
) -> dict[str, Any]:
    """Restore a checkpoint into ``net`` and ``opt`` (as given to :func:`save_checkpoint`).

    Also restores torch's RNG state; returns the progress state (with its history).
    """
    state, t = _read(path)
    for prefix, module in _as_dict(net, "model").items():
        n = len(prefix) + 1
        weights = {k[n:]: v for k, v in t.items() if k.startswith(prefix + ".")}
        if not weights:
            raise PssrError(
                f"checkpoint {str(path)!r} holds no {prefix!r} network; it was written by another kind "
                "of run (ordinary vs --gan). Resume with the same flags, or start again without --resume."
            )
        try:
            module.load_state_dict(weights)
        except RuntimeError as e:
            raise PssrError(
                f"checkpoint {str(path)!r} holds a network of another architecture than this run's "
                f"({str(e).splitlines()[-1].strip()[:200]}); resume with the flags of the run that wrote it "
                "(--size, --scale, --frames, --init), or start again without --resume."
            ) from None
    for prefix, o in _as_dict(opt, "opt").items():
        sd = o.state_dict()
        new_state: dict[int, dict[str, Any]] = {}
        for k, v in t.items():
            head, _, rest = k.partition(".")
            if head == prefix and rest.split(".", 1)[0].isdigit():
                pid, name = rest.split(".", 1)
                new_state.setdefault(int(pid), {})[name] = v
        sd["state"] = new_state
        o.load_state_dict(sd)
    torch.set_rng_state(t["rng.torch"])
    return state


# ------------------------------------------------------------------------ step boundaries
@dataclass
class StepBoundary:
    """What drawing a batch and the forward pass change, saved at the start of a step.

    Until the update is applied, a step has changed only these: the sampler's generator (the
    batch it drew), torch's generator, and module buffers such as batch-norm running
    statistics.  An interrupt before the update restores them, so that the checkpoint it
    writes is exactly the state after the previous step (a checkpoint taken with the RNG one
    batch ahead made a resumed run train on other batches from then on).
    """

    sampler_rng: dict[str, Any]
    torch_rng: torch.Tensor
    buffers: list[dict[str, torch.Tensor]]

    @classmethod
    def save(cls, sampler: Any, nets: Sequence[torch.nn.Module]) -> StepBoundary:
        """The state at the start of a step (``sampler`` has a numpy ``rng``)."""
        return cls(
            sampler.rng.bit_generator.state,
            torch.get_rng_state(),
            [{k: b.detach().clone() for k, b in net.named_buffers()} for net in nets],
        )

    def restore(self, sampler: Any, nets: Sequence[torch.nn.Module]) -> None:
        """Undo everything the step did so far."""
        sampler.rng.bit_generator.state = self.sampler_rng
        torch.set_rng_state(self.torch_rng)
        with torch.no_grad():
            for net, saved in zip(nets, self.buffers, strict=True):
                for k, b in net.named_buffers():
                    b.copy_(saved[k])


class HeldCtrlC:
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

    def __enter__(self) -> HeldCtrlC:
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
        """Hold a Ctrl-C from now on."""
        self._holding = True

    def release(self) -> None:
        """Deliver a held Ctrl-C (Python's default handler raises KeyboardInterrupt here)."""
        self._holding = False
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._previous(*pending)
