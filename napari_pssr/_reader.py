"""Open OME-Zarr images (0.4 and 0.5) as napari layers: the pyramid, physical scale and translation.

napari's built-in reader opens an OME-Zarr as a plain array with scale 1, and napari-ome-zarr
(0.10) keeps the scale but drops the translation; a restored output then no longer overlays
its input.  This reader applies every ``scale`` and ``translation`` of the first multiscale
image (its level 0 and the multiscale-level transformations), like the Restore widget does.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

__all__ = ["get_reader", "ome_zarr_layer_data"]


def _multiscales(path: str | Path):
    """``(group, multiscales[0])`` of an OME-Zarr image group, or None for anything else."""
    import zarr

    from pssr.io.formats import ome_zarr_metadata

    p = Path(path)
    if not p.is_dir():
        return None
    try:
        group = zarr.open_group(str(p), mode="r")
    except Exception:  # not a zarr group: another reader's business
        return None
    ms = ome_zarr_metadata(group)
    if not ms or not ms.get("datasets"):
        return None
    return group, ms


def ome_zarr_layer_data(path: str | Path) -> list[tuple[Any, dict[str, Any], str]]:
    """Layer data of an OME-Zarr image: lazy pyramid levels with scale, translate, names, units."""
    import dask.array as da

    from pssr.io.formats import PssrIOError, check_calibration, check_complete, ngff_transforms

    check_complete(path)  # an interrupted pssr output is refused, naming its status and how to finish it
    found = _multiscales(path)
    if found is None:
        raise ValueError(f"{str(path)!r} is not an OME-Zarr image group (no 'multiscales' metadata).")
    group, ms = found
    where = f"OME-Zarr {str(path)!r}"
    missing = [ds.get("path") for ds in ms["datasets"] if str(ds.get("path")) not in group]
    if missing:
        raise PssrIOError(
            f"{where} lists datasets {missing} that it does not contain; its metadata is wrong."
        )
    levels = [da.from_zarr(group[str(ds["path"])]) for ds in ms["datasets"]]
    ndim = levels[0].ndim
    axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])] or [
        {"name": n} for n in "tczyx"[-ndim:]
    ]
    # Level 0's transformations, then the multiscale's own (pssr.io.formats reads an input the same way).
    scale, translate = ngff_transforms(
        ms["datasets"][0].get("coordinateTransformations", []), ndim, where=where
    )
    scale, translate = ngff_transforms(
        ms.get("coordinateTransformations", []), ndim, scale, translate, where=where
    )
    labels = [str(a.get("name", i)) for i, a in enumerate(axes)]
    check_calibration(
        where, dict(zip(labels, scale, strict=False)), dict(zip(labels, translate, strict=False))
    )
    kwargs: dict[str, Any] = {
        "name": ms.get("name") or Path(str(path)).name.split(".")[0],
        "multiscale": len(levels) > 1,
        "scale": tuple(scale),
        "translate": tuple(translate),
    }
    names = [str(a.get("name", "")) for a in axes]
    units = [a.get("unit") for a in axes]
    channel = next((i for i, a in enumerate(axes) if a.get("type") == "channel"), None)
    if channel is not None:  # one layer per channel: drop that axis from the per-axis values
        kwargs["channel_axis"] = channel
        for key in ("scale", "translate"):
            kwargs[key] = tuple(v for i, v in enumerate(kwargs[key]) if i != channel)
        names = [n for i, n in enumerate(names) if i != channel]
        units = [u for i, u in enumerate(units) if i != channel]
    params = inspect.signature(_image_layer_class()).parameters  # napari >= 0.6 knows these
    if "axis_labels" in params and all(names):
        kwargs["axis_labels"] = tuple(names)
    if "units" in params and any(units):
        kwargs["units"] = tuple(u or "pixel" for u in units)
    data = levels if len(levels) > 1 else levels[0]
    return [(data, kwargs, "image")]


def _image_layer_class():
    from napari.layers import Image

    return Image


def get_reader(path: str | list[str]):
    """npe2 reader: ours for OME-Zarr image groups, None for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return ome_zarr_layer_data if _multiscales(path) is not None or _unfinished(path) else None


def _unfinished(path: str | Path) -> bool:
    """An interrupted pssr output (also one of its arrays): ours, to refuse it with the reason."""
    from pssr.io.formats import PssrIOError, check_complete

    if not Path(path).is_dir():
        return False
    try:
        check_complete(path)
    except PssrIOError:
        return True
    return False
