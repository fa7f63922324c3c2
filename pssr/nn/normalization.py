"""The input normalisation every model records and every consumer applies, and its border rule.

One definition for the trainer (:mod:`pssr.training.data`), the restoration engine
(:mod:`pssr.blockwise.inputs`), model files (:mod:`pssr.nn.modelfile`) and bioimage.io packages
(:mod:`pssr.nn.export`): percentiles ``pmin``/``pmax`` of a strided sample of the input map to 0
and 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pssr.errors import PssrError

__all__ = ["BORDER", "BORDERS", "PMAX", "PMIN", "Normalization", "percentile_norm"]

PMIN, PMAX = 1.0, 99.8

# What the network sees beyond an image's edges, by the model's halo: numpy's (and bioimage.io's)
# padding modes, or "zero" (nothing: the network's own zero padding at the edge, pssr's rule before
# its bioimage.io packages had to reproduce it, kept to read older outputs' jobs).  BORDER is what
# restorations use (pssr.blockwise.plan.pad_block) and exported packages declare (their input's
# `pad`); docs/bioimageio.md has the measurements behind the choice.
BORDERS = ("edge", "reflect", "symmetric", "zero")
BORDER = "reflect"


@dataclass(frozen=True)
class Normalization:
    """Percentile normalisation recorded in every model."""

    pmin: float = PMIN
    pmax: float = PMAX

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"method": "percentile", "pmin": self.pmin, "pmax": self.pmax}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        """Inverse of :meth:`to_dict`."""
        if d.get("method", "percentile") != "percentile":
            raise PssrError(f"normalization method {d.get('method')!r} is unknown.")
        return cls(float(d["pmin"]), float(d["pmax"]))


def percentile_norm(sample: np.ndarray, norm: Normalization) -> tuple[float, float]:
    """``(lo, hi)`` percentiles of ``sample`` (hi > lo guaranteed)."""
    lo, hi = np.percentile(np.asarray(sample, np.float32), [norm.pmin, norm.pmax])
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)
