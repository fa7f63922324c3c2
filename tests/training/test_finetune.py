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
    # --no-parent-check: this test checks where two steps moved the weights from (by default a
    # fine-tune that does not beat its parent is replaced by the parent's weights).
    args = ["-q", "train", str(vnc_crop), "--init", "em", "--scale", "4", *TINY, "--no-parent-check"]
    rc = main([*args, "--out", str(out)])
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


# ------------------------------------------------------- adapting must not make things worse (issue 27)
@pytest.mark.slow  # a base-size parent (em): over 10 s on 2 shared cores
def test_noise_from_refits_only_the_noise_level_of_the_parents_own_degradation(data_dir, vnc_crop, tmp_path):
    # The user's "real" low-resolution scan: the em model's own degradation (pssr-em) at a known
    # noise level, of a smooth real section (see tests/degrade: the fit's bias on aliased LR).
    from scipy.ndimage import gaussian_filter

    from pssr.degrade.crappify import get_preset

    sec = tifffile.imread(data_dir / "em" / "drosophila_l3_vnc_sstem.tif", key=19)
    lr = get_preset("pssr-em", 4, var_factor=0.15)(gaussian_filter(sec.astype("float32"), 4), rng=0)
    lr_path = tmp_path / "real_lr.tif"
    tifffile.imwrite(lr_path, lr)
    out = tmp_path / "ft.safetensors"
    rc = main(
        ["-q", "train", str(vnc_crop), "--init", "em", "--noise-from", str(lr_path), *TINY, "--out", str(out)]
    )
    assert rc == 0  # was refused: "works with the physical presets 'em' and 'fluo', not 'pssr-em'"
    crap = load_model(out).crappifier
    em = load_model("em").crappifier
    assert crap.kind == "pssr-em" and crap.jitter == em.jitter  # the parent's degradation...
    assert 0.75 * 0.15 < crap.params["var_factor"] < 1.25 * 0.15  # ...with the noise level refitted
    assert crap.params["full_scale"] > 0  # in the noise image's units (it is float)


@pytest.mark.slow  # two runs from em (base size): over 10 s on 2 shared cores; the fast test below
def test_a_fine_tune_worse_than_its_parent_is_replaced_by_the_parent_and_says_so(vnc_crop, tmp_path, capsys):
    # A learning rate of 1 for two steps wrecks the weights: the fine-tune is far worse than em.
    wreck = ["-q", "train", str(vnc_crop), "--init", "em", *TINY, "--learning-rate", "1"]
    out = tmp_path / "kept.safetensors"
    assert main([*wreck, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "kept the parent em (its weights are saved): the fine-tune did not beat it" in said
    check = read_metadata(out)["training"]["parent_check"]
    assert check["kept"] == "parent" and check["applied"] and check["held_out"]
    assert check["psnr_finetune"] < check["psnr_parent"] - 1 and check["patches"] == 64
    we, wk = load_file(str(builtin_models()["em"])), load_file(str(out))
    assert all(torch.equal(we[k].float(), wk[k].float()) for k in we)  # em's weights, bit for bit
    v = read_metadata(out)["metrics"]["validation"]
    assert v["psnr"] > v["psnr_bilinear"]  # the file's validation scores are the kept network's
    # Opting out keeps the wrecked fine-tune, and both the output and the metadata say what it is.
    raw = tmp_path / "raw.safetensors"
    assert main([*wreck, "--no-parent-check", "--out", str(raw)]) == 0
    assert "does NOT beat its parent em and was saved anyway (--no-parent-check)" in capsys.readouterr().out
    check = read_metadata(raw)["training"]["parent_check"]
    assert check["kept"] == "parent" and not check["applied"]
    wr = load_file(str(raw))
    assert not all(torch.equal(we[k].float(), wr[k].float()) for k in we)


def test_the_parent_check_keeps_whichever_of_parent_and_fine_tune_is_better(isbi, tmp_path):
    # A tiny network on real ISBI crops: from an untrained parent, 30 steps win (the fine-tune is
    # kept); from that model, two steps at a learning rate of 1 wreck it (its parent is kept).
    from pssr.degrade.crappify import get_preset
    from pssr.nn.model import ModelConfig
    from pssr.training.data import PairSampler, Source
    from pssr.training.finetune import check_summary
    from pssr.training.train import TrainConfig, train

    def sampler():
        return PairSampler(
            [Source(isbi[:6, :192, :192], "isbi")], 4, crappifier=get_preset("pssr-em", 4), patch=16
        )

    cfg = ModelConfig(widths=(8, 16), blocks=1)
    untrained = TrainConfig(steps=1, batch=2, val_every=1, ckpt_every=100, val_patches=2, lr=1e-12)
    parent = train(sampler(), cfg, tmp_path / "p.safetensors", untrained, progress=False)
    steps = TrainConfig(steps=30, batch=4, val_every=30, ckpt_every=100, val_patches=2, lr=3e-3)
    good = train(
        sampler(), cfg, tmp_path / "g.safetensors", steps, progress=False, init=parent, keep_better=True
    )
    check = read_metadata(good)["training"]["parent_check"]
    assert check["kept"] == "fine-tune" and check["psnr_finetune"] > check["psnr_parent"]
    assert check_summary(check, "p").startswith("kept the fine-tune: fine-tune ")
    wp, wg = load_file(str(parent)), load_file(str(good))
    assert not all(torch.equal(wp[k], wg[k]) for k in wp)

    wreck = TrainConfig(steps=2, batch=2, val_every=2, ckpt_every=100, val_patches=2, lr=1.0)
    kept = train(
        sampler(), cfg, tmp_path / "k.safetensors", wreck, progress=False, init=good, keep_better=True
    )
    check = read_metadata(kept)["training"]["parent_check"]
    assert check["kept"] == "parent" and check["applied"] and check["psnr_finetune"] < check["psnr_parent"]
    assert check_summary(check, "g").startswith("kept the parent g (its weights are saved)")
    wk = load_file(str(kept))
    assert all(torch.equal(wg[k], wk[k]) for k in wg)  # the parent's weights, bit for bit
    # The library default only reports (pssr train --init and the napari widget keep the better).
    raw = train(sampler(), cfg, tmp_path / "r.safetensors", wreck, progress=False, init=good)
    check = read_metadata(raw)["training"]["parent_check"]
    assert check["kept"] == "parent" and not check["applied"]
    assert "does NOT beat its parent g" in check_summary(check, "g")
    assert not all(torch.equal(wg[k], w) for k, w in load_file(str(raw)).items())


@pytest.mark.parametrize("flags", [[], ["--gan"]])
def test_no_parent_check_needs_a_supervised_fine_tune(vnc_crop, tmp_path, capsys, flags):
    init = ["--init", "em"] if flags else []
    rc = main(["train", str(vnc_crop), "--preset", "em", *init, *flags, "--no-parent-check", *TINY,
               "--out", str(tmp_path / "m.safetensors")])  # fmt: skip
    assert rc == 2 and "--no-parent-check turns off the check" in capsys.readouterr().err


def test_the_parent_check_record_says_where_it_scored(isbi, tmp_path):
    """held_out False must not be recorded as 'never sampled in training' (adversarial probe)."""
    from pssr.degrade.crappify import get_preset
    from pssr.nn.model import ModelConfig
    from pssr.training.data import PairSampler, Source
    from pssr.training.train import TrainConfig, train

    cfg = ModelConfig(widths=(8, 16), blocks=1)
    one = TrainConfig(steps=1, batch=2, val_every=1, ckpt_every=100, val_patches=2)
    for name, data, held in (("stack", isbi[:6, :96, :96], True), ("tiny", isbi[0, :64, :64], False)):

        def sampler(data=data, name=name, held=held):
            patch = (
                8 if held else 16
            )  # a 64 px image at 4x holds exactly one 16 px LR patch: nothing held out
            return PairSampler([Source(data, name)], 4, crappifier=get_preset("pssr-em", 4), patch=patch)

        parent = train(sampler(), cfg, tmp_path / f"p-{name}.safetensors", one, progress=False)
        out = train(sampler(), cfg, tmp_path / f"f-{name}.safetensors", one, progress=False, init=parent)
        check = read_metadata(out)["training"]["parent_check"]
        assert check["held_out"] is held, check
        assert check["where"].startswith("validation region" if held else "patches of the training images")
        assert ("never" in check["where"]) is False
