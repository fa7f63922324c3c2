"""Score a model on high-resolution data: degrade it, restore it, compare (``pssr evaluate``)."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from pssr.degrade.crappify import get_preset, range_warning
from pssr.errors import PssrError
from pssr.quality.metrics import check_ground_truth, crop_to_scale, evaluate_pair

__all__ = ["evaluate_model"]

logger = logging.getLogger(__name__)


def evaluate_model(
    hr: Any,
    model: str | os.PathLike | Any,
    *,
    lr: Any = None,
    preset: str | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    axes: str | None = None,
    tta: bool = False,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Paper-style scores of a model against bilinear and bicubic on ``hr``.

    The low-resolution input is ``lr`` (a real acquisition of the same field) or ``hr`` degraded
    with ``preset`` (and ``params``), else with the model's own crappifier at its nominal noise
    (no jitter), seeded by ``seed``.

    Returns
    -------
    (scores, lr, restored)
        ``scores`` from :func:`pssr.quality.metrics.evaluate_pair` (``model``, ``bilinear``, ``bicubic``).

    Examples
    --------
    >>> import numpy as np
    >>> hr = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    >>> scores, lr, restored = evaluate_model(hr, "bilinear:4", preset="em")
    >>> lr.shape, restored.shape, sorted(scores)
    ((16, 16), (64, 64), ['bicubic', 'bilinear', 'model'])
    """
    from pssr.blockwise.predict import restore
    from pssr.nn.modelfile import LoadedModel, load_model

    lm = model if isinstance(model, LoadedModel) else load_model(model)
    hr = np.asarray(hr)
    if lr is not None and (preset or params):
        raise PssrError(
            "--preset/--params describe a simulated degradation, and the real low-resolution input (--lr) "
            "is used as it is: give one or the other."
        )
    if lr is None:
        if preset:
            cfg = get_preset(preset, lm.scale, **(params or {}))
        else:
            cfg = lm.crappifier
            if cfg is None:
                raise PssrError(
                    f"the model {lm.path!r} records no degradation (it was trained on real pairs); give the "
                    "real low-resolution images (--lr) or a degradation to simulate (--preset)."
                )
            # nominal noise, no jitter; given parameters (e.g. full_scale) win over the model's
            cfg = type(cfg)(cfg.kind, cfg.scale, {**cfg.params, **(params or {})}, {})
        lr = cfg(hr, rng=seed)
        warning = range_warning(hr, cfg)
        if warning:
            logger.warning(warning)
    hr_c = crop_to_scale(hr, np.shape(lr), lm.scale)  # a mismatched pair or a blank plane: refused before
    check_ground_truth(hr_c)  # the model runs
    pred = restore(np.asarray(lr, np.float32), model=lm, axes=axes, dtype="float32", tta=tta, progress=False)
    return evaluate_pair(hr_c, lr, lm.scale, {"model": pred.output}), lr, pred.output
