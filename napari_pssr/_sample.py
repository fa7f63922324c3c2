"""Sample data: a real EM crop (ISBI 2012 ssTEM, held out from training) and its 4x LR version."""

from __future__ import annotations

from pathlib import Path

import tifffile


def _data_dir() -> Path:
    import pssr

    return Path(pssr.__file__).parent / "data"


def make_em_sample():
    """ISBI ssTEM sections (4 nm pixels) and the 16 nm version the `em` model restores."""
    d = _data_dir()
    hr = tifffile.imread(d / "isbi_em_hr.tif")
    lr = tifffile.imread(d / "isbi_em_lr.tif")
    um = (0.05, 0.004, 0.004)
    lr_scale = (0.05, 0.016, 0.016)
    lr_translate = (0.0, 0.006, 0.006)  # LR pixel i is centred on HR pixel 4i + 1.5
    cite = "ISBI 2012 ssTEM (Cardona et al. 2010, PLoS Biol 8:e1000502), sections 26-29"
    return [
        (
            lr,
            {
                "name": "EM 16 nm (low-res)",
                "scale": lr_scale,
                "translate": lr_translate,
                "metadata": {"source": cite, "degradation": "pssr-em, seed 0"},
            },
            "image",
        ),
        (
            hr,
            {"name": "EM 4 nm (ground truth)", "scale": um, "visible": False, "metadata": {"source": cite}},
            "image",
        ),
    ]
