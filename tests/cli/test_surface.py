"""The public face is pinned: ``pssr.__all__``, the lazy entry points and every subcommand and option.

``surface.json`` was taken from the flat layout before the move into subpackages (issue 22); a
change to it is a change of the public API or the CLI, to be made on purpose, never as a side
effect of moving code.
"""

import argparse
import json
from pathlib import Path

import pssr
from pssr.cli.app import _register_extra, build_parser

PINNED = json.loads((Path(__file__).with_name("surface.json")).read_text())
LAZY = ("load_model", "save_model", "restore", "verify_output", "evaluate_model", "train")


def _surface() -> dict:
    _register_extra()
    p = build_parser()
    subs = {}
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                subs[name] = sorted(s for act in sp._actions for s in act.option_strings) + sorted(
                    act.dest for act in sp._actions if not act.option_strings
                )
    return {
        "__all__": sorted(pssr.__all__),
        "lazy": sorted(n for n in LAZY if callable(getattr(pssr, n))),
        "global": sorted(s for a in p._actions for s in a.option_strings),
        "commands": subs,
    }


def test_public_api_and_cli_unchanged():
    assert _surface() == PINNED


def test_lazy_entry_points_are_the_functions_not_the_modules():
    # pssr.train / pssr.restore are functions even after their packages' modules are imported.
    import pssr.blockwise.predict  # noqa: F401
    import pssr.training.train  # noqa: F401

    assert callable(pssr.train) and callable(pssr.restore)
    assert pssr.train.__module__ == "pssr.training.train"
