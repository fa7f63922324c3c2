"""napari plugin for pssr: restore, crappify and train from loaded layers."""

from pssr._version import __version__

__all__ = ["__version__"]
