"""napari writer: an image layer to OME-Zarr or TIFF through :func:`pssr.io.write_image`.

The same writer as ``pssr predict`` and ``pssr crappify``: the layer's scale and translate become the
file's pixel size and origin (OME-Zarr ``scale``/``translation``, ImageJ calibration in a TIFF), so
the file opens where the layer was.  An existing file is never replaced (pssr's rule for outputs).
"""

from __future__ import annotations

from typing import Any

from napari_pssr import _logic


def write_image_layer(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer (``pssr-toolkit.write_image``); returns the written path."""
    return [str(_logic.write_layer(path, data, attributes))]
