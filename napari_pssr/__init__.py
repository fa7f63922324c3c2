"""napari plugin for pssr: restore, crappify and train from loaded layers.

``_logic`` turns layers into arrays and back (pure, testable without a viewer), ``_widgets``
holds the magicgui widgets that call the same library functions as the CLI, ``_reader`` opens
pssr's OME-Zarr outputs with their pyramid and calibration, ``_sample`` the bundled sample.
May import the core library (never its CLI); the core never imports this package.
"""

from pssr import __version__

__all__ = ["__version__"]
