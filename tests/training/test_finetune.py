"""``pssr train --init``: fine-tuning a built-in or a file model from the command line."""

import hashlib
import re

import pytest
import tifffile
import torch
from safetensors.torch import load_file

from pssr.cli.app import main
from pssr.nn.modelfile import builtin_models, load_model, read_metadata


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def vnc_crop(data_dir, tmp_path_factory):
    """3 sections x 128 x 128 of the L3 VNC ssTEM volume (a source no built-in was trained on)."""
    vol = tifffile.imread(data_dir / "em" / "drosophila_l3_vnc_sstem.tif")
    p = tmp_path_factory.mktemp("vnc") / "hr.tif"
    tifffile.imwrite(p, vol[:3, 256:384, 256:384], imagej=True, metadata={"axes": "ZYX"})
    return p


TINY = ["--steps", "2", "--patch", "16", "--batch", "2", "--val-every", "2", "--ckpt-every", "100"]


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_init_builtin_takes_architecture_and_degradation_and_records_parent(vnc_crop, tmp_path, capsys):
    out = tmp_path / "ft.safetensors"
    # --scale 4 is given and equals em's: allowed; --size/--frames/--arch are not given: from em.
    rc = main(["-q", "train", str(vnc_crop), "--init", "em", "--scale", "4", *TINY, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    em = load_model("em")
    ft = load_model(out)
    assert ft.config == em.config  # base size, although the CLI default would pick base anyway
    assert ft.crappifier == em.crappifier  # the parent's degradation, noise jitter included
    tr = read_metadata(out)["training"]
    assert tr["init_from"] == "em"
    assert tr["init_sha256"] == _sha256(builtin_models()["em"])
    # Two AdamW steps with a one-cycle peak of 1e-3 move every weight by at most ~2e-3:
    # the network started from em's weights, not from a fresh initialisation.
    we, wf = load_file(str(builtin_models()["em"])), load_file(str(out))
    assert set(we) == set(wf)
    for k in we:
        d = (we[k].float() - wf[k].float()).abs().max().item()
        assert d < 5e-3, (k, d)
    assert any((we[k].float() != wf[k].float()).any() for k in we)  # and it did train


def test_init_file_parent_keeps_its_non_default_architecture(vnc_crop, tmp_path, capsys):
    parent = tmp_path / "parent.safetensors"
    args = ["-q", "train", str(vnc_crop), "--preset", "em", "--size", "small", *TINY]
    assert main([*args, "--out", str(parent)]) == 0
    child = tmp_path / "child.safetensors"
    # No --size: the CLI default (base) must not clash with the small parent.
    rc = main(["-q", "train", str(vnc_crop), "--init", str(parent), *TINY, "--out", str(child)])
    assert rc == 0, capsys.readouterr().err
    assert load_model(child).config == load_model(parent).config
    assert load_model(child).config.size == "small"
    tr = read_metadata(child)["training"]
    assert tr["init_from"] == str(parent.resolve())
    assert tr["init_sha256"] == _sha256(parent)
    assert load_model(child).crappifier.kind == "em"


@pytest.mark.parametrize(
    ("init", "flags", "match"),
    [
        (
            "em",
            ["--size", "small"],
            r"--size small differs from the --init model 'em' \(size='base'\).*Drop --size",
        ),
        ("em", ["--scale", "2"], r"--scale 2 differs .*\(scale=4\)"),
        ("fluo-mf", ["--frames", "1"], r"--frames 1 differs .*'fluo-mf' \(in_channels=5\)"),
        ("em", ["--arch", "pssr-resunet"], r"--arch pssr-resunet differs .*\(arch='srunet'\)"),
        ("no-such-model", [], r"neither a built-in .* nor an existing \.safetensors file"),
    ],
)
def test_init_architecture_mismatch_is_a_clear_error(vnc_crop, tmp_path, capsys, init, flags, match):
    out = tmp_path / "x.safetensors"
    rc = main(["train", str(vnc_crop), "--init", init, *flags, *TINY, "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("pssr: error: ")
    assert re.search(match, err), err
    assert not out.exists()


def test_init_without_recorded_degradation_needs_preset(vnc_crop, tmp_path, capsys):
    from pssr.nn.model import ModelConfig, build_model
    from pssr.nn.modelfile import save_model

    cfg = ModelConfig(scale=4, size="small", widths=(8, 16), blocks=1)
    torch.manual_seed(0)
    parent = save_model(tmp_path / "paired.safetensors", build_model(cfg), cfg, {"crappifier": None})
    out = tmp_path / "x.safetensors"
    rc = main(["train", str(vnc_crop), "--init", str(parent), *TINY, "--out", str(out)])
    assert rc == 2
    assert "records no degradation to reuse" in capsys.readouterr().err
    # With a preset it fine-tunes, and its own config (custom widths) is kept.
    rc = main(
        ["-q", "train", str(vnc_crop), "--init", str(parent), "--preset", "pssr-em", *TINY, "--out", str(out)]
    )
    assert rc == 0
    assert load_model(out).config.widths == (8, 16)
    assert read_metadata(out)["training"]["init_sha256"] == _sha256(parent)


def test_train_cli_never_replaces_a_model_and_never_drops_a_checkpoint(vnc_crop, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    args = ["-q", "train", str(vnc_crop), "--preset", "em", "--size", "small", *TINY, "--ckpt-every", "1"]
    args += ["--out", str(out)]
    assert main(args) == 0
    ckpt = tmp_path / "m.ckpt.safetensors"
    assert ckpt.exists()
    before = out.read_bytes()
    capsys.readouterr()
    assert main([*args, "--resume", str(ckpt)]) == 2  # a finished model is never replaced, resume or not
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    out.unlink()  # now as after a kill: a checkpoint and no model
    assert main(args) == 2
    assert "checkpoint of an interrupted run" in capsys.readouterr().err and ckpt.exists()
    assert main([*args, "--resume", str(ckpt)]) == 0
