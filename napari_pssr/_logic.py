"""Pure functions behind the widgets: layers <-> arrays and geometry (no Qt, no viewer).

Everything that restores, crappifies or trains is a call into the core ``pssr`` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pssr.errors import WidgetInputError
from pssr.io.geometry import coarser, finer

__all__ = [
    "AS_START",
    "LayerInput",
    "TrainPlan",
    "crappified_geometry",
    "layer_input",
    "restored_geometry",
    "run_crappify",
    "run_restore",
    "start_settings",
    "train_plan",
]

#: Preset choice of the Train widget: the degradation the start model was trained with.
AS_START = "as start model"


@dataclass
class LayerInput:
    """A layer's data as the core sees it."""

    data: Any
    axes: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    name: str


def infer_axes(ndim: int, leading: str = "auto", frames: int = 1) -> str:
    """Axes of an image layer: YX, ZYX or TYX (by ``leading`` or the model), TZYX."""
    if ndim == 2:
        return "YX"
    if ndim == 3:
        if leading == "auto":
            return "TYX" if frames > 1 else "ZYX"
        if leading not in ("Z", "T"):
            raise WidgetInputError(f"leading axis {leading!r} must be 'Z', 'T' or 'auto'.")
        return f"{leading}YX"
    if ndim == 4:
        return "TZYX"
    raise WidgetInputError(
        f"the layer has {ndim} dimensions; pssr restores 2D images, 3D stacks or timelapses "
        "and 4D TZYX data. Slice the layer (e.g. one channel or position) first."
    )


def layer_input(layer: Any, leading: str = "auto", frames: int = 1) -> LayerInput:
    """Validate an image layer and describe its data for the core."""
    if layer is None:
        raise WidgetInputError("choose an image layer first.")
    if getattr(layer, "rgb", False):
        raise WidgetInputError(
            f"layer {layer.name!r} is RGB; pssr restores single-channel grayscale images. "
            "Split the channels (right-click > Split RGB) and restore one."
        )
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    axes = infer_axes(data.ndim, leading, frames)
    dt = np.dtype(data.dtype)
    if dt.kind not in "uif":
        raise WidgetInputError(f"layer {layer.name!r} has dtype {dt}; use a numeric grayscale image.")
    return LayerInput(
        data, axes, tuple(float(s) for s in layer.scale), tuple(float(t) for t in layer.translate), layer.name
    )


def restored_geometry(scale: tuple[float, ...], translate: tuple[float, ...], s: int):
    """Scale and translate that overlay an s-times restored layer exactly on its input.

    Output pixel j is centred on input pixel coordinate ``(j - (s-1)/2) / s``, so in
    world units the Y/X scale is divided by s and the origin moves by
    ``-(s-1)/(2s)`` input pixels.
    """
    sc = list(scale)
    tr = list(translate)
    for i in (-2, -1):
        sc[i], tr[i] = finer(scale[i], translate[i], s)
    return tuple(sc), tuple(tr)


def crappified_geometry(scale: tuple[float, ...], translate: tuple[float, ...], s: int):
    """Inverse of :func:`restored_geometry`: LR pixel i is centred on HR ``i*s + (s-1)/2``."""
    sc = list(scale)
    tr = list(translate)
    for i in (-2, -1):
        sc[i], tr[i] = coarser(scale[i], translate[i], s)
    return tuple(sc), tuple(tr)


def _is_lazy(data: Any) -> bool:
    return not isinstance(data, np.ndarray)


def run_restore(
    inp: LayerInput,
    model: Any,
    *,
    tta: bool = False,
    tile: int | None = None,
    fidelity: bool = False,
    callback=None,
    workdir: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Restore a layer's data; returns layer data + kwargs for the results.

    Lazy (dask/zarr) layers are restored block by block into an OME-Zarr in
    ``workdir`` (a temporary folder by default) and come back as lazy arrays.
    """
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from pssr.blockwise.predict import restore

    out = None
    if _is_lazy(inp.data):
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="pssr-napari-")
            # The restored layer reads this store lazily: keep it for the session, then remove it.
            atexit.register(shutil.rmtree, workdir, ignore_errors=True)
        out = Path(workdir) / f"{inp.name}-restored.ome.zarr"
    res = restore(
        inp.data,
        model=model,
        axes=inp.axes,
        tta=tta,
        tile=tile,
        fidelity=fidelity,
        output=out,
        progress=False,
        callback=callback,
        overwrite=True,
        device=device,
    )
    s = model.scale
    sc, tr = restored_geometry(inp.scale, inp.translate, s)
    layers = [(res.output, {"name": f"{inp.name} restored ({s}x)", "scale": sc, "translate": tr}, "image")]
    if res.fidelity is not None:
        layers.append(
            (
                res.fidelity,
                {
                    "name": f"{inp.name} fidelity (z)",
                    "scale": inp.scale,
                    "translate": inp.translate,
                    "colormap": "bwr",
                    "contrast_limits": (-5, 5),
                    "opacity": 0.6,
                    "blending": "additive",
                },
                "image",
            )
        )
    if res.uncertainty is not None:
        layers.append(
            (
                res.uncertainty,
                {
                    "name": f"{inp.name} uncertainty (TTA std)",
                    "scale": sc,
                    "translate": tr,
                    "colormap": "magma",
                    "visible": False,
                },
                "image",
            )
        )
    return {"layers": layers, "summary": res.summary}


def run_crappify(inp: LayerInput, preset: str, scale: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A low-resolution version of the layer with a preset (in memory)."""
    from pssr.degrade.crappify import get_preset

    data = np.asarray(inp.data)
    lr = get_preset(preset, scale)(data, rng=seed)
    sc, tr = crappified_geometry(inp.scale, inp.translate, scale)
    return lr, {"name": f"{inp.name} crappified ({preset}, {scale}x)", "scale": sc, "translate": tr}


@dataclass
class TrainPlan:
    """What the Train widget hands to :func:`pssr.training.train.train`."""

    model_config: Any
    crappifier: Any
    norm: Any
    init: str | None
    description: dict[str, Any]


def start_settings(ref: str) -> dict[str, Any]:
    """Scale, frames and size of a start model (to show them in the widget), from its metadata."""
    from pssr.nn.model import ModelConfig
    from pssr.nn.modelfile import load_model, read_metadata, resolve_model
    from pssr.nn.package import is_package_path

    if is_package_path(ref):  # a bioimage.io package: its config is inside, read as predict reads it
        cfg = load_model(ref).config
    else:
        cfg = ModelConfig.from_dict(read_metadata(resolve_model(ref))["config"])
    return {"scale": cfg.scale, "frames": cfg.in_channels, "size": cfg.size}


def train_plan(*, start: str | None, preset: str, scale: int, frames: int, size: str) -> TrainPlan:
    """Model config, degradation and parent for training from scratch or fine-tuning.

    ``start`` is ``None`` (from scratch) or a built-in name / model file to fine-tune; then
    the architecture, scale and frames are the start model's (the widget shows them and
    ``scale``, ``frames``, ``size`` are ignored), ``preset`` may be :data:`AS_START`, and
    the same core calls as ``pssr train --init`` record the parent (name or path, sha256).
    """
    from pssr.degrade.crappify import get_preset
    from pssr.training.finetune import model_start

    if start is None:
        if preset == AS_START:
            raise WidgetInputError(
                f"preset {AS_START!r} needs a start model; choose a start model or a preset "
                "(em, fluo, pssr-em, pssr-fluo)."
            )
        mcfg = model_start(None, scale=scale, frames=frames, size=size).config
        return TrainPlan(mcfg, get_preset(preset, scale), None, None, {})
    begin = model_start(start)
    parent, mcfg = begin.parent, begin.config
    if preset == AS_START:
        crap = parent.crappifier
        if crap is None:
            raise WidgetInputError(
                f"start model {start!r} was trained on real pairs and records no degradation; "
                "choose a preset (em, fluo, pssr-em, pssr-fluo)."
            )
    else:
        crap = get_preset(preset, mcfg.scale)
    return TrainPlan(mcfg, crap, parent.normalization, begin.init, begin.description)


def parent_check_note(path: str) -> str | None:
    """What a fine-tune kept (itself or its parent) and why, from its metadata; None from scratch."""
    from pssr.nn.modelfile import read_metadata
    from pssr.training.finetune import check_summary

    training = read_metadata(path).get("training") or {}
    check = training.get("parent_check")
    return check_summary(check, str(training.get("init_from"))) if check else None


def device_choices() -> list[str]:
    """``auto`` first, then the devices this machine has (cpu, each CUDA GPU, mps)."""
    import torch

    from pssr.nn.devices import mps_available

    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if mps_available():
        found.append("mps")
    return found


AXIS_LETTERS = "TZCYX"


def _unit_name(unit: Any) -> str | None:
    """A napari layer unit (pint unit or string) as an OME-NGFF unit name; pixels: None."""
    if unit is None:
        return None
    name = str(unit)
    return None if name in ("", "pixel", "dimensionless") else name


def write_layer(path: str, data: Any, attributes: dict[str, Any]) -> Any:
    """Write one image layer (``data`` and napari's layer ``attributes``) with :func:`write_image`.

    Axes come from the layer's axis labels when they are axis letters (as pssr's reader and the
    OME-Zarr readers label them), else from the number of dimensions (``YX``, ``ZYX``, ``TZYX``);
    scale and translate become the pixel size and the origin of pixel 0, per axis.
    """
    from pssr.io.formats import write_image

    if attributes.get("rgb"):
        raise WidgetInputError(
            f"layer {attributes.get('name')!r} is RGB; pssr writes single-channel grayscale images. "
            "Split the channels (right-click > Split RGB) and save one."
        )
    if attributes.get("multiscale") or isinstance(data, list | tuple):
        data = data[0]  # the full-resolution level; OME-Zarr output gets its own pyramid
    ndim = data.ndim
    labels = [str(a).upper() for a in attributes.get("axis_labels") or ()]
    if len(labels) == ndim and all(a in AXIS_LETTERS for a in labels) and len(set(labels)) == ndim:
        axes = "".join(labels)
    else:
        axes = infer_axes(ndim)
    scale_t = tuple(float(v) for v in attributes.get("scale") or (1.0,) * ndim)
    translate = tuple(float(v) for v in attributes.get("translate") or (0.0,) * ndim)
    units = list(attributes.get("units") or (None,) * ndim)
    spatial = {_unit_name(u) for a, u in zip(axes, units, strict=True) if a in "ZYX"} - {None}
    if len(spatial) > 1:
        raise WidgetInputError(
            f"layer {attributes.get('name')!r} has spatial units {sorted(spatial)}; pssr writes one unit "
            "for Z, Y and X. Set the layer's units to one unit (e.g. micrometer) and save again."
        )
    unit = spatial.pop() if spatial else None
    time_units = {_unit_name(u) for a, u in zip(axes, units, strict=True) if a == "T"} - {None}
    calibrated = unit is not None or any(s != 1.0 for a, s in zip(axes, scale_t, strict=True) if a != "C")
    scale = {a: s for a, s in zip(axes, scale_t, strict=True) if a != "C"} if calibrated else None
    origin = {a: t for a, t in zip(axes, translate, strict=True) if a != "C" and t != 0.0} or None
    return write_image(
        path,
        data,
        axes=axes,
        scale=scale,
        unit=unit,
        origin=origin,
        time_unit=time_units.pop() if time_units else None,
    )
