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

from pssr import __version__
from pssr.degrade.crappify import CrappifierConfig
from pssr.errors import ModelFileError
from pssr.nn.model import ModelConfig, build_model, receptive_radius
from pssr.nn.normalization import Normalization
from pssr.nn.package import is_package_path, open_package
from pssr.util import check_folder

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "builtin_models", "load_model", "save_model", "resolve_model"]

FORMAT = "pssr-model"
FORMAT_VERSION = 1
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "models"
RF_METHOD = "structural"  # see pssr.nn.model.receptive_radius


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


def atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    """Write safetensors with metadata to a hidden sibling, then rename onto ``path`` (no partial file)."""
    path = Path(path)
    check_folder(path, ModelFileError, fix="choose another --out")
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

    Examples
    --------
    >>> lm = load_model("bilinear:4")
    >>> save_model("baseline.safetensors", lm.net, lm.config, {"note": "copy"})
    PosixPath('baseline.safetensors')
    >>> load_model("baseline.safetensors").meta["note"]
    'copy'
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
    atomic_save(state, {"pssr": json.dumps(full)}, Path(path))
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``pssr`` metadata of a model file, validated.

    Raises
    ------
    ModelFileError
        Missing or unreadable file, or metadata that is not a JSON object or whose config,
        normalisation, crappifier or receptive field do not parse; the message names the
        file, the bad value, the rule it breaks and the fix.
    """
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
        raise ModelFileError(f"{str(p)!r} has corrupt pssr metadata ({e}); {_FIX}.") from e
    _validate_metadata(meta, p)
    return meta


# Every metadata problem ends with this: a pssr model file is written whole by save_model.
_FIX = "the file is corrupt or its metadata was edited: restore the original file or re-train the model"


def _short(value: Any, limit: int = 120) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 4] + " ..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(p: Path, key: str, value: Any, rule: str) -> ModelFileError:
    return ModelFileError(f"{str(p)!r}: metadata {key!r} is {_short(value)}, but {rule}; {_FIX}.")


def _validate_metadata(meta: Any, p: Path) -> ModelConfig:
    """Check every field that loading or using the model reads; returns the model config."""
    if not isinstance(meta, dict):
        kind = {list: "list", str: "string", type(None): "null", bool: "boolean"}.get(type(meta), "number")
        raise ModelFileError(
            f"{str(p)!r}: its pssr metadata is a JSON {kind} ({_short(meta)}), but it must be a JSON "
            f"object with keys such as 'format', 'config' and 'normalization'; {_FIX}."
        )
    if meta.get("format") != FORMAT:
        raise ModelFileError(
            f"{str(p)!r} is not a pssr model (metadata 'format' is {_short(meta.get('format'))}, "
            f"not {FORMAT!r}); {_FIX}."
        )
    version = meta.get("format_version", 0)
    if not _is_int(version):
        raise _bad(p, "format_version", version, "it must be an integer")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{str(p)!r} uses model format {version}, newer than this pssr "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade pssr."
        )
    config = _model_config(meta, p)
    for key, expected in (("scale", config.scale), ("frames", config.in_channels)):
        if key in meta and (not _is_int(meta[key]) or meta[key] != expected):
            raise _bad(p, key, meta[key], f"its 'config' says {expected}")
    if "normalization" in meta:  # absent in the oldest files: the default then
        _check_normalization(meta["normalization"], p)
    crap = meta.get("crappifier")
    if crap is not None:  # null for models trained on real pairs
        _check_crappifier(crap, config, p)
    ctx = meta.get("context_axis")
    if ctx not in (None, "T", "Z", "T/Z"):  # which axis prediction takes a multi-frame model's frames along
        raise _bad(p, "context_axis", ctx, "it must be 'T' (timelapse), 'Z' (sections), 'T/Z' or absent")
    rf = meta.get("receptive_field")
    if rf is not None and not (_is_int(rf) and rf >= 0):
        raise _bad(p, "receptive_field", rf, "it must be a non-negative integer (LR pixels) or absent")
    meta.setdefault("scale", config.scale)
    meta.setdefault("frames", config.in_channels)
    return config


def _model_config(meta: dict[str, Any], p: Path) -> ModelConfig:
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise _bad(p, "config", cfg, "it must be a JSON object (arch, scale, in_channels, widths, ...)")
    # Check the structural fields' types here: ModelConfig converts them with int(), which
    # would accept 4.7 and reject "abc" with a message that names neither the field nor the file.
    checks = {
        "widths": (
            lambda v: isinstance(v, list) and all(_is_int(w) and w >= 1 for w in v),
            "a list of positive integers",
        ),
        "layers": (
            lambda v: isinstance(v, list) and all(_is_int(n) and n >= 1 for n in v),
            "a list of positive integers",
        ),
        "blocks": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
        "attention": (lambda v: isinstance(v, bool), "true or false"),
        "extra": (lambda v: isinstance(v, dict), "a JSON object"),
    }
    for name, (ok, rule) in checks.items():
        if name in cfg and not ok(cfg[name]):
            raise ModelFileError(
                f"{str(p)!r}: metadata 'config' has {name}={_short(cfg[name])}, but {name} must be {rule}; "
                f"{_FIX}."
            )
    try:
        return ModelConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise _bad(p, "config", cfg, f"it is not a valid model config ({e})") from e


def _check_normalization(value: Any, p: Path) -> None:
    if not isinstance(value, dict):
        raise _bad(
            p,
            "normalization",
            value,
            "it must be a JSON object like {'method': 'percentile', 'pmin': 1.0, 'pmax': 99.8}",
        )
    try:
        norm = Normalization.from_dict(value)
    except KeyError as e:
        raise _bad(p, "normalization", value, f"it has no key {e}") from e
    except (TypeError, ValueError) as e:
        raise _bad(p, "normalization", value, f"it does not parse ({e})") from e
    if not 0 <= norm.pmin < norm.pmax <= 100:  # NaN fails too
        raise _bad(
            p,
            "normalization",
            value,
            f"its percentiles pmin={norm.pmin} and pmax={norm.pmax} must satisfy 0 <= pmin < pmax <= 100",
        )


def _check_crappifier(value: Any, config: ModelConfig, p: Path) -> None:
    if not isinstance(value, dict):
        raise _bad(p, "crappifier", value, "it must be a JSON object (kind, scale, params, jitter) or null")
    # The degradation the network inverts works at the network's scale; checking that first
    # also keeps a huge bogus scale from being tried on a test image below.
    if value.get("scale", 4) != config.scale:
        raise _bad(p, "crappifier", value, f"its scale must be the model's ({config.scale})")
    for key, kind in (
        ("params", "a JSON object of parameter values"),
        ("jitter", "a JSON object of [low, high]"),
    ):
        if not isinstance(value.get(key, {}), dict):
            raise _bad(p, "crappifier", value, f"its {key!r} must be {kind}")
    try:
        CrappifierConfig.from_dict(value)
    except KeyError as e:
        raise _bad(p, "crappifier", value, f"it has no key {e}") from e
    except (TypeError, ValueError, ArithmeticError) as e:
        raise _bad(p, "crappifier", value, f"it does not parse ({e})") from e


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

    Examples
    --------
    >>> lm = load_model("em")
    >>> lm.config.arch, lm.config.scale
    ('srunet', 4)
    >>> load_model("bilinear:2").config.scale  # the baseline, no weights
    2
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
    if is_package_path(name_or_path):  # a bioimage.io package written by `pssr export`
        return _load_package(name_or_path, device)
    path = resolve_model(name_or_path)
    meta = read_metadata(path)
    config = _model_config(meta, path)
    expected = _expected_tensors(config, _header(path), path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"cannot read weights of {str(path)!r} ({e}); the file is corrupt.") from e
    for name in expected:
        t = state[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelFileError(
                f"{str(path)!r}: tensor {name!r} holds {bad} non-finite value(s) (NaN or infinity) of "
                f"{t.numel()}, but weights must be finite (such a network restores every image to NaN); "
                "the training probably diverged: re-train the model (e.g. with a lower --learning-rate) "
                "or use another model file."
            )
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the global RNG alone
        net = build_model(config)
    net.load_state_dict(state, strict=True)
    net.eval().to(device)
    return LoadedModel(net, config, meta, str(path))


def _header(p: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor, from the safetensors header alone (no data read)."""
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"cannot read weights of {str(p)!r} ({e}); the file is corrupt.") from e


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _describe(config: ModelConfig) -> str:
    d = config.to_dict()
    keep = {"srunet": ("widths", "blocks"), "pssr-resunet": ("layers", "attention")}.get(config.arch, ())
    return ", ".join(
        [config.arch, f"scale {config.scale}", f"{config.in_channels} frame(s)"]
        + [f"{k} {d[k]}" for k in keep]
    )


def _expected_tensors(
    config: ModelConfig, header: dict[str, tuple[str, tuple[int, ...]]], p: Path
) -> dict[str, torch.Tensor]:
    """The network's tensors (on the meta device) after checking the file holds exactly them.

    Nothing is allocated: a config whose network would not fit in memory is refused here
    unless the file really holds weights that large.
    """
    # Each block holds at least one tensor; a count beyond the file's cannot match, and a
    # huge one would take forever to build even on the meta device.
    need = {
        "srunet": ("blocks", config.blocks * len(config.widths)),
        "pssr-resunet": ("layers", sum(config.layers)),
    }
    if config.arch in need and need[config.arch][1] > len(header):
        key, n = need[config.arch]
        value = config.blocks if key == "blocks" else list(config.layers)
        raise ModelFileError(
            f"{str(p)!r}: metadata 'config' has {key}={_short(value)}, which needs at least {n} tensors, "
            f"but the file holds {len(header)} tensors; {_FIX}."
        )
    try:
        with torch.device("meta"):
            expected = build_model(config).state_dict()
    except (ValueError, RuntimeError, OverflowError) as e:
        raise ModelFileError(
            f"{str(p)!r}: metadata 'config' ({_describe(config)}) does not describe a network that can "
            f"be built ({e}); {_FIX}."
        ) from e
    missing = [k for k in expected if k not in header]
    unexpected = [k for k in header if k not in expected]
    if missing or unexpected:
        raise ModelFileError(
            f"{str(p)!r}: its tensors do not match its config ({_describe(config)}): "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}); {_FIX}."
        )
    wrong = [k for k, v in expected.items() if header[k][1] != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        raise ModelFileError(
            f"{str(p)!r}: tensor {k!r} has shape {header[k][1]} in the file, but the metadata's config "
            f"({_describe(config)}) needs {tuple(expected[k].shape)}{more}: the weights do not "
            f"match their metadata; {_FIX}."
        )
    for k, v in expected.items():
        if (header[k][0] in _FLOAT_DTYPES) != v.is_floating_point():
            kind = "floating point (" + ", ".join(_FLOAT_DTYPES) + ")" if v.is_floating_point() else "integer"
            raise ModelFileError(
                f"{str(p)!r}: tensor {k!r} is stored as {header[k][0]}, but it must be {kind}; {_FIX}."
            )
    return expected


def _load_package(path: str | os.PathLike, device: str | torch.device) -> LoadedModel:
    """The model file a ``pssr export`` package carries, validated and loaded (never unpickled)."""
    with open_package(path) as pkg:
        lm = load_model(pkg.model_file, device=device)
    pkg.check(lm.scale, lm.frames)
    lm.path = str(pkg.path)
    lm.meta["bioimageio"] = {"format_version": pkg.format_version, "name": pkg.name, "package": str(pkg.path)}
    return lm
