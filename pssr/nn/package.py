"""bioimage.io model packages written by ``pssr export``: their format and how to open one.

Opening a package validates it with bioimage.io's own library (which also checks every file's
sha256) and extracts the pssr model file it carries; :func:`pssr.nn.modelfile.load_model` then
loads that file like any other (no pickle is ever read).  Writing packages is
:mod:`pssr.nn.export`; both depend on this module, which depends on neither.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pssr import __version__
from pssr.errors import BioimageioError

__all__ = ["FAMILY", "FAMILY_VERSION", "SPEC_MAJOR_MINOR", "Package", "is_package_path", "open_package"]

FAMILY = "pssr-bioimageio"
FAMILY_VERSION = 1
SPEC_MAJOR_MINOR = "0.5"
PACKAGE_SUFFIXES = (".zip", ".yaml", ".yml")


def is_package_path(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` names a bioimage.io package (``.zip``) or its ``rdf.yaml``."""
    return Path(str(name_or_path)).suffix.lower() in PACKAGE_SUFFIXES


def spec_module():
    """The bioimageio.spec module (an optional extra), or a clear error naming the install command."""
    try:
        import bioimageio.spec as spec
    except ImportError as e:
        raise BioimageioError(
            "bioimage.io packages need the bioimageio.spec package, which is not installed; "
            "install it with: pip install 'pssr-toolkit[bioimageio]'."
        ) from e
    return spec


def file_name(source: Any) -> str:
    """The file name of a bioimage.io file source (a path, URL or zip member)."""
    s = str(getattr(source, "path", source))
    return s.replace("\\", "/").rsplit("/", 1)[-1]


@dataclass
class Package:
    """An opened pssr package: its model file (extracted, valid while open) and what it declares."""

    path: Path
    model_file: Path
    config: dict[str, Any]
    name: str
    format_version: str

    def check(self, scale: int, frames: int) -> None:
        """The carried model file must be the network ``config.pssr`` describes."""
        if scale != int(self.config.get("scale", scale)) or frames != int(self.config.get("frames", frames)):
            raise BioimageioError(
                f"{str(self.path)!r}: its model file ({scale}x, {frames} frames) does not match config.pssr "
                f"({self.config.get('scale')}x, {self.config.get('frames')} frames); re-export it."
            )


def _check_container(p: Path) -> None:
    """A ``.zip`` must be a complete zip archive with an ``rdf.yaml``; a ``.yaml`` must be UTF-8 text."""
    import zipfile

    if p.suffix.lower() == ".zip":
        why = None
        if not zipfile.is_zipfile(p):
            why = "it is not a zip archive (or it was truncated: its end is missing)"
        else:
            try:
                with zipfile.ZipFile(p) as z:
                    names = {Path(n).name for n in z.namelist()}
                    bad = z.testzip()
                if bad is not None:
                    why = f"its member {bad!r} is corrupt (checksum mismatch)"
                elif not names & {"rdf.yaml", "bioimageio.yaml"}:
                    why = "it holds no rdf.yaml (bioimage.io description)"
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                why = f"it is a damaged zip archive ({e})"
        if why:
            raise BioimageioError(
                f"model package {str(p)!r} cannot be used: {why}; give the .zip written by `pssr export` "
                "(export it again if it was damaged or cut short in a copy)."
            )
    else:
        try:
            import codecs

            with open(p, "rb") as f:
                codecs.getincrementaldecoder("utf-8")().decode(f.read(1 << 20), final=False)
        except UnicodeDecodeError as e:
            raise BioimageioError(
                f"model package description {str(p)!r} is not a text (YAML) file ({e.reason} at byte "
                f"{e.start}); give the rdf.yaml of a package written by `pssr export`, or the .zip."
            ) from None
        except OSError:
            pass


@contextlib.contextmanager
def open_package(path: str | os.PathLike) -> Iterator[Package]:
    """Validate a package written by ``pssr export`` and extract its model file for the block.

    Raises
    ------
    BioimageioError
        Not a valid bioimage.io model of spec 0.5, or not written by ``pssr export``.
    """
    p = Path(path)
    if not p.exists():
        raise BioimageioError(f"bioimage.io package {str(p)!r} does not exist.")
    _check_container(p)
    spec = spec_module()
    try:
        descr = spec.load_description(p, perform_io_checks=True)
    except Exception as e:  # a file bioimageio.spec cannot even parse (not text, not YAML)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BioimageioError(
            f"{str(p)!r} cannot be read as a bioimage.io package ({type(e).__name__}: {first[:200]}); "
            "give a .zip written by `pssr export` (or its unpacked rdf.yaml), re-exporting it if damaged."
        ) from e
    fv = str(getattr(descr, "format_version", "?"))
    typ = getattr(descr, "type", None)
    if isinstance(descr, spec.InvalidDescr) or typ != "model":
        errors = descr.validation_summary.errors if descr.validation_summary is not None else []
        why = f" ({'.'.join(map(str, errors[0].loc))}: {errors[0].msg})" if errors else ""
        raise BioimageioError(
            f"{str(p)!r} is not a valid bioimage.io model (type {typ!r}, format {fv}){why}; pssr "
            "predicts with packages written by `pssr export` only: re-export the model."
        )
    if not fv.startswith(SPEC_MAJOR_MINOR + "."):
        raise BioimageioError(
            f"{str(p)!r} uses bioimage.io model spec {fv}; pssr reads spec {SPEC_MAJOR_MINOR}.x "
            "packages written by `pssr export`: re-export the model with this pssr."
        )
    cfg = descr.config.model_dump().get("pssr")
    if not isinstance(cfg, dict) or cfg.get("format") != FAMILY:
        raise BioimageioError(
            f"{str(p)!r} is a bioimage.io model ({descr.name!r}) but not a pssr export (no "
            "config.pssr); pssr runs only its own models: use bioimageio.core "
            "(`bioimageio predict`) or deepImageJ for other packages."
        )
    if int(cfg.get("format_version", 0)) > FAMILY_VERSION:
        raise BioimageioError(
            f"{str(p)!r} was exported by a newer pssr (package format {cfg['format_version']}, this "
            f"pssr {__version__} reads {FAMILY_VERSION}); upgrade pssr."
        )
    wanted = cfg.get("model_file")
    att = next((a for a in descr.attachments if file_name(a.source) == wanted), None)
    if att is None:
        raise BioimageioError(
            f"{str(p)!r} lacks the pssr model file {wanted!r} named in config.pssr; re-export it "
            "with `pssr export`."
        )
    with tempfile.TemporaryDirectory(prefix="pssr-bioimageio-") as tmp:
        f = Path(tmp) / str(wanted)
        f.write_bytes(att.get_reader().read())
        yield Package(p, f, cfg, str(descr.name), fv)
