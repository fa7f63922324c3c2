"""The one OME-Zarr (NGFF 0.5) image writer of pssr: levels and their metadata.

Both :func:`pssr.io.write_ome_zarr` (crappified images, anything written whole) and the
restoration engine's work store (:mod:`pssr.blockwise.store`, written block by block) create
their pyramid levels with :func:`create_levels` (the 2x2 mean of :mod:`pssr.io.pyramid`) and
their ``ome`` attributes with :func:`image_attrs`: one scale and one translation per level, by
the pixel-centre rule of :mod:`pssr.io.geometry`, validated by ome-zarr-models (the spec's
models).
"""

from __future__ import annotations

from typing import Any

import zarr

from pssr.io import pyramid
from pssr.io.geometry import coarser

__all__ = ["axis_meta", "create_levels", "image_attrs"]


def axis_meta(a: str, unit: str | None, time_unit: str | None = None) -> dict[str, str]:
    """One NGFF axis: its name, type and unit (space axes take ``unit``, time ``time_unit``)."""
    kind = {"T": "time", "C": "channel"}.get(a, "space")
    d = {"name": a.lower(), "type": kind}
    if unit and kind == "space":
        d["unit"] = unit
    if time_unit and kind == "time":
        d["unit"] = time_unit
    return d


def create_levels(g: zarr.Group, axes: str, base: str = "s0", **rule: int) -> list[Any]:
    """Pyramid levels 1.. beside ``base`` (same chunk shape, cropped to each level); existing ones kept.

    Their shapes are :func:`pssr.io.pyramid.level_shapes` (``rule``: its ``min_side``, ``max_levels``).
    """
    arr = g[base]
    out = []
    shapes = pyramid.level_shapes(tuple(arr.shape), **rule)
    for k, shape in enumerate(shapes):
        if k == 0:
            continue
        name = f"s{k}"
        if name in g and tuple(g[name].shape) == tuple(shape):
            out.append(g[name])
            continue
        out.append(
            g.create_array(
                name,
                shape=shape,
                dtype=arr.dtype,
                chunks=tuple(min(c, n) for c, n in zip(arr.chunks, shape, strict=True)),
                fill_value=arr.fill_value,
                dimension_names=list(axes.lower()),
                overwrite=True,
            )
        )
    return out


def image_attrs(
    axes: str,
    scale: dict[str, float],
    origin: dict[str, float],
    n_levels: int,
    *,
    unit: str | None = None,
    time_unit: str | None = None,
    name: str = "image",
) -> dict[str, Any]:
    """The ``ome`` attributes of an image of ``n_levels`` YX-halved levels.

    ``scale`` and ``origin`` (the centre of pixel 0) are level 0's per axis; level ``k`` is
    ``2**k`` times coarser along Y and X, its pixel 0 centred where its 2x2 parents' centres meet.
    """
    from ome_zarr_models.v05.image import ImageAttrs

    datasets = []
    for k in range(n_levels):
        f = 2**k
        datasets.append(
            {
                "path": f"s{k}",
                "coordinateTransformations": [
                    {"type": "scale", "scale": [scale[a] * (f if a in "XY" else 1) for a in axes]},
                    {
                        "type": "translation",
                        "translation": [
                            coarser(scale[a], origin[a], f)[1] if a in "XY" else origin[a] for a in axes
                        ],
                    },
                ],
            }
        )
    attrs = ImageAttrs.model_validate(
        {
            "version": "0.5",
            "multiscales": [
                {"axes": [axis_meta(a, unit, time_unit) for a in axes], "datasets": datasets, "name": name}
            ],
        }
    )
    return attrs.model_dump(mode="json", exclude_none=True)
