"""Model files from untrusted sources: metadata validated, tensors checked before any allocation."""

import copy
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from pssr.nn import modelfile
from pssr.nn.modelfile import ModelFileError, builtin_models, load_model, read_metadata

EM = builtin_models()["em"]  # the 3.5 MB file of the report: srunet base, 65 float16 tensors
SMALL = builtin_models()["fluo-mf"]  # srunet small, 5 frames, 1.1 MB


@pytest.fixture(autouse=True)
def build_log(monkeypatch):
    """Devices networks are built on; a real (non-meta) network too big for these files is an error.

    Without the guard, the code under test would exhaust memory on the huge configs below
    instead of failing.
    """
    log: list[str] = []
    real = modelfile.build_model

    def guarded(cfg):
        device = torch.empty(0).device.type
        log.append(device)
        if device != "meta" and (max(cfg.widths) > 512 or cfg.blocks > 8 or cfg.in_channels > 64):
            raise AssertionError(f"a real network was allocated for {cfg} before its tensors were checked")
        return real(cfg)

    monkeypatch.setattr(modelfile, "build_model", guarded)
    return log


@pytest.fixture(scope="module")
def em_parts():
    return load_file(str(EM)), json.loads(_raw_meta(EM))


@pytest.fixture(scope="module")
def small_parts():
    return load_file(str(SMALL)), json.loads(_raw_meta(SMALL))


def _raw_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["pssr"]


def _write(path: Path, tensors: dict, meta) -> Path:
    save_file(tensors, str(path), metadata={"pssr": json.dumps(meta)})
    return path


def test_builtin_models_load_checked_on_meta_first_and_nothing_unpickled(monkeypatch, build_log):
    def no_unpickling(*a, **k):
        raise AssertionError("a model file must never be unpickled")

    class NoUnpickler(pickle.Unpickler):  # torch subclasses pickle.Unpickler on import
        __init__ = no_unpickling

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", no_unpickling)
    for name, path in builtin_models().items():
        build_log.clear()
        m = load_model(name)
        assert build_log[0] == "meta", build_log  # shapes checked before a real network exists
        ref = load_file(str(path))
        for k, v in m.net.state_dict().items():
            assert torch.equal(v, ref[k].float()), (name, k)
        assert m.halo > 0 and m.normalization.pmax > m.normalization.pmin and m.crappifier is not None
        y = m.net(torch.rand(1, m.frames, 16, 16))
        assert y.shape == (1, 1, 16 * m.scale, 16 * m.scale) and torch.isfinite(y).all()


def test_huge_widths_in_metadata_are_refused_before_any_network_is_allocated(tmp_path, em_parts, build_log):
    # The report: a 3.5 MB file whose metadata says widths [4096, 8192, 16384] built that
    # network (23.5 GB) before looking at the tensors.
    tensors, meta = em_parts
    meta = copy.deepcopy(meta)
    meta["config"]["widths"] = [4096, 8192, 16384]
    p = _write(tmp_path / "huge.safetensors", tensors, meta)
    with pytest.raises(
        ModelFileError,
        match=r"huge\.safetensors.*'stem\.weight'.*\(32, 1, 3, 3\).*\(4096, 1, 3, 3\).*re-train",
    ):
        load_model(p)
    assert build_log and set(build_log) == {"meta"}


def test_huge_config_is_refused_in_a_memory_limited_process(tmp_path, em_parts):
    # The same file, loaded by a process that may use 3 GB of address space (loading the real
    # em model peaks at ~1 GB): refused with a ModelFileError, not a failed 23.5 GB allocation.
    tensors, meta = em_parts
    meta = copy.deepcopy(meta)
    meta["config"].update(widths=[4096, 8192, 16384], blocks=4)
    p = _write(tmp_path / "huge.safetensors", tensors, meta)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))\n"
        "from pssr.nn.modelfile import ModelFileError, load_model\n"
        "try:\n"
        "    load_model(sys.argv[1])\n"
        "except ModelFileError as e:\n"
        "    print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("refused:"), r.stderr[-2000:]
    assert "huge.safetensors" in r.stdout


def test_structural_counts_beyond_the_file_are_refused_without_building(tmp_path, small_parts, build_log):
    # 10**9 blocks would take forever to build even on the meta device.
    tensors, meta = small_parts
    meta = copy.deepcopy(meta)
    meta["config"]["blocks"] = 10**9
    p = _write(tmp_path / "deep.safetensors", tensors, meta)
    with pytest.raises(ModelFileError, match=r"deep\.safetensors.*blocks.*1000000000.*42 tensors"):
        load_model(p)
    assert build_log == []


@pytest.mark.parametrize("value", [[], ["config"], "pssr", 3, None])
def test_metadata_that_is_not_a_json_object_is_refused(tmp_path, small_parts, value):
    p = _write(tmp_path / "notobj.safetensors", small_parts[0], value)
    with pytest.raises(ModelFileError, match=r"notobj\.safetensors.*must be a JSON object.*re-train"):
        load_model(p)
    with pytest.raises(ModelFileError, match=r"notobj\.safetensors.*must be a JSON object"):
        read_metadata(p)


BAD_VALUES = [
    # (key path, bad value, what the message must say besides the file name)
    (("config",), [32, 64], r"'config'.*\[32, 64\].*JSON object"),
    (("config", "colour"), "red", r"'config'.*unknown model config key.*colour"),
    (("config", "widths"), "abc", r"'config'.*'abc'"),
    (("config", "scale"), 4.5, r"'config'.*scale=4\.5"),
    (("config", "arch"), "vit", r"'config'.*'vit'"),
    (("normalization",), "percentile", r"'normalization'.*'percentile'.*JSON object"),
    (("normalization", "pmin"), 99.9, r"'normalization'.*pmin=99\.9.*pmax=99\.8.*0 <= pmin < pmax <= 100"),
    (("normalization", "pmax"), "high", r"'normalization'.*'high'"),
    (("crappifier",), ["em"], r"'crappifier'.*\['em'\]"),
    (("context_axis",), "z", r"'context_axis'.*'z'.*'T' \(timelapse\), 'Z' \(sections\)"),
    (("context_axis",), 5, r"'context_axis'.*5.*'T' \(timelapse\)"),
    (("crappifier", "kind"), "blur", r"'crappifier'.*'blur'"),
    (("receptive_field",), "wide", r"'receptive_field'.*'wide'.*non-negative integer"),
    (("format_version",), "one", r"'format_version'.*'one'.*integer"),
    (("scale",), 2, r"'scale'.*2.*config.*4"),
    (("frames",), 3, r"'frames'.*3.*config.*5"),
]


@pytest.mark.parametrize(("keys", "value", "says"), BAD_VALUES)
def test_bad_metadata_values_name_the_file_the_value_the_rule_and_the_fix(
    tmp_path, small_parts, keys, value, says
):
    tensors, meta = small_parts
    meta = copy.deepcopy(meta)
    target = meta
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    p = _write(tmp_path / "badmeta.safetensors", tensors, meta)
    pattern = r"badmeta\.safetensors.*" + says + r".*(re-train|upgrade pssr)"
    with pytest.raises(ModelFileError, match=pattern):
        m = load_model(p)
        # Before the fix some values were only noticed when used, with an unrelated error.
        m.halo, m.normalization, m.crappifier  # noqa: B018
    with pytest.raises(ModelFileError, match=pattern):
        read_metadata(p)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_naming_the_file_and_the_tensor(tmp_path, small_parts, bad):
    tensors = dict(small_parts[0])
    for name in ("enc.1.0.conv2.weight", "out.bias"):
        t = tensors[name].clone()
        t.view(-1)[0] = bad
        tensors[name] = t
    p = _write(tmp_path / "nan.safetensors", tensors, small_parts[1])
    # The first bad tensor in the network's order is named.
    with pytest.raises(ModelFileError, match=r"nan\.safetensors.*'enc\.1\.0\.conv2\.weight'.*1 non-finite"):
        load_model(p)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("drop", r"missing.*'out\.bias'"),
        ("extra", r"unexpected.*'spare\.weight'"),
        ("shape", r"'out\.weight'.*\(1, 16, 3, 1\).*\(1, 16, 3, 3\)"),
        ("dtype", r"'out\.weight'.*I32.*floating"),
    ],
)
def test_tensors_that_do_not_match_the_config_are_named(tmp_path, small_parts, change, says):
    tensors = dict(small_parts[0])
    if change == "drop":
        del tensors["out.bias"]
    elif change == "extra":
        tensors["spare.weight"] = torch.zeros(3)
    elif change == "shape":
        tensors["out.weight"] = tensors["out.weight"][..., :1].contiguous()
    else:
        tensors["out.weight"] = torch.zeros(tensors["out.weight"].shape, dtype=torch.int32)
    p = _write(tmp_path / "mismatch.safetensors", tensors, small_parts[1])
    with pytest.raises(ModelFileError, match=r"mismatch\.safetensors.*" + says):
        load_model(p)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
FIELDS = [
    ("config",),
    ("normalization",),
    ("crappifier",),
    ("receptive_field",),
    ("receptive_field_method",),
    ("format_version",),
    ("scale",),
    ("frames",),
    ("config", "widths"),
    ("config", "blocks"),
    ("config", "in_channels"),
    ("config", "scale"),
    ("config", "size"),
    ("config", "arch"),
    ("config", "layers"),
    ("config", "attention"),
    ("normalization", "pmin"),
    ("normalization", "method"),
    ("crappifier", "kind"),
    ("crappifier", "params"),
    ("crappifier", "jitter"),
]


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # build_log is reset per example
)
@given(
    keys=st.sampled_from(FIELDS),
    value=JSON
    | st.integers(min_value=2**20)
    | st.lists(st.integers(min_value=0, max_value=2**40), max_size=4),
)
def test_any_metadata_value_either_loads_a_usable_model_or_is_refused_naming_the_file(
    small_parts, build_log, keys, value
):
    tensors, meta = small_parts
    meta = copy.deepcopy(meta)
    target = meta
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    build_log.clear()
    with tempfile.TemporaryDirectory() as d:
        p = _write(Path(d) / "fuzz.safetensors", tensors, meta)
        try:
            m = load_model(p)
        except ModelFileError as e:
            assert re.search(r"fuzz\.safetensors", str(e)), e
            assert build_log.count("cpu") == 0, build_log  # refused before a real network existed
            return
        # Loaded: every property a caller uses works, and the output is finite.
        assert m.halo >= 0 and 0 <= m.normalization.pmin < m.normalization.pmax <= 100
        _ = m.crappifier
        assert torch.isfinite(m.net(torch.rand(1, m.frames, 8, 8))).all()
        assert os.path.samefile(m.path, p)
