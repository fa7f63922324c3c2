"""bioimage.io packages: ``pssr export`` -> bioimage.io's own test runner, and back into pssr."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from pssr.errors import PssrError

pytest.importorskip("bioimageio.spec", reason="the [bioimageio] extra is not installed")

from pssr.nn.export import DATA_CITATIONS, PSSR_DOI, export_bioimageio  # noqa: E402
from pssr.nn.modelfile import ModelFileError, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUILTINS = ["em", "fluo", "fluo-mf"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Each built-in model exported once for this module."""
    out = tmp_path_factory.mktemp("packages")
    return {name: export_bioimageio(name, out / f"{name}.zip") for name in BUILTINS}


def _rdf(pkg: Path) -> dict:
    with zipfile.ZipFile(pkg) as z:
        return yaml.safe_load(z.read("rdf.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTINS)
def test_bioimageio_core_test_passes_offline(packages, name):
    from bioimageio.core import test_model

    summary = test_model(packages[name])
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status != "passed"]
    assert summary.status == "passed", failed
    # both weight formats really ran on the test input and at the parameterized sizes
    ran = {d.name for d in summary.details}
    for wf in ("pytorch_state_dict", "torchscript", "onnx"):
        assert f"Reproduce test outputs from test inputs ({wf})" in ran
        assert f"Run {wf} inference for inputs with batch_size: 2 and size parameter n: 2" in ran


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
@pytest.mark.parametrize("name", BUILTINS)
def test_package_describes_the_model(packages, name):
    lm = load_model(name)
    rdf = _rdf(packages[name])
    assert rdf["type"] == "model" and rdf["format_version"].startswith("0.5.")
    [inp], [out] = rdf["inputs"], rdf["outputs"]
    y_in = next(a for a in inp["axes"] if a.get("id") == "y")
    y_out = next(a for a in out["axes"] if a.get("id") == "y")
    # output size = input size * 4: size reference with axis scales 4 (input) and 1 (output)
    assert y_out["size"] == {"tensor_id": inp["id"], "axis_id": "y"}
    assert y_in["scale"] / y_out["scale"] == lm.scale == 4
    assert y_out["halo"] == lm.halo * lm.scale  # the receptive field, in output pixels
    assert y_in["size"]["step"] == lm.config.multiple
    assert y_in["size"]["min"] >= 2 * lm.halo + 1
    channels = next(a for a in inp["axes"] if a["type"] == "channel")["channel_names"]
    assert len(channels) == lm.frames
    [scale_range] = [p for p in inp["preprocessing"] if p["id"] == "scale_range"]
    assert scale_range["kwargs"]["min_percentile"] == lm.normalization.pmin
    assert scale_range["kwargs"]["max_percentile"] == lm.normalization.pmax
    assert out["postprocessing"][-1]["id"] == "ensure_dtype"
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    assert rdf["license"] == "BSD-3-Clause"
    assert any(c.get("doi") == PSSR_DOI for c in rdf["cite"])
    cfg = rdf["config"]["pssr"]
    assert cfg["crappifier"] == lm.crappifier.to_dict() and cfg["halo"] == lm.halo
    assert cfg["training_data"] == [d["path"] for d in lm.meta["training"]["data"]]
    for key in cfg["data_citations"]:
        assert any(c["text"] == DATA_CITATIONS[key][0] for c in rdf["cite"])
    assert lm.crappifier.kind in rdf["description"]
    with zipfile.ZipFile(packages[name]) as z:
        card = z.read(rdf["documentation"]["source"]).decode()
        # the model card, then the package's section on using it outside pssr
        assert card.startswith((ROOT / "docs/models" / f"{name}.md").read_text().rstrip("\n"))
        assert "## Using this package outside pssr" in card
        assert z.read(rdf["covers"][0]["source"]).startswith(b"\x89PNG")
        # the pssr model file travels byte for byte
        assert z.read(cfg["model_file"]) == (ROOT / "pssr/models" / f"{name}.safetensors").read_bytes()


def test_architecture_runs_without_pssr(packages, tmp_path):
    """A consumer without pssr rebuilds the network from the package alone and reproduces the test."""
    pkg = packages["fluo-mf"]
    rdf = _rdf(pkg)
    with zipfile.ZipFile(pkg) as z:
        z.extractall(tmp_path)
    w = rdf["weights"]["pytorch_state_dict"]
    code = f"""
import importlib.util, json, sys
import numpy as np, torch
sys.modules["pssr"] = None  # importing pssr now fails
spec = importlib.util.spec_from_file_location("arch", {str(tmp_path / w["architecture"]["source"])!r})
mod = importlib.util.module_from_spec(spec); sys.modules["arch"] = mod; spec.loader.exec_module(mod)
kwargs = json.loads({json.dumps(w["architecture"]["kwargs"])!r})
net = getattr(mod, {w["architecture"]["callable"]!r})(**kwargs)
net.load_state_dict(torch.load({str(tmp_path / w["source"])!r}, weights_only=True)); net.eval()
x = np.load({str(tmp_path / "test_input.npy")!r})
lo, hi = np.percentile(x, [1.0, 99.8])
with torch.no_grad():
    y = net(torch.from_numpy(((x - lo) / (hi - lo + 1e-6)).astype(np.float32))).numpy()
ref = np.load({str(tmp_path / "test_output.npy")!r})
print(float(np.abs(y - ref).max()), y.shape == ref.shape)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    err, same_shape = r.stdout.split()
    assert same_shape == "True" and float(err) < 1e-4


def test_round_trip_predict_is_identical(packages, tmp_path):
    import pssr

    lr = tifffile.imread(ROOT / "pssr/data/isbi_em_lr.tif")[:2]
    a = pssr.restore(lr, model="em", progress=False).output
    b = pssr.restore(lr, model=str(packages["em"]), progress=False).output
    assert a.shape == (2, 256, 256)
    np.testing.assert_array_equal(a, b)


def test_cli_export_and_predict_with_the_package(tmp_path, capsys):
    from pssr.cli.app import main

    pkg = tmp_path / "mf.zip"
    assert main(["-q", "export", "fluo-mf", str(pkg)]) == 0
    assert "wrote" in capsys.readouterr().out and _rdf(pkg)["config"]["pssr"]["frames"] == 5
    lr = ROOT / "pssr/data/bioimageio_test_fluo-mf.tif"
    for model, out in ((str(pkg), "a.tif"), ("fluo-mf", "b.tif")):
        assert main(["-q", "predict", str(lr), str(tmp_path / out), "--model", model, "--axes", "TYX"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif"))
    # an existing package is kept unless --overwrite
    assert main(["-q", "export", "fluo-mf", str(pkg)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_rdf_yaml_loads_and_other_packages_are_refused(packages, tmp_path):
    with zipfile.ZipFile(packages["fluo-mf"]) as z:
        z.extractall(tmp_path)
    lm = load_model(tmp_path / "rdf.yaml")
    assert lm.frames == 5 and lm.path == str(tmp_path / "rdf.yaml")
    rdf = yaml.safe_load((tmp_path / "rdf.yaml").read_text())

    other = dict(rdf, config={})  # a valid bioimage.io model that pssr did not write
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ModelFileError, match="not a pssr export .* use bioimageio.core"):
        load_model(tmp_path / "other.yaml")

    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(dict(rdf, type="dataset")))
    with pytest.raises(ModelFileError, match="not a valid bioimage.io model \\(type 'dataset'"):
        load_model(tmp_path / "dataset.yaml")

    (tmp_path / "old.yaml").write_text(yaml.safe_dump(dict(rdf, format_version="0.4.10")))
    with pytest.raises(ModelFileError, match="format 0.4.10"):
        load_model(tmp_path / "old.yaml")

    # weights changed after export: the sha256 check refuses them
    f = tmp_path / rdf["config"]["pssr"]["model_file"]
    data = bytearray(f.read_bytes())
    data[-10] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="SHA256 mismatch"):
        load_model(tmp_path / "rdf.yaml")


def test_loading_a_package_never_unpickles(packages, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pssr unpickled a file from a package")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)
    import pickle

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    lm = load_model(packages["em"])
    assert lm.scale == 4 and lm.halo == load_model("em").halo


def test_export_refuses_with_value_rule_fix(tmp_path):
    with pytest.raises(ModelFileError, match="at least 140x140 .* halo of 68 px .* --test-input"):
        export_bioimageio("em", tmp_path / "a.zip", test_input=ROOT / "pssr/data/isbi_em_lr.tif")
    with pytest.raises(PssrError, match="bundles no EM stack .* --test-input"):
        export_bioimageio("em-3d", tmp_path / "e.zip")  # an EM section-context model needs an EM stack
    with pytest.raises(ModelFileError, match="bilinear baseline and has no weights"):
        export_bioimageio("bilinear:4", tmp_path / "b.zip")
    with pytest.raises(ModelFileError, match="must end in .zip"):
        export_bioimageio("em", tmp_path / "c.tif")
    (tmp_path / "d.zip").write_bytes(b"keep")
    with pytest.raises(ModelFileError, match="already exists"):
        export_bioimageio("em", tmp_path / "d.zip")
    assert (tmp_path / "d.zip").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zip"]  # no partial files left


def test_bundled_test_inputs_are_the_cited_crops(data_dir):
    """The bundled samples are what BIOIMAGEIO_SAMPLES.md says they are cut from."""
    from pssr.degrade.crappify import CrappifierConfig

    def nominal(name):
        c = load_model(name).crappifier
        return CrappifierConfig(c.kind, c.scale, c.params, {})

    em = tifffile.imread(data_dir / "em/epfl_fibsem_train/training0164.tif")[96:672, 224:800]
    fluo = tifffile.imread(data_dir / "fluo/BPAE_actin.tif")[52:628, 262:838]
    golgi = tifffile.imread(data_dir / "fluo/golgi_bfa_timelapse.tif")[24:29, 20:116, 25:121]
    expected = {
        "em": nominal("em")(em, rng=0),
        "fluo": nominal("fluo")(fluo, rng=0),
        "fluo-mf": golgi.astype(np.float32),
    }
    for name, want in expected.items():
        got = tifffile.imread(ROOT / f"pssr/data/bioimageio_test_{name}.tif")
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    held_out = {n: " ".join(load_model(n).meta["training"]["held_out"]) for n in BUILTINS}
    assert "training0164" in held_out["em"] and "BPAE_actin" in held_out["fluo"]
    assert "golgi_bfa_timelapse.tif[24:30]" in held_out["fluo-mf"]
