"""The ``pssr`` command line: parse, validate, call the core, report.

Errors are printed as one line (``pssr: error: ...``) with a non-zero exit; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

from pssr import __version__
from pssr.degrade.crappify import PRESETS
from pssr.errors import CliError, PssrError
from pssr.io.geometry import coarser

logger = logging.getLogger("pssr")


# ------------------------------------------------------------------------------ commands
def cmd_crappify(args: argparse.Namespace) -> int:
    """``pssr crappify``: write a synthetic low-resolution acquisition of an image."""
    from pssr.blockwise.integrity import check_distinct
    from pssr.degrade import crappify as cr
    from pssr.io import formats as io

    check_distinct([args.input, args.noise_from], [args.output])
    io.check_output_path(args.output, overwrite=args.overwrite)
    img = io.read_image(args.input, axes=args.axes, lazy=False)
    if "C" in img.axes:
        raise CliError(
            f"input has a channel axis (axes {img.axes}, shape {img.shape}); crappify one "
            "channel at a time (split channels first)."
        )
    params = json.loads(args.params) if args.params else {}
    if args.noise_from:
        ref = io.read_image(args.noise_from, lazy=False)
        ref2d = ref.data.reshape((-1,) + ref.shape[-2:])[0]
        fit = cr.estimate_noise(ref2d)
        logger.info("fitted noise from %s: %s", args.noise_from, fit)
        from pssr.cli.commands import warn_units

        warn_units(args.noise_from, fit, img.data)
        fitted = cr.noise_params(args.preset, fit, args.scale)
        params = {**fitted, **params}  # explicit --params win over the fit
    cfg = cr.get_preset(args.preset, args.scale, **params)
    lr = cfg(img.data, rng=args.seed)
    warning = cr.range_warning(img.data, cfg)
    if warning:
        logger.warning(warning)
    # LR pixel j is centred on HR coordinate s*j + (s-1)/2: its size and origin in the input's
    # units (input pixels where the input has no pixel size), so that restoring it overlays the input.
    scale, origin = dict(img.scale), dict(img.origin)
    for a in "YX":
        scale[a], origin[a] = coarser(img.scale.get(a, 1.0), img.origin.get(a, 0.0), args.scale)
    io.write_image(
        args.output, lr, axes=img.axes, scale=scale, unit=img.unit, overwrite=args.overwrite,
        origin=origin, time_unit=img.time_unit,
    )  # fmt: skip
    print(
        f"wrote {args.output}: {img.axes} {tuple(lr.shape)} float32 "
        f"(preset {args.preset}, scale {args.scale}, seed {args.seed})"
    )
    return 0


def cmd_fit_noise(args: argparse.Namespace) -> int:
    """``pssr fit-noise``: estimate Poisson gain and Gaussian sigma of a real image."""
    import numpy as np

    from pssr.degrade import crappify as cr
    from pssr.io import formats as io

    img = io.read_image(args.input, lazy=True)
    first = (0,) * (img.data.ndim - 2)  # the first slice / frame only
    fit = cr.estimate_noise(np.asarray(img.data[first]))
    # strict JSON: no shot noise found is a dose of "inf" (JSON has no Infinity)
    print(json.dumps({k: ("inf" if v == float("inf") else v) for k, v in fit.items()}, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``pssr verify``: check every chunk, checksum and pyramid level of an output."""
    from pssr.blockwise.verify import verify_output

    r = verify_output(args.output, progress=not args.quiet)
    what = f"{r['blocks']} blocks checked against their checksums, " if r["blocks"] else ""
    print(f"ok: {args.output} ({r['kind']}: {what}{r['chunks']} chunks read, {r['levels']} levels)")
    return 0


# ------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all subcommands."""
    p = argparse.ArgumentParser(
        prog="pssr",
        description="Point-scanning super-resolution: crappify, train, restore, evaluate.",
    )
    p.add_argument("--version", action="version", version=f"pssr {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("crappify", help="make a realistic low-resolution version of an image")
    c.add_argument("input", help="TIFF, PNG, zarr or OME-Zarr image")
    c.add_argument("output", help="output .tif or .ome.zarr")
    c.add_argument("--preset", default="em", choices=sorted(PRESETS))
    c.add_argument("--scale", type=int, default=4, help="pixel-size factor (default 4)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--axes", help="override the input axes, e.g. TYX")
    c.add_argument("--params", help="JSON of crappifier parameters, e.g. '{\"dose\": 20}'")
    c.add_argument("--noise-from", help="fit the noise of this real low-resolution image")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    c.set_defaults(func=cmd_crappify)

    f = sub.add_parser("fit-noise", help="estimate Poisson gain / Gaussian sigma of an image")
    f.add_argument("input")
    f.set_defaults(func=cmd_fit_noise)

    v = sub.add_parser(
        "verify", help="check a restored output: every chunk readable, checksums, pyramid, OME-Zarr schema"
    )
    v.add_argument("output", help="a restored .ome.zarr folder or .tif file")
    v.set_defaults(func=cmd_verify)

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


_EXTRA_COMMANDS: list = []


def _register_extra() -> None:
    """Subcommands that need torch live in their own module (imported lazily)."""
    from pssr.cli import commands as _cli_model

    _EXTRA_COMMANDS[:] = _cli_model.REGISTER


#: The range of every numeric option of every subcommand, by argparse dest: (low, low excluded, high).
#: :func:`check_numbers` applies them (and finiteness) to whatever subcommand runs; a numeric option
#: without a rule here is a bug (tests/cli/test_cli.py checks that every one has one).
NUMERIC_RULES: dict[str, tuple[float, bool, float | None]] = {
    "scale": (2, False, 64),
    "seed": (0, False, 2**32 - 1),
    "tile": (1, False, None),
    "empty_threshold": (0, False, 1),
    "workers": (1, False, None),
    "jitter": (1, False, None),
    "frames": (1, False, None),
    "steps": (1, False, None),
    "minutes": (0, True, None),
    "patch": (1, False, None),
    "batch": (1, False, None),
    "learning_rate": (0, True, None),
    "feature_weight": (0, False, None),
    "style_weight": (0, False, None),
    "critic_steps": (0, False, None),
    "gan_steps": (0, False, None),
    "adv_weight": (0, False, None),
    "critic_lr": (0, True, None),
    "gan_lr": (0, True, None),
    "val_every": (1, False, None),
    "ckpt_every": (1, False, None),
    "loader_workers": (0, False, None),
}


def numeric_actions(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options of a subcommand that take a number."""
    return [a for a in sub._actions if a.type in (int, float)]


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every numeric option given to the subcommand that runs is finite and in its range.

    Raises :class:`CliError` with one line naming the option, its value and the rule.
    """
    sub = next(
        (a.choices.get(args.command) for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
        None,
    )
    for action in numeric_actions(sub) if sub is not None else []:
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        lo, strict, hi = NUMERIC_RULES.get(action.dest, (float("-inf"), False, None))
        kind = "an integer" if action.type is int else "a finite number"
        rng = (f"> {lo:g}" if strict else f">= {lo:g}") + (f" and <= {hi:.10g}" if hi is not None else "")
        ok = math.isfinite(value) and (value > lo if strict else value >= lo) and (hi is None or value <= hi)
        if not ok:
            raise CliError(f"{flag} {value!r}: must be {kind} {rng}; give a value in that range.")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pssr`` command."""
    _register_extra()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("distributed", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.command:
        parser.print_help()
        return 1
    try:
        check_numbers(parser, args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        print("pssr: interrupted", file=sys.stderr)
        _print_notes(e)
        return 130
    except Exception as e:
        if not _user_fixable(e):
            if args.debug:
                raise
            print(
                f"pssr: internal error: {type(e).__name__}: {e} (rerun with --debug for the "
                "traceback and please report it)",
                file=sys.stderr,
            )
            return 3
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"pssr: error: {msg}", file=sys.stderr)
        _print_notes(e)
        return 2


def _user_fixable(e: BaseException) -> bool:
    """Pssr's error family, a file system refusal (unreadable, full disk) or torch out of memory.

    Anything else (a ``ValueError`` or ``RuntimeError`` from deep inside a library included) is a
    bug of pssr's: it should have been turned into a :class:`PssrError` naming the fix.
    """
    if isinstance(e, PssrError | OSError):
        return True
    return type(e).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError, without importing torch


def _print_notes(e: BaseException) -> None:
    """What the core added to an error (e.g. where partial work was kept and how to resume)."""
    for note in getattr(e, "__notes__", []):
        print(f"pssr: {note}", file=sys.stderr)
