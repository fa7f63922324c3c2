"""One family of errors for everything a user can fix.

Every error pssr raises on purpose is a :class:`PssrError` (a ``ValueError``), whose message
names the value, the rule and the fix.  The command line prints these as one line and exits
with status 2; anything else is a bug and is reported as an internal error (status 3).
"""

from __future__ import annotations

__all__ = ["BioimageioError", "ModelFileError", "PredictError", "PssrError"]


class PssrError(ValueError):
    """Bad input, model, output or setting; the message says how to fix it."""


class PredictError(PssrError):
    """The data, model or output of a restoration do not fit together; the message says how to fix it."""


class ModelFileError(PssrError):
    """A model file is missing, corrupt, truncated or does not match its metadata (a ``ValueError``)."""


class BioimageioError(ModelFileError):
    """A bioimage.io package that pssr cannot write or read."""
