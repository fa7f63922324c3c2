"""Images in and out: formats, axes and calibration.

Owns reading and writing TIFF / OME-TIFF / PNG / zarr v3 / OME-Zarr with their axes, pixel size,
origin and time calibration (:mod:`pssr.io.formats`), and atomic writes; N5, Neuroglancer
precomputed and HDF5 volumes (:mod:`pssr.io.volumes`) and inputs on object storage or HTTP
(:mod:`pssr.io.remote`).  May import
:mod:`pssr.errors` and :mod:`pssr.util` only: nothing of degradation, networks, restoration or
training.  ``pssr.io.read_image`` and friends are re-exported here.
"""

from pssr.io.formats import (
    Image,
    PssrIOError,
    check_calibration,
    check_output_path,
    local_file,
    ngff_transforms,
    ome_zarr_metadata,
    read_image,
    resolve_source,
    source_stamp,
    write_image,
    write_ome_zarr,
    write_tiff,
)

__all__ = [
    "Image",
    "PssrIOError",
    "check_calibration",
    "check_output_path",
    "local_file",
    "ngff_transforms",
    "ome_zarr_metadata",
    "read_image",
    "resolve_source",
    "source_stamp",
    "write_image",
    "write_ome_zarr",
    "write_tiff",
]
