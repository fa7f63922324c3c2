"""bioimage.io model packages: ``pssr export`` writes them, ``pssr predict`` reads them back.

A package written by :func:`export_bioimageio` is a zip file that any bioimage.io consumer
(bioimageio.core, deepImageJ, ilastik, ...) can run without pssr:

- ``weights.pt`` (``pytorch_state_dict``) with ``pssr_model.py`` as the architecture source:
  the verbatim source of :mod:`pssr.nn.model` (it needs only torch) plus a ``pssr_network(**config)``
  factory, so consumers rebuild the exact network that was trained, without installing pssr;
- ``weights.torchscript.pt`` (``torchscript``, traced on an input size the package declares
  valid and checked against the eager network at two sizes);
- ``weights.onnx`` (``onnx``, the graph pssr's CPU backend runs, :mod:`pssr.nn.onnx_backend`,
  checked against torch; left out with a warning where the ``onnx`` extra is not installed);
- one input ``raw`` (batch, channel = input frames, y, x) with sizes ``min + n * step``, the
  percentile normalisation recorded in the model (``scale_range``, jointly over frames, y and
  x), and one output ``restored`` whose y/x sizes are ``scale`` times the input's (axis
  scales ``scale`` and 1) with a halo of the model's receptive field (in output pixels) and
  ``pad: reflect``, pssr's border rule (:func:`pssr.blockwise.plan.pad_block`);
- a real test input and the output expected from it (also as TIFF sample tensors), a
  before/after cover, the model card as documentation (with a section on using the package
  outside pssr), citations, licence, authors and repository from pssr's project metadata, and
  a description within the spec's 512 characters;
- the pssr model file itself (``<name>.safetensors``, an attachment), which is what
  :func:`load_bioimageio` reads: pssr never unpickles the package's torch files.

The restored values are in the input's normalised units (0 = its 1st percentile, 1 = its
99.8th, as recorded in the model): the spec's processing steps cannot map them back (the card
says why); ``pssr predict --model PACKAGE`` maps them back to the input's units exactly as it
does for the model file.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pssr import __version__
from pssr.errors import BioimageioError
from pssr.nn import model as model_module
from pssr.nn.modelfile import LoadedModel, load_model
from pssr.nn.normalization import BORDER, percentile_norm
from pssr.nn.package import FAMILY, FAMILY_VERSION, is_package_path, spec_module
from pssr.util import check_folder

logger = logging.getLogger(__name__)

__all__ = ["BioimageioError", "export_bioimageio", "is_package_path", "load_bioimageio", "project_metadata"]

INPUT_ID = "raw"
OUTPUT_ID = "restored"
ARCH_FILE = "pssr_model.py"
ARCH_CALLABLE = "pssr_network"
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "data"
EPS = 1e-6  # scale_range's eps (the smallest the spec allows is > 0; pssr itself uses none)
FILES = {
    "test_input": "test_input.npy",
    "test_output": "test_output.npy",
    "cover": "cover.png",
    "weights": "weights.pt",
    "torchscript": "weights.torchscript.pt",
    "architecture": ARCH_FILE,
    "sample_input": "sample_input.tif",
    "sample_output": "sample_output.tif",
}
ONNX_FILE = "weights.onnx"
DISTRIBUTION = "pssr-toolkit"
DESCRIPTION_MAX = 512  # characters: the bioimage.io spec's limit on a model's description
PSSR_PAPER = (
    "Fang L, Monroe F, Novak SW, et al. Deep learning-based point-scanning super-resolution "
    "imaging. Nat Methods 18, 406-416 (2021)."
)
PSSR_DOI = "10.1038/s41592-021-01080-z"
# Sources of the bundled test inputs (data/BIOIMAGEIO_SAMPLES.md) and the built-in models' training
# data (../shared/data/SOURCES.md): key found in a data path -> (citation, doi, url).
DATA_CITATIONS: dict[str, tuple[str, str | None, str | None]] = {
    "isbi": (
        "Cardona A, et al. An integrated micro- and macroarchitectural analysis of the Drosophila brain "
        "by computer-assisted serial section electron microscopy. PLoS Biol 8:e1000502 (2010); ISBI 2012 "
        "EM segmentation challenge data.",
        "10.1371/journal.pbio.1000502",
        None,
    ),
    "epfl": (
        "Lucchi A, et al. Supervoxel-based segmentation of mitochondria in EM image stacks with learned "
        "shape features. IEEE Trans Med Imaging 31:474-486 (2012); EPFL FIB-SEM hippocampus data.",
        "10.1109/TMI.2011.2171705",
        None,
    ),
    "bpae": (
        "BPAE cells (widefield fluorescence), CC-BY 4.0, from haesleinhuepf/BioImageAnalysisNotebooks.",
        None,
        "https://github.com/haesleinhuepf/BioImageAnalysisNotebooks",
    ),
    "aics": (
        "Allen Institute for Cell Science hiPSC images, BBBC034; Ljosa V, Sokolnicki KL, Carpenter AE. "
        "Annotated high-throughput microscopy image sets for validation. Nat Methods 9:637 (2012).",
        "10.1038/nmeth.2083",
        None,
    ),
    "mitocheck": (
        "MitoCheck HeLa nuclei timelapse, CC-BY 4.0, from NEUBIAS training-resources.",
        None,
        "https://github.com/NEUBIAS/training-resources",
    ),
    "golgi": (
        "Golgi / brefeldin-A timelapse, CC-BY 4.0, from NEUBIAS training-resources.",
        None,
        "https://github.com/NEUBIAS/training-resources",
    ),
}
# The bundled test inputs (data/BIOIMAGEIO_SAMPLES.md) and the data they were cut from.
SAMPLE_SOURCES = {"em": "epfl", "fluo": "bpae", "fluo-mf": "golgi"}


# ------------------------------------------------------------------------------- export
def _bundled_sample(lm: LoadedModel) -> tuple[np.ndarray, str, str]:
    """The bundled test input that suits the model (by modality and frames)."""
    import tifffile

    crap = lm.crappifier
    kind = "fluo" if crap is not None and "fluo" in crap.kind else "em"
    if lm.frames > 1:
        if kind == "em":
            raise BioimageioError(
                f"the model takes {lm.frames} EM sections but pssr bundles no EM stack to use as the "
                "package's test input (the bundled multi-frame sample is a fluorescence timelapse); give "
                "one with --test-input (sections, y, x), e.g. a few consecutive sections of your volume."
            )
        kind = "fluo-mf"
    path = SAMPLES_DIR / f"bioimageio_test_{kind}.tif"
    data = np.asarray(tifffile.imread(path), np.float32)
    if lm.frames > 1:
        if data.shape[0] < lm.frames:
            raise BioimageioError(
                f"the bundled multi-frame sample has {data.shape[0]} frames but the model takes "
                f"{lm.frames}; give a test input with --test-input (frames, y, x)."
            )
        c = data.shape[0] // 2
        data = data[c - lm.frames // 2 : c + lm.frames // 2 + 1]
    return data, path.name, SAMPLE_SOURCES[kind]


def _input_size(lm: LoadedModel) -> tuple[int, int]:
    """``(min, step)`` of valid input y/x sizes: room for the halo on both sides, no padding."""
    m = lm.config.multiple
    # The spec requires min * s - 2 * halo * s >= 1 (the output halo leaves something).
    need = 2 * lm.halo + 1
    return -(-need // m) * m, m


def _prepare_test_input(lm: LoadedModel, test_input: Any) -> tuple[np.ndarray, str, str | None]:
    """A ``(frames, y, x)`` float32 test input cropped (centred) to a valid size, its label, source."""
    source = None
    if test_input is None:
        data, label, source = _bundled_sample(lm)
    elif isinstance(test_input, (str, os.PathLike)):
        from pssr.io import formats as io

        data = np.asarray(io.read_image(test_input, lazy=False).data, np.float32)
        label = Path(test_input).name
    else:
        data, label = np.asarray(test_input, np.float32), "array"
    if data.ndim == 2:
        data = data[None]
    if data.ndim == 3 and data.shape[0] > lm.frames:  # a stack or timelapse: its centre plane(s)
        c = data.shape[0] // 2
        data = data[c - lm.frames // 2 : c + lm.frames // 2 + 1]
    if data.ndim != 3 or data.shape[0] != lm.frames:
        raise BioimageioError(
            f"test input {label} has shape {data.shape}; this model takes {lm.frames} frame(s): give "
            + (
                "a 2D image or a stack."
                if lm.frames == 1
                else f"a (frames, y, x) timelapse of >= {lm.frames}."
            )
        )
    if not np.isfinite(data).all():
        raise BioimageioError(f"test input {label} contains NaN or infinite values; use another image.")
    mn, step = _input_size(lm)
    crop = []
    for n in data.shape[1:]:
        if n < mn:
            raise BioimageioError(
                f"test input {label} is {data.shape[1]}x{data.shape[2]} pixels; the package needs at "
                f"least {mn}x{mn} (twice the model's halo of {lm.halo} px plus one, rounded up to "
                f"a multiple of {step}); give a larger image with --test-input."
            )
        crop.append(mn + (n - mn) // step * step)
    y0, x0 = (data.shape[1] - crop[0]) // 2, (data.shape[2] - crop[1]) // 2
    return np.ascontiguousarray(data[:, y0 : y0 + crop[0], x0 : x0 + crop[1]]), label, source


def _normalise_like_bioimageio(x: np.ndarray, lm: LoadedModel, eps: float) -> np.ndarray:
    """The package's preprocessing: ``scale_range`` over frames, y and x (``eps`` as written)."""
    lo, hi = (
        float(v)
        for v in np.percentile(x, [lm.normalization.pmin, lm.normalization.pmax])  # same as core
    )
    return ((x - lo) / (hi - lo + eps)).astype(np.float32)


def project_metadata() -> dict[str, Any]:
    """The authors and repository of pssr, as its project metadata states them.

    From ``pyproject.toml`` in a source checkout (what the project declares now), else from the
    installed distribution's metadata.  ``{"authors": [names], "git_repo": url or None}``; the
    repository is the ``Repository`` (else ``Source``, else ``Homepage``) project URL.
    """
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    project: dict[str, Any] = {}
    if pyproject.is_file():
        import tomllib

        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    if project.get("name") == DISTRIBUTION:
        authors = [str(a["name"]) for a in project.get("authors", []) if a.get("name")]
        urls = {str(k).lower(): str(v) for k, v in project.get("urls", {}).items()}
    else:
        from importlib.metadata import PackageNotFoundError, metadata

        try:
            md = metadata(DISTRIBUTION)
        except PackageNotFoundError:
            return {"authors": [], "git_repo": None}
        authors = [a for a in md.get_all("Author") or [] if a]
        authors += [e.split("<")[0].strip() for e in md.get_all("Author-email") or [] if "<" in e]
        urls = {}
        for u in md.get_all("Project-URL") or []:
            k, _, v = u.partition(",")
            urls[k.strip().lower()] = v.strip()
    repo = next((urls[k] for k in ("repository", "source", "homepage") if urls.get(k)), None)
    return {"authors": authors, "git_repo": repo}


def _description(lm: LoadedModel, em: bool, label: str) -> str:
    """The package's description: what it restores, from what, in which units (at most 512 chars)."""
    norm = lm.normalization
    head = (
        f"Point-scanning super-resolution (PSSR, Fang et al. 2021): restores {lm.scale}x undersampled, "
        f"noisy {'EM' if em else 'fluorescence'} images ({lm.frames} frame(s) in, one out)."
    )
    tail = (
        f"Output in the input's {norm.pmin}/{norm.pmax}-percentile-normalised units (the card says why "
        f"and how to map back). Test input: {label}."
    )
    n = len(lm.meta.get("training", {}).get("data", []))
    crap = lm.crappifier
    how = f"pairs degraded by the crappifier {crap.kind}" if crap is not None else "real pairs"
    short = f"Trained on {n} image source(s) (listed on the card), {how}."
    for middle in (_training_summary(lm), short, f"Trained on {how}.", ""):
        text = " ".join(p for p in (head, middle, tail) if p)
        if len(text) <= DESCRIPTION_MAX:
            return text
    return text[: DESCRIPTION_MAX - 3] + "..."


def _architecture_source() -> str:
    """:mod:`pssr.nn.model` verbatim plus the factory the package names as its architecture."""
    src = inspect.getsource(model_module)
    return (
        f"# Architecture of a pssr model, written by `pssr export` (pssr {__version__}): the source of\n"
        "# pssr/model.py unchanged, plus `pssr_network(**config)` at the end. Needs only torch.\n"
        + src
        + "\n\n"
        + f"def {ARCH_CALLABLE}(**config):\n"
        + '    """The network for a saved ``ModelConfig`` (the package\'s architecture kwargs)."""\n'
        + "    return build_model(ModelConfig.from_dict(config))\n"
    )


def _trace(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, m: int) -> torch.jit.ScriptModule:
    """TorchScript by tracing on ``x`` (whose output is ``y``), checked at a second valid size."""
    with warnings.catch_warnings():
        # Tracing is deprecated in recent torch and warns about the padding branch, which is
        # never taken for the package's valid sizes (multiples of the model's size step m); the
        # trace is checked against the eager network below instead.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, x, check_trace=False)
    other = torch.rand(1, x.shape[1], 9 * m, 10 * m, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t, ref in ((x, y), (other, net(other))):
            got = traced(t)
            if ref.shape != got.shape or not torch.allclose(ref, got, rtol=1e-5, atol=1e-5):
                raise BioimageioError(
                    f"the traced TorchScript network differs from the original on a {tuple(t.shape)} "
                    "input; this architecture cannot be exported as torchscript (please report it)."
                )
    return traced


def _to_png(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def _cover(lr: np.ndarray, hr: np.ndarray, s: int, path: Path, size: int = 256) -> None:
    """Before (nearest-upsampled centre frame) | after (restored), centre crop, 2:1."""
    from PIL import Image as PILImage

    before = np.repeat(np.repeat(lr[lr.shape[0] // 2], s, 0), s, 1)
    n = min(size, hr.shape[0], hr.shape[1])
    y0, x0 = (hr.shape[0] - n) // 2, (hr.shape[1] - n) // 2
    b, a = before[y0 : y0 + n, x0 : x0 + n], hr[y0 : y0 + n, x0 : x0 + n]
    lo, hi = np.percentile(b, [0.5, 99.5])
    hi = hi if hi > lo else lo + 1
    gap = np.full((n, 4), 255, np.uint8)
    PILImage.fromarray(np.concatenate([_to_png(b, lo, hi), gap, _to_png(a, lo, hi)], 1)).save(path)


def _data_citations(meta: dict[str, Any], sample: str | None) -> list[str]:
    """Keys of :data:`DATA_CITATIONS` for the training data and the bundled test input."""
    tr = meta.get("training", {})
    names = " ".join([d.get("path", "") for d in tr.get("data", [])] + list(tr.get("held_out") or []))
    keys = [k for k in DATA_CITATIONS if k in names.lower()]
    if sample and sample not in keys:
        keys.append(sample)
    return keys


def _training_summary(lm: LoadedModel) -> str:
    tr = lm.meta.get("training", {})
    paths = [d["path"] for d in tr.get("data", [])]
    data = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "") or "not recorded"
    crap = lm.crappifier
    how = (
        f"synthetic pairs from the high-resolution data degraded by the crappifier {crap}"
        if crap is not None
        else "real low/high-resolution pairs"
    )
    steps = f"{tr['steps']} steps" if tr.get("steps") else "an unrecorded number of steps"
    return f"Trained on {data} ({how}), {steps}."


def _documentation(lm: LoadedModel, name: str, work: Path) -> tuple[Path, list[Path]]:
    """The model card (docs/models/<name>.md in a source checkout) or one made from metadata."""
    card = Path(__file__).resolve().parents[2] / "docs" / "models" / f"{name}.md"
    doc = work / "README.md"
    extra: list[Path] = []
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        for ref in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text):
            src = card.parent / ref
            if "/" not in ref and src.is_file():  # images beside the card travel with it
                shutil.copy(src, work / ref)
                extra.append(work / ref)
        doc.write_text(text.rstrip("\n") + "\n" + _package_notes(lm), encoding="utf-8")
        return doc, extra
    tr = lm.meta.get("training", {})
    val = lm.meta.get("metrics", {}).get("validation", {})
    lines = [
        f"# pssr model `{name}`",
        "",
        f"{tr.get('modality', 'point-scanning super-resolution')}: a {lm.config.arch} network that "
        f"restores {lm.scale}x undersampled images ({lm.frames} input frame(s)).",
        "",
        "## Training",
        "",
        _training_summary(lm),
    ]
    if val.get("psnr") is not None:
        lines += [
            "",
            f"Validation PSNR {val['psnr']:.2f} dB "
            f"(bilinear {val.get('psnr_bilinear', float('nan')):.2f} dB).",
        ]
    lines += [
        "",
        "## Use",
        "",
        "Super-resolution invents plausible detail where the input does not determine it: check",
        "restorations with `pssr predict --fidelity` and do not count structures smaller than the",
        "input pixel from the output alone.",
    ]
    doc.write_text("\n".join(lines) + "\n" + _package_notes(lm), encoding="utf-8")
    return doc, extra


_BORDER_WORDS = {
    "reflect": "numpy's `reflect`: the image mirrored, the edge pixel not repeated",
    "symmetric": "numpy's `symmetric`: the image mirrored, the edge pixel repeated",
    "edge": "numpy's `edge`: the edge pixels repeated",
}


def _package_notes(lm: LoadedModel) -> str:
    """The card's section on running the package outside pssr: units, edges, whole vs tiled."""
    norm, halo = lm.normalization, lm.halo
    return f"""
## Using this package outside pssr

**Units.** The input is normalised by its own percentiles ({norm.pmin} -> 0, {norm.pmax} -> 1,
over frames, y and x; `scale_range`) and the restored image is returned in those normalised
units, not in the input's.  bioimage.io's processing steps can normalise a tensor by an input's
percentiles, but none maps a tensor back with them (`scale_range` on the output normalises it
again; `scale_mean_variance` matches means and variances, which a restoration does not keep), so
the package cannot give the input's units itself.  To get them, compute the input's
{norm.pmin} and {norm.pmax} percentiles `p_lo`, `p_hi` and take `p_lo + restored * (p_hi - p_lo)`;
`pssr predict --model <this package>.zip` does exactly that.

**Edges.** pssr restores an image as if it were padded beyond its edges by the model's halo
of {halo} input pixels ({_BORDER_WORDS[BORDER]}); the package declares that halo on its output
({halo * lm.scale} output pixels) and `pad: {BORDER}` on its input, so a consumer that pads and
tiles as the spec says sees the same context at the edges as pssr.

**Whole image or tiled (bioimageio.core 0.11).**  Tiled prediction
(`bioimageio predict --blockwise N ...`, or `bioimageio.core.predict(..., blocksize_parameter=N)`)
computes the percentiles over the image and reproduces `pssr predict` to float precision,
edges included.  Whole-image prediction (`bioimageio predict`'s default) pads the image by the
halo *before* it computes the percentiles, so its normalisation also counts the padded band of
{halo} pixels around the image: the result differs from pssr's by however much that band moves
the percentiles (for images not much larger than the halo, percent of the range).  Prefer tiled
prediction, or compare with `pssr predict`.
"""


def _model_file(lm: LoadedModel, name: str, work: Path) -> Path:
    dst = work / f"{name}.safetensors"
    src = Path(lm.path) if lm.path else None
    if src is not None and src.suffix == ".safetensors" and src.is_file():
        shutil.copyfile(src, dst)  # byte for byte: the metadata keeps its training record
    else:
        from pssr.nn.modelfile import save_model

        save_model(dst, lm.net, lm.config, lm.meta)
    return dst


def export_bioimageio(
    model: str | os.PathLike | LoadedModel,
    out: str | os.PathLike,
    *,
    test_input: Any = None,
    name: str | None = None,
    authors: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a pssr model as a bioimage.io model package (spec 0.5).

    Parameters
    ----------
    model : str, path or LoadedModel
        A built-in name (``em``, ``fluo``, ``fluo-mf``), a ``.safetensors`` model file or a
        loaded model.
    out : path
        The package to write (``.zip``).
    test_input : path or array, optional
        A low-resolution image (``(y, x)``, or ``(frames, y, x)`` for multi-frame models) for the
        package's test; centre-cropped to a valid size.  Default: the bundled sample for the
        model's modality (see ``pssr/data/BIOIMAGEIO_SAMPLES.md``).
    name : str, optional
        Short model name used in file names and the title (default: the model's own name).
    authors : list of str, optional
        Author names (default: the authors in pssr's project metadata, :func:`project_metadata`).
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    BioimageioError
        A model without weights, a test input that is too small, an existing output, or
        bioimageio.spec missing or rejecting the package.
    """
    spec = spec_module()
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise BioimageioError(f"output {str(out)!r} must end in .zip (a bioimage.io package).")
    if out.exists() and not overwrite:
        raise BioimageioError(f"output {str(out)!r} already exists; choose another path or pass overwrite.")
    check_folder(out, BioimageioError, fix="choose another output")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    if lm.config.arch == "bilinear":
        raise BioimageioError(
            f"model {lm.path!r} is the bilinear baseline and has no weights to export; export a "
            "trained model (a built-in name or a .safetensors file)."
        )
    name = name or lm.meta.get("training", {}).get("name") or Path(str(lm.path or "model")).stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name))
    net = lm.net.float().eval().cpu()
    x, label, source = _prepare_test_input(lm, test_input)
    with tempfile.TemporaryDirectory(prefix="pssr-export-") as tmp:
        work = Path(tmp)
        files = _write_files(lm, net, name, x, work)
        try:
            descr = _describe(lm, name, files, label, source, authors)
        except ValueError as e:  # pydantic's ValidationError: name the first field it rejected
            raise BioimageioError(
                f"bioimageio.spec rejected the package description ({_first_error(e)}); "
                "please report it with the model file."
            ) from e
        tmp_out = out.with_name(f".{out.name}.partial")
        try:
            spec.save_bioimageio_package(descr, output_path=tmp_out)
            os.replace(tmp_out, out)
        finally:
            tmp_out.unlink(missing_ok=True)
    mn, step = _input_size(lm)
    logger.info(
        "wrote bioimage.io package %s (%s, halo %d px, input sizes %d + n*%d)", out, name, lm.halo, mn, step
    )
    return out


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors) and errors():
        first = errors()[0]
        return f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', '')}"
    return str(e).splitlines()[0]


def _onnx_graph(lm: LoadedModel) -> bytes | None:
    """The network as ONNX (what pssr's CPU backend runs), or None with a warning without the exporter."""
    from pssr.nn import onnx_backend

    if not onnx_backend.available():
        logger.warning(
            "the package gets no ONNX weights: %s not installed (%s)",
            ", ".join(onnx_backend.missing()),
            onnx_backend.INSTALL,
        )
        return None
    try:
        return onnx_backend.OnnxNetwork(lm, cache=Path(tempfile.gettempdir())).graph((0, 0))
    except Exception as e:
        raise BioimageioError(
            f"the model's network could not be exported to ONNX for the package ({e}); please report it "
            "with the model file."
        ) from e


def _onnx_opset(data: bytes) -> int:
    """The default-domain opset an ONNX graph imports."""
    import onnx

    model = onnx.load_from_string(data)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _write_files(lm: LoadedModel, net: torch.nn.Module, name: str, x: np.ndarray, work: Path) -> dict:
    """Everything the package holds besides its description, in ``work``."""
    import tifffile

    s = lm.scale
    _, step = _input_size(lm)
    xt = torch.from_numpy(_normalise_like_bioimageio(x, lm, EPS)[None])
    with torch.no_grad():
        yt = net(xt)
    y = yt.numpy().astype(np.float32)
    files = {k: work / v for k, v in FILES.items()}
    np.save(files["test_input"], x[None])
    np.save(files["test_output"], y)
    lo, hi = percentile_norm(x, lm.normalization)
    _cover(x, y[0, 0] * (hi - lo) + lo, s, files["cover"])
    # Sample tensors (TIFF, which imageio reads; the spec does not take .npy there): the same test
    # input and output, for people and for viewers that show a package's example.
    tifffile.imwrite(files["sample_input"], x if lm.frames > 1 else x[0])
    tifffile.imwrite(files["sample_output"], y[0, 0])
    torch.save({k: v.detach().float().cpu() for k, v in net.state_dict().items()}, files["weights"])
    _trace(net, xt, yt, step).save(str(files["torchscript"]))
    onnx = _onnx_graph(lm)
    if onnx is not None:
        files["onnx"] = work / ONNX_FILE
        files["onnx"].write_bytes(onnx)
    files["architecture"].write_text(_architecture_source(), encoding="utf-8")
    files["model_file"] = _model_file(lm, name, work)
    files["documentation"], files["images"] = _documentation(lm, name, work)
    return files


def _describe(
    lm: LoadedModel, name: str, files: dict, label: str, source: str | None, authors: list[str] | None
):
    """The bioimage.io ``ModelDescr`` (spec 0.5) of the files written by :func:`_write_files`."""
    from bioimageio.spec.model import v0_5 as bm

    s, frames = lm.scale, lm.frames
    crap, tr = lm.crappifier, lm.meta.get("training", {})
    em = "em" in (crap.kind if crap else "") or tr.get("modality", "").upper().startswith("EM")
    raw, restored = _input_descr(bm, lm, files), _output_descr(bm, lm, files)
    weights = _weights_descr(bm, lm, files)
    description = _description(lm, em, label)
    tags = ["super-resolution", "image-restoration", "pssr", "pytorch", "2d", "unet"]
    tags.append("electron-microscopy" if em else "fluorescence-light-microscopy")
    if frames > 1:
        tags.append("3d" if lm.meta.get("context_axis") == "Z" else "timelapse")
    data_keys = _data_citations(lm.meta, source)
    cites = [bm.CiteEntry(text=PSSR_PAPER, doi=bm.Doi(PSSR_DOI))]
    for key in data_keys:
        text, doi, url = DATA_CITATIONS[key]
        cites.append(
            bm.CiteEntry(text=text, doi=bm.Doi(doi) if doi else None, url=bm.HttpUrl(url) if url else None)
        )
    config = {"pssr": _pssr_config(lm, files, label, data_keys)}
    project = project_metadata()
    repo = project["git_repo"]
    return bm.ModelDescr(
        name=f"pssr {name} {s}x super-resolution",
        description=description,
        authors=[bm.Author(name=a) for a in (authors or project["authors"])],
        git_repo=bm.HttpUrl(repo) if repo else None,
        cite=cites,
        license=bm.LicenseId("BSD-3-Clause"),
        documentation=bm.FileDescr(source=files["documentation"]),
        covers=[bm.FileDescr(source=files["cover"])],
        attachments=[bm.FileDescr(source=p) for p in [files["model_file"], *files["images"]]],
        tags=tags,
        inputs=[raw],
        outputs=[restored],
        weights=weights,
        config=config,
        version="1.0",
    )


def _input_descr(bm, lm: LoadedModel, files: dict):
    """The input tensor: frames as channels, y/x at the input's pixel size, percentile normalisation."""
    s, frames, norm = lm.scale, lm.frames, lm.normalization
    mn, step = _input_size(lm)
    k = frames // 2
    a = "z" if lm.meta.get("context_axis") == "Z" else "t"  # sections or time points
    channel_names = ["raw"] if frames == 1 else [_frame_name(i - k, a) for i in range(frames)]
    size = bm.ParameterizedSize(min=mn, step=step)
    return bm.InputTensorDescr(
        id=bm.TensorId(INPUT_ID),
        description=(
            f"{s}x undersampled image; {'sections' if a == 'z' else 'frames'} {a}-{k}..{a}+{k} as channels"
            if frames > 1
            else f"{s}x undersampled image (one plane)"
        ),
        axes=[
            bm.BatchAxis(),
            bm.ChannelAxis(channel_names=[bm.Identifier(c) for c in channel_names]),
            # Axis scales are pixel sizes relative to the output's: output size = s * input size.
            bm.SpaceInputAxis(id=bm.AxisId("y"), size=size, scale=float(s)),
            bm.SpaceInputAxis(id=bm.AxisId("x"), size=size, scale=float(s)),
        ],
        test_tensor=bm.FileDescr(source=files["test_input"]),
        sample_tensor=bm.FileDescr(source=files["sample_input"]),
        data=bm.IntervalOrRatioDataDescr(type="float32"),
        # pssr's border rule (pssr.blockwise.plan.pad_block): beyond the image's edges a block sees
        # the image padded by the halo the output declares, in this mode.
        pad=_padding(bm),
        preprocessing=[
            bm.EnsureDtypeDescr(kwargs=bm.EnsureDtypeKwargs(dtype="float32")),
            bm.ScaleRangeDescr(
                kwargs=bm.ScaleRangeKwargs(
                    axes=[bm.AxisId("channel"), bm.AxisId("y"), bm.AxisId("x")],
                    min_percentile=norm.pmin,
                    max_percentile=norm.pmax,
                    eps=EPS,
                )
            ),
        ],
    )


def _padding(bm):
    """The spec's padding node for pssr's border rule (:data:`BORDER`)."""
    kinds = {"edge": bm.EdgePadding, "reflect": bm.ReflectPadding, "symmetric": bm.SymmetricPadding}
    # The mode is set explicitly: a node holding only defaults is written as `pad: {}`, which
    # bioimageio.spec 0.5.12 reads back as constant (zero) padding.
    return kinds[BORDER](mode=BORDER)


def _output_descr(bm, lm: LoadedModel, files: dict):
    """The output tensor: ``scale`` times the input's size, with the receptive field as halo."""
    s, halo = lm.scale, lm.halo
    out_axes = [
        bm.SpaceOutputAxisWithHalo(
            id=bm.AxisId(a),
            size=bm.SizeReference(tensor_id=bm.TensorId(INPUT_ID), axis_id=bm.AxisId(a)),
            scale=1.0,
            halo=halo * s,  # the receptive field, in output pixels
        )
        for a in ("y", "x")
    ]
    return bm.OutputTensorDescr(
        id=bm.TensorId(OUTPUT_ID),
        description=f"restored image, {s}x smaller pixels, in the input's normalised units",
        axes=[bm.BatchAxis(), bm.ChannelAxis(channel_names=[bm.Identifier("restored")]), *out_axes],
        test_tensor=bm.FileDescr(source=files["test_output"]),
        sample_tensor=bm.FileDescr(source=files["sample_output"]),
        data=bm.IntervalOrRatioDataDescr(type="float32"),
        postprocessing=[bm.EnsureDtypeDescr(kwargs=bm.EnsureDtypeKwargs(dtype="float32"))],
    )


def _weights_descr(bm, lm: LoadedModel, files: dict):
    """State-dict weights with the architecture file, a TorchScript trace and an ONNX export of them."""
    pyver = bm.Version(torch.__version__.split("+")[0])
    return bm.WeightsDescr(
        pytorch_state_dict=bm.PytorchStateDictWeightsDescr(
            source=files["weights"],
            architecture=bm.ArchitectureFromFileDescr(
                source=files["architecture"],
                callable=bm.Identifier(ARCH_CALLABLE),
                kwargs=lm.config.to_dict(),
            ),
            pytorch_version=pyver,
        ),
        torchscript=bm.TorchscriptWeightsDescr(
            source=files["torchscript"],
            pytorch_version=pyver,
            parent="pytorch_state_dict",
            comment="traced from the pytorch_state_dict network",
        ),
        onnx=(
            bm.OnnxWeightsDescr(
                source=files["onnx"],
                opset_version=_onnx_opset(files["onnx"].read_bytes()),
                parent="pytorch_state_dict",
                comment="torch.onnx (dynamo) export, as pssr's CPU backend runs it; checked against torch",
            )
            if "onnx" in files
            else None
        ),
    )


def _pssr_config(lm: LoadedModel, files: dict, label: str, data_keys: list[str]) -> dict:
    """``config.pssr``: what pssr needs to recognise and load its own package."""
    crap, tr = lm.crappifier, lm.meta.get("training", {})
    return {
        "format": FAMILY,
        "format_version": FAMILY_VERSION,
        "model_file": files["model_file"].name,
        "pssr_version": __version__,
        "scale": lm.scale,
        "frames": lm.frames,
        "halo": lm.halo,
        "normalization": lm.normalization.to_dict(),
        "crappifier": crap.to_dict() if crap is not None else None,
        "training_data": [d["path"] for d in tr.get("data", [])],
        "data_citations": data_keys,
        "test_input": label,
    }


# -------------------------------------------------------------------------------- load
def load_bioimageio(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a package written by :func:`export_bioimageio` (``.zip`` or its ``rdf.yaml``).

    The same as ``load_model(path)``: the package is validated with bioimageio.spec (which also
    checks every file's sha256), then the pssr model file it carries is loaded; no pickle is read.

    Raises
    ------
    BioimageioError
        Not a valid bioimage.io model of spec 0.5, or not written by ``pssr export``.
    """
    if not is_package_path(path):
        raise BioimageioError(f"{str(path)!r} is not a bioimage.io package (.zip or rdf.yaml).")
    return load_model(path, device=device)


def _frame_name(offset: int, axis: str = "t") -> str:
    """Channel name of input frame t+offset (identifiers: ``t_minus_2``, ``t``, ``z_plus_1``)."""
    return axis if offset == 0 else f"{axis}_{'plus' if offset > 0 else 'minus'}_{abs(offset)}"
