"""The ``pssr`` command: argparse only.

:mod:`~pssr.cli.app` parses, validates and reports; :mod:`~pssr.cli.commands` turns parsed
arguments into library calls.  May import anything in ``pssr``; nothing in ``pssr`` imports it.
"""

from pssr.cli.app import main

__all__ = ["main"]
