"""pssr: point-scanning super-resolution for EM and fluorescence microscopy."""

from pssr._version import __version__
from pssr.degrade.crappify import CrappifierConfig, estimate_noise, get_preset
from pssr.errors import PssrError
from pssr.io.formats import Image, read_image, write_image
from pssr.quality.metrics import evaluate_pair, nrmse, psnr, ssim

__all__ = [
    "CrappifierConfig",
    "Image",
    "PssrError",
    "__version__",
    "estimate_noise",
    "evaluate_pair",
    "get_preset",
    "nrmse",
    "psnr",
    "read_image",
    "ssim",
    "write_image",
]


def __getattr__(name: str):
    # Torch-backed entry points load lazily so `import pssr` stays light.
    if name in ("load_model", "save_model"):
        from pssr.nn import modelfile

        return getattr(modelfile, name)
    if name == "restore":
        from pssr.blockwise.predict import restore

        return restore
    if name == "verify_output":
        from pssr.blockwise.verify import verify_output

        return verify_output
    if name == "evaluate_model":
        from pssr.quality.evaluate import evaluate_model

        return evaluate_model
    if name == "train":
        from pssr.training.train import train

        return train
    raise AttributeError(f"module 'pssr' has no attribute {name!r}")
