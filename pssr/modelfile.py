"""Model files: safetensors weights plus JSON metadata, and the built-in model registry.

A model file is a ``.safetensors`` file whose header metadata holds one key, ``pssr``,
with a JSON document: the architecture config, scale, input frames and the axis they
run along, normalisation, the crappifier, training data/steps/time, validation metrics,
the receptive field and the package version.  Loading never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from pssr._version import __version__
from pssr.crappify import CrappifierConfig
from pssr.data import Normalization
from pssr.model import ModelConfig, build_model, receptive_radius

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "builtin_models", "load_model", "save_model", "resolve_model"]

FORMAT = "pssr-model"
FORMAT_VERSION = 1
BUILTIN_DIR = Path(__file__).parent / "models"
RF_METHOD = "structural"  # see pssr.model.receptive_radius


class ModelFileError(ValueError):
    """A model file is missing, corrupt, truncated or does not match its metadata."""


@dataclass
class LoadedModel:
    """A network with the metadata that must travel with it."""

    net: torch.nn.Module
    config: ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def scale(self) -> int:
        """Upsampling factor."""
        return self.config.scale

    @property
    def frames(self) -> int:
        """Input planes (1, or t-k..t+k)."""
        return self.config.in_channels

    @property
    def normalization(self) -> Normalization:
        """Input normalisation used in training."""
        return Normalization.from_dict(self.meta.get("normalization", Normalization().to_dict()))

    @property
    def crappifier(self) -> CrappifierConfig | None:
        """The acquisition model the network was trained to invert (None for real pairs)."""
        c = self.meta.get("crappifier")
        return CrappifierConfig.from_dict(c) if c else None

    @property
    def halo(self) -> int:
        """LR context (pixels) needed on each side of a tile for exact tiled output."""
        rf = self.meta.get("receptive_field")
        if rf is None or self.meta.get("receptive_field_method") != RF_METHOD:
            # Files from before the structural measurement may understate it: measure again.
            rf = receptive_radius(self.net)
            self.meta.update({"receptive_field": rf, "receptive_field_method": RF_METHOD})
        m = self.config.multiple
        return -(-int(rf) // m) * m


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    path = Path(path)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise ModelFileError(f"folder {str(parent)!r} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise ModelFileError(f"folder {str(parent)!r} is not writable; choose another --out.")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary file mode, like any other output
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_model(
    path: str | os.PathLike,
    net: torch.nn.Module,
    config: ModelConfig,
    meta: dict[str, Any],
    *,
    half: bool = False,
) -> Path:
    """Write ``net`` and its metadata atomically (a crash leaves no half-written file).

    ``half=True`` stores float weights as float16 (half the size; loaded back as float32).
    """
    full = dict(meta)
    full.update(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "scale": config.scale,
            "frames": config.in_channels,
            "pssr_version": __version__,
        }
    )
    full.setdefault("normalization", Normalization().to_dict())
    full["receptive_field"] = receptive_radius(net)
    full["receptive_field_method"] = RF_METHOD
    state = net.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    full["weights_dtype"] = "float16" if half else "float32"
    _atomic_save(state, {"pssr": json.dumps(full)}, Path(path))
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``pssr`` metadata of a model file, validated."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file {str(p)!r} does not exist.")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("pssr")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(
            f"{str(p)!r} is not a readable safetensors model file ({e}); it may be truncated "
            "or corrupt: re-download or re-train it."
        ) from e
    if not raw:
        raise ModelFileError(f"{str(p)!r} has no pssr metadata; it is not a pssr model file.")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{str(p)!r} has corrupt pssr metadata ({e}).") from e
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{str(p)!r} is not a pssr model (format {meta.get('format')!r}).")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(
            f"{str(p)!r} uses model format {meta['format_version']}, newer than this pssr "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade pssr."
        )
    return meta


def builtin_models() -> dict[str, Path]:
    """Name -> path of the models shipped in the package."""
    return {p.name.removesuffix(".safetensors"): p for p in sorted(BUILTIN_DIR.glob("*.safetensors"))}


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A built-in model name or a file path -> the file's path."""
    s = str(name_or_path)
    builtins = builtin_models()
    if s in builtins:
        return builtins[s]
    p = Path(s)
    if p.suffix == ".safetensors" or p.exists():
        if not p.is_file():
            raise ModelFileError(f"model file {s!r} does not exist.")
        return p
    raise ModelFileError(
        f"model {s!r} is neither a built-in ({', '.join(builtins) or 'none installed'}) "
        "nor an existing .safetensors file or bioimage.io package (.zip, rdf.yaml) from `pssr export`."
    )


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a built-in model by name (``em``, ``fluo``, ``fluo-mf``) or a model file.

    Raises
    ------
    ModelFileError
        Missing, corrupt or truncated file, or weights that do not match the metadata.
    """
    if str(name_or_path).startswith("bilinear:"):
        # A baseline through the same pipeline, e.g. "bilinear:4" (no file, no weights).
        try:
            cfg = ModelConfig(arch="bilinear", scale=int(str(name_or_path).split(":", 1)[1]))
        except ValueError as e:
            raise ModelFileError(
                f"{name_or_path!r}: give the scale as bilinear:<integer>, e.g. bilinear:4."
            ) from e
        net = build_model(cfg).to(device)
        meta = {"receptive_field": 2, "receptive_field_method": RF_METHOD, "crappifier": None}
        return LoadedModel(net, cfg, meta, str(name_or_path))
    if Path(str(name_or_path)).suffix.lower() in (".zip", ".yaml", ".yml"):
        from pssr.export import load_bioimageio  # a bioimage.io package written by `pssr export`

        return load_bioimageio(name_or_path, device=device)
    path = resolve_model(name_or_path)
    meta = read_metadata(path)
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{str(path)!r} has an invalid model config: {e}") from e
    net = build_model(config)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"cannot read weights of {str(path)!r} ({e}); the file is corrupt.") from e
    missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
    if missing or unexpected:
        raise ModelFileError(
            f"weights in {str(path)!r} do not match its {config.arch} config: "
            f"{len(missing)} missing (e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {sorted(unexpected)[:2]})."
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"weights in {str(path)!r} have the wrong shapes for its config: {e}") from e
    net.eval().to(device)
    return LoadedModel(net, config, meta, str(path))
