"""pssr: point-scanning super-resolution for EM and fluorescence microscopy.

Restore an undersampled image with a model (here ``bilinear:4``, the baseline that needs no
weights; ``em``, ``fluo`` and ``fluo-mf`` are the built-in networks), then score it:

>>> import numpy as np
>>> import pssr
>>> lr = np.random.default_rng(0).random((16, 16), dtype=np.float32)
>>> result = pssr.restore(lr, model="bilinear:4", progress=False)
>>> result.output.shape, result.axes
((64, 64), 'YX')
>>> isinstance(pssr.__version__, str)
True
"""

from importlib import metadata as _metadata

from pssr.degrade.crappify import CrappifierConfig, estimate_noise, get_preset
from pssr.errors import PssrError
from pssr.io.formats import Image, read_image, write_image
from pssr.quality.metrics import evaluate_pair, nrmse, psnr, ssim


def _read_version() -> str:
    # The installed distribution's metadata; a source checkout without it falls back to the file
    # setuptools reads the version from (pyproject.toml: tool.setuptools.dynamic).
    try:
        return _metadata.version("pssr-toolkit")
    except _metadata.PackageNotFoundError:
        from pssr._version import __version__ as v

        return v


__version__: str = _read_version()

# Torch-backed entry points load lazily so `import pssr` stays light: name -> defining module.
_LAZY = {
    "evaluate_model": "pssr.quality.evaluate",
    "load_model": "pssr.nn.modelfile",
    "restore": "pssr.blockwise.predict",
    "save_model": "pssr.nn.modelfile",
    "train": "pssr.training.train",
    "verify_output": "pssr.blockwise.verify",
}

__all__ = [
    "CrappifierConfig",
    "Image",
    "PssrError",
    "__version__",
    "estimate_noise",
    "evaluate_model",
    "evaluate_pair",
    "get_preset",
    "load_model",
    "nrmse",
    "psnr",
    "read_image",
    "restore",
    "save_model",
    "ssim",
    "train",
    "verify_output",
    "write_image",
]


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pssr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
