"""Which accelerator runs the network: ``auto`` picks CUDA, then Apple MPS, then the CPU.

Explicit names (``cpu``, ``cuda``, ``cuda:1``, ``mps``) are checked against what this machine
has, so a typo or a missing GPU is a clear error before any work, never a silent CPU run or a
traceback from inside torch.  On a multi-GPU node, dask workers each take their own GPU
(:func:`worker_device`), so ``--workers N`` never piles every worker onto GPU 0.
"""

from __future__ import annotations

import logging
import re

import torch

from pssr.errors import DeviceError

logger = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "DeviceError", "describe", "resolve_device", "resolve_precision", "worker_device"]

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> str:
    """A concrete torch device string for ``name`` (``auto``, ``cpu``, ``cuda[:i]``, ``mps``)."""
    s = "auto" if name is None else str(name).strip().lower()
    if s == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if mps_available():
            return "mps"
        return "cpu"
    if s == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if m:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(
                f"device={name!r}: no CUDA GPU is visible to this process (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use --device auto or cpu, or install a CUDA "
                "build of torch."
            )
        if m.group(1) is not None and int(m.group(1)) >= n:
            raise DeviceError(f"device={name!r}: this machine has {n} CUDA GPU(s), numbered 0..{n - 1}.")
        return s
    if s == "mps":
        if not mps_available():
            raise DeviceError(f"device={name!r}: Apple MPS is not available here; use --device auto or cpu.")
        return s
    raise DeviceError(f"device={name!r} is not a device: use auto, cpu, cuda, cuda:<index> or mps.")


def resolve_precision(precision: str, device: str) -> str:
    """The compute dtype for inference: ``auto`` is float16 on CUDA, float32 elsewhere.

    bfloat16 / float16 run the network under ``torch.autocast``; float16 needs CUDA or MPS.
    ``auto`` picks float16 on CUDA because it was measured there on real data within 1/1000 of
    the output range of float32 (largest difference 4.0e-4 of the range for ``em`` on held-out
    ssTEM, 3.1e-4 for ``fluo``, PSNR identical to 3 decimals, NVIDIA H100:
    docs/benchmarks/gpu.md); bfloat16 differed by up to 3.6e-3 and stays opt-in.  The CPU keeps
    float32 (bfloat16 there: 2-4e-3 of the range), MPS too (not measured).
    """
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise DeviceError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}.")
    if p == "auto":
        return "float16" if str(device).startswith("cuda") else "float32"
    if p == "float16" and device == "cpu":
        raise DeviceError(
            "precision='float16' needs a GPU (CUDA or MPS); on the CPU use bfloat16 or float32."
        )
    return p


def worker_device(device: str, worker_index: int | None) -> str:
    """The device a dask worker uses: on a multi-GPU node worker ``i`` takes GPU ``i mod n``.

    An explicit index (``cuda:1``) is kept; under dask-cuda each worker sees one GPU (``cuda``).
    """
    if device != "cuda" or worker_index is None:
        return device
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{worker_index % n}" if n > 1 else device


def describe(device: str) -> str:
    """A human-readable name, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return device
