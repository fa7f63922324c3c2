"""One family of errors for everything a user can fix.

Every error pssr raises on purpose is a :class:`PssrError` (a ``ValueError``), whose message
names the value, the rule and the fix.  The command line prints these as one line and exits
with status 2; anything else is a bug and is reported as an internal error (status 3).  Every
exception class of pssr lives here; the modules that raise them re-export their old names.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BioimageioError",
    "CliError",
    "DeviceError",
    "IntegrityError",
    "LockedError",
    "ModelFileError",
    "PredictError",
    "PssrError",
    "PssrIOError",
    "PssrTypeError",
    "WidgetInputError",
]


class PssrError(ValueError):
    """Bad input, model, output or setting; the message says how to fix it.

    Examples
    --------
    >>> from pssr.degrade.crappify import get_preset
    >>> try:
    ...     get_preset("confocal")
    ... except PssrError as e:
    ...     print(e)
    preset='confocal' is unknown; use one of ['em', 'fluo', 'pssr-em', 'pssr-fluo'].
    """


class PssrTypeError(PssrError, TypeError):
    """A value of the wrong kind (e.g. a non-integer scale, a non-numeric image)."""


class PssrIOError(PssrError):
    """A file cannot be read or written; the message says why and what to do."""


class PredictError(PssrError):
    """The data, model or output of a restoration do not fit together; the message says how to fix it."""


class IntegrityError(PssrError):
    """An output is incomplete, corrupt or would overwrite an input; the message says how to fix it."""


class LockedError(IntegrityError):
    """Another run holds the output's lock."""


class ModelFileError(PssrError):
    """A model file is missing, corrupt, truncated or does not match its metadata (a ``ValueError``)."""


class BioimageioError(ModelFileError):
    """A bioimage.io package that pssr cannot write or read."""


class DeviceError(PssrError):
    """The requested device or precision is not available here."""


class BackendError(PssrError):
    """The requested inference backend cannot run here, or this model cannot be exported to it."""


class CliError(PssrError):
    """An error of the command line's own options, shown as one line."""


class WidgetInputError(PssrError):
    """A layer or setting the napari plugin cannot take; shown in the viewer, never raised into Qt."""
