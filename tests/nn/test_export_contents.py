"""What an exported bioimage.io package holds: ONNX weights, sample tensors, metadata, the card."""

import dataclasses
import io
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("bioimageio.spec", reason="the [bioimageio] extra is not installed")
# One export of a tiny model (a trace, an ONNX export and bioimageio.spec's validation): over 10 s on
# 2 cores, so the whole module runs in the full suite (CI), not the fast tier.
pytestmark = pytest.mark.slow

from pssr.nn import export as export_module  # noqa: E402
from pssr.nn.export import export_bioimageio, project_metadata  # noqa: E402
from pssr.nn.modelfile import load_model  # noqa: E402
from pssr.nn.normalization import BORDER  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _rdf(pkg: Path) -> dict:
    with zipfile.ZipFile(pkg) as z:
        return yaml.safe_load(z.read("rdf.yaml"))


def _member(pkg: Path, name: str) -> bytes:
    with zipfile.ZipFile(pkg) as z:
        return z.read(name)


@pytest.fixture(scope="module")
def tiny(model_path, em_lr, tmp_path_factory):
    """The tiny test model exported with 40 training sources (a long description to shorten)."""
    lm = load_model(model_path)
    meta = dict(lm.meta)
    paths = [f"/data/some/long/folder/volume_{i:03d}.ome.zarr" for i in range(40)]
    meta["training"] = {"data": [{"path": p} for p in paths]}
    lm = dataclasses.replace(lm, meta=meta)
    pkg = tmp_path_factory.mktemp("pkg") / "tiny.zip"
    return export_bioimageio(lm, pkg, test_input=em_lr[1, :48, :56], name="tiny"), em_lr[1, :48, :56]


def test_package_has_checked_onnx_weights(tiny):
    import onnxruntime as ort

    pkg, _ = tiny
    rdf = _rdf(pkg)
    w = rdf["weights"]["onnx"]
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    assert w["parent"] == "pytorch_state_dict" and w["opset_version"] >= 18
    # the graph runs the test input to the test output (what bioimageio's test checks, here directly)
    sess = ort.InferenceSession(_member(pkg, Path(w["source"]).name), providers=["CPUExecutionProvider"])
    x = np.load(io.BytesIO(_member(pkg, rdf["inputs"][0]["test_tensor"]["source"])))
    want = np.load(io.BytesIO(_member(pkg, rdf["outputs"][0]["test_tensor"]["source"])))
    from pssr.nn.export import EPS

    lo, hi = np.percentile(x, [1, 99.8])
    got = sess.run(None, {sess.get_inputs()[0].name: ((x - lo) / (hi - lo + EPS)).astype(np.float32)})[0]
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * np.ptp(want)


def test_bioimageio_test_passes_for_every_weight_format(tiny):
    from bioimageio.core import test_model

    summary = test_model(tiny[0])
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status != "passed"]
    assert summary.status == "passed", failed
    ran = {d.name for d in summary.details}
    for wf in ("pytorch_state_dict", "torchscript", "onnx"):
        assert f"Reproduce test outputs from test inputs ({wf})" in ran


def test_sample_tensors_are_images_of_the_test_tensors(tiny):
    import imageio.v3 as iio

    pkg, x = tiny
    rdf = _rdf(pkg)
    for t in (rdf["inputs"][0], rdf["outputs"][0]):
        name = t["sample_tensor"]["source"]
        assert name.endswith(".tif")
        img = iio.imread(_member(pkg, name), extension=".tif")
        test = np.load(io.BytesIO(_member(pkg, t["test_tensor"]["source"])))
        np.testing.assert_array_equal(img, test.squeeze())
    sample = iio.imread(_member(pkg, rdf["inputs"][0]["sample_tensor"]["source"]), extension=".tif")
    assert sample.shape == x.shape


def test_description_fits_the_spec_and_names_the_units(tiny):
    pkg, _ = tiny
    d = _rdf(pkg)["description"]
    assert len(d) <= 512
    assert "normalised units" in d and "40 image source(s)" in d  # the long source list was shortened


def test_authors_and_repository_come_from_the_project_metadata(tiny, model_path, tmp_path, monkeypatch):
    pkg, _ = tiny
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [a["name"] for a in project["authors"]]
    assert project_metadata()["authors"] == names
    assert [a["name"] for a in _rdf(pkg)["authors"]] == names
    urls = {k.lower(): v for k, v in project.get("urls", {}).items()}
    assert _rdf(pkg).get("git_repo") == next(
        (urls[k] for k in ("repository", "source", "homepage") if k in urls), None
    )
    # a repository URL in the metadata lands in the package
    monkeypatch.setattr(
        export_module,
        "project_metadata",
        lambda: {"authors": ["A. Person"], "git_repo": "https://github.com/example/pssr"},
    )
    rdf = _rdf(export_bioimageio(model_path, tmp_path / "m.zip", test_input=np.asarray(tiny[1])))
    assert rdf["git_repo"] == "https://github.com/example/pssr"
    assert [a["name"] for a in rdf["authors"]] == ["A. Person"]


def test_card_explains_units_and_edges(tiny):
    pkg, _ = tiny
    rdf = _rdf(pkg)
    doc = rdf["documentation"]
    card = _member(pkg, doc if isinstance(doc, str) else doc["source"]).decode()
    assert "## Using this package outside pssr" in card
    assert "p_lo + restored * (p_hi - p_lo)" in card  # how to get the input's units back
    assert f"`pad: {BORDER}`" in card
    assert rdf["inputs"][0]["pad"] == {"mode": BORDER}  # written explicitly (not `pad: {}`)
