import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from pssr.blockwise.predict import restore
from pssr.degrade.crappify import get_preset
from pssr.errors import PssrError
from pssr.nn.model import ModelConfig
from pssr.nn.modelfile import ModelFileError, load_model, read_metadata
from pssr.quality.metrics import bilinear, psnr
from pssr.training.checkpoint import checkpoint_state
from pssr.training.data import PairSampler, Source, load_sources
from pssr.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def isbi_small(isbi):
    return isbi[:6, :192, :192]


def _sampler(vol, frames=1, patch=16, axes=None, **kw):
    return PairSampler(
        [Source(vol, "isbi", axes=axes)], 4, crappifier=get_preset("pssr-em", 4), patch=patch, frames=frames,
        rng=0, **kw,
    )  # fmt: skip


def test_sampler_shapes_norm_and_split(isbi_small):
    s = _sampler(isbi_small, frames=3)
    lr, hr = s.sample(4)
    assert lr.shape == (4, 3, 16, 16) and hr.shape == (4, 1, 64, 64)
    assert lr.dtype == np.float32
    assert -1 < hr.mean() < 2  # normalised
    ((tr, va),) = s.regions
    assert tr[1] <= va[0]  # validation planes are held out of training


def test_multiframe_inputs_are_distinct_frames(isbi_small):
    # PSSR once crappified the centre frame five times. With a noise-free degradation, that bug
    # gives 5 identical channels; real neighbours give >= 3 distinct ones (even at the stack's
    # ends, where t-2, t-1 are mirrored to t+2, t+1).
    noiseless = get_preset("em", 4, dose=float("inf"), read_sigma=0.0)
    s = PairSampler(
        [Source(isbi_small, "isbi")], 4, crappifier=noiseless, patch=16, frames=5, augment=False, rng=0
    )
    lr, _ = s.sample(8)
    for b in range(8):
        distinct = []
        for ch in lr[b]:
            if not any(np.allclose(ch, d) for d in distinct):
                distinct.append(ch)
        assert len(distinct) >= 3
    # With noise, every channel has its own noise realisation.
    lr, _ = _sampler(isbi_small, frames=5, augment=False).sample(2)
    for b in range(2):
        for i in range(5):
            for j in range(i + 1, 5):
                assert not np.allclose(lr[b, i], lr[b, j])


def test_sampler_errors(isbi_small, tmp_path):
    with pytest.raises(ValueError, match="smaller than one HR patch"):
        _sampler(isbi_small[:, :40, :40])
    with pytest.raises(ValueError, match="frames=2 must be odd"):
        _sampler(isbi_small, frames=2)
    with pytest.raises(ValueError, match="at scale 4 the LR must be"):
        PairSampler([Source(isbi_small, "hr")], 4, lr=[Source(isbi_small[:, :40, :40], "lr")], patch=8)
    with pytest.raises(ValueError, match="needs stacks or timelapses"):
        PairSampler([Source(isbi_small[0], "one")], 4, crappifier=get_preset("em", 4), frames=3, patch=8)


def test_real_pairs_and_registration_warning(isbi_small):
    lr = get_preset("em", 4)(isbi_small, rng=0)
    s = PairSampler([Source(isbi_small, "hr")], 4, lr=[Source(lr, "lr")], patch=8, rng=0)
    a, b = s.sample(2)
    assert a.shape == (2, 1, 8, 8) and b.shape == (2, 1, 32, 32)
    shifted = np.roll(lr, 3, axis=-1)
    with pytest.warns(UserWarning, match="look shifted"):
        PairSampler([Source(isbi_small, "hr")], 4, lr=[Source(shifted, "lr")], patch=8)


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_overfit_tiny_real_crop(isbi_small, tmp_path):
    torch.manual_seed(0)
    s = _sampler(isbi_small[:1, :64, :64], patch=16, augment=False, val_fraction=0)
    cfg = TrainConfig(steps=60, batch=4, lr=3e-3, val_every=60, ckpt_every=1000, val_patches=4)
    p = train(s, ModelConfig(size="small"), tmp_path / "m.safetensors", cfg, progress=False)
    h = read_metadata(p)
    assert h["metrics"]["validation"]["psnr"] > h["metrics"]["validation"]["psnr_bilinear"]


@pytest.mark.slow
def test_short_training_on_real_em_beats_bilinear_on_held_out(isbi, tmp_path):
    # ~30-60 s on 2 cores: low-dose point-scan EM, trained on sections 0-19, scored on 29.
    crap = get_preset("em", 4, dose=10.0)
    s = PairSampler([Source(isbi[:20], "isbi[0:20]")], 4, crappifier=crap, patch=32, rng=0)
    cfg = TrainConfig(steps=150, batch=8, lr=3e-3, val_every=75, ckpt_every=10000, seed=0)
    p = train(s, ModelConfig(size="small"), tmp_path / "em.safetensors", cfg, progress=False)
    hr = isbi[29, :256, :256]
    lr = crap(hr, rng=1)
    pred = restore(lr, model=p, dtype="float32", progress=False).output
    gain = psnr(pred, hr) - psnr(bilinear(lr, 4), hr)
    assert gain > 0.2, gain
    assert (tmp_path / "em.curve.png").stat().st_size > 1000


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_save_load_roundtrip_exact_and_metadata(isbi_small, tmp_path):
    s = _sampler(isbi_small)
    p = train(
        s,
        ModelConfig(size="small"),
        tmp_path / "m.safetensors",
        TrainConfig(steps=3, batch=2, val_every=3, ckpt_every=100, val_patches=2),
        progress=False,
    )
    m = load_model(p)
    x = torch.rand(1, 1, 24, 24)
    ref = {k: v for k, v in load_file(str(p)).items()}
    for k, v in m.net.state_dict().items():
        assert torch.equal(v, ref[k])
    meta = m.meta
    for key in (
        "config",
        "scale",
        "frames",
        "normalization",
        "crappifier",
        "training",
        "metrics",
        "pssr_version",
        "receptive_field",
    ):
        assert key in meta, key
    assert meta["crappifier"]["kind"] == "pssr-em"
    assert m.net(x).shape == (1, 1, 96, 96)
    # half-precision files load to float32 and are half the size
    p16 = train(
        s,
        ModelConfig(size="small"),
        tmp_path / "h.safetensors",
        TrainConfig(steps=1, batch=2, val_every=1, ckpt_every=100, val_patches=2),
        progress=False,
        half=True,
    )
    assert p16.stat().st_size < 0.6 * p.stat().st_size
    assert next(load_model(p16).net.parameters()).dtype == torch.float32


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_resume_reproduces_uninterrupted_run(isbi_small, tmp_path):
    s1 = _sampler(isbi_small)
    cfg = TrainConfig(steps=6, batch=2, val_every=3, ckpt_every=3, val_patches=2, seed=5)
    a = train(s1, ModelConfig(size="small"), tmp_path / "a.safetensors", cfg, progress=False)
    # Interrupted after step 3 (callback stops it; the checkpoint is written), then resumed.
    s2 = _sampler(isbi_small)
    train(
        s2,
        ModelConfig(size="small"),
        tmp_path / "b.safetensors",
        cfg,
        progress=False,
        callback=lambda step, info: step < 3,
    )
    ckpt = tmp_path / "b.ckpt.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        assert json.loads(f.metadata()["pssr_ckpt"])["step"] == 3
    s3 = _sampler(isbi_small)
    b = train(s3, ModelConfig(size="small"), tmp_path / "b.safetensors", cfg, progress=False, resume=ckpt)
    wa, wb = load_file(str(a)), load_file(str(b))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_model_file_errors(isbi_small, tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        load_model(bad)
    s = _sampler(isbi_small)
    p = train(
        s,
        ModelConfig(size="small"),
        tmp_path / "m.safetensors",
        TrainConfig(steps=1, batch=2, val_every=1, ckpt_every=100, val_patches=2),
        progress=False,
    )
    data = p.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt|corrupt"):
        load_model(trunc)
    # weights that do not match the recorded config
    from safetensors.torch import save_file

    meta = read_metadata(p)
    meta["config"]["size"] = "base"
    meta["config"]["widths"] = [32, 64, 128]
    mism = tmp_path / "mism.safetensors"
    save_file(load_file(str(p)), str(mism), metadata={"pssr": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="do not match|wrong shapes"):
        load_model(mism)
    with pytest.raises(ModelFileError, match="neither a built-in"):
        load_model("no-such-model")


def test_train_errors(isbi_small, tmp_path):
    s = _sampler(isbi_small)
    with pytest.raises(ValueError, match="does not match the data"):
        train(
            s,
            ModelConfig(size="small", in_channels=3),
            tmp_path / "m.safetensors",
            TrainConfig(steps=1),
            progress=False,
        )
    with pytest.raises(ValueError, match="must end in .safetensors"):
        train(s, ModelConfig(size="small"), tmp_path / "m.pt", TrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        train(
            s,
            ModelConfig(size="small"),
            tmp_path / "no" / "m.safetensors",
            TrainConfig(steps=1),
            progress=False,
        )
    with pytest.raises(ValueError, match="steps or minutes"):
        TrainConfig(steps=None)
    assert not list(tmp_path.glob("*.safetensors"))


def test_constant_source_still_samples(tmp_path):
    const = np.full((2, 96, 96), 7, np.uint8)
    s = PairSampler([Source(const, "c")], 4, crappifier=get_preset("em", 4), patch=16)
    lr, hr = s.sample(1)  # empty patches are rejected up to a limit, then accepted
    assert np.all(np.isfinite(lr))


def test_load_sources_folder(tmp_path, isbi):
    import tifffile

    for i in range(2):
        tifffile.imwrite(tmp_path / f"s{i}.tif", isbi[i, :128, :128])
    srcs = load_sources(tmp_path)
    assert len(srcs) == 2 and srcs[0].n == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_sources(tmp_path / "empty")


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_cli_train_evaluate_models(tmp_path, isbi, capsys):
    import tifffile

    from pssr.cli.app import main

    tifffile.imwrite(tmp_path / "hr.tif", isbi[:6, :128, :128], imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "m.safetensors"
    assert (
        main(
            [
                "-q",
                "train",
                str(tmp_path / "hr.tif"),
                "--preset",
                "em",
                "--steps",
                "4",
                "--patch",
                "16",
                "--size",
                "small",
                "--batch",
                "2",
                "--val-every",
                "2",
                "--jitter",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "validation PSNR" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["crappifier"]["jitter"] == {"dose": [0.5, 2.0]}
    assert meta["training"]["command"].startswith("pssr ")
    assert main(["-q", "evaluate", str(tmp_path / "hr.tif"), "--model", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"model", "bilinear", "bicubic"}
    # an existing --out is refused (no silent overwrite of a trained model)
    assert (
        main(["-q", "train", str(tmp_path / "hr.tif"), "--preset", "em", "--steps", "1", "--out", str(out)])
        == 2
    )
    assert main(["models"]) == 0
    assert "em" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["l1", "mse", "ssim", "ms-ssim", "l1+ssim", "l1+ms-ssim"])
def test_losses_zero_at_target_positive_otherwise_and_differentiable(name):
    from pssr.training.train import loss_fn

    torch.manual_seed(0)
    y = torch.rand(2, 1, 96, 96)
    assert float(loss_fn(name, y.clone(), y)) == pytest.approx(0.0, abs=1e-5)
    pred = (y + 0.2 * torch.randn_like(y)).requires_grad_(True)
    loss = loss_fn(name, pred, y)
    assert loss.item() > 0.01
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_ms_ssim_weighs_coarse_structure():
    from pssr.training.train import ms_ssim_torch, ssim_torch

    torch.manual_seed(0)
    y = torch.rand(1, 1, 96, 96)
    blurred = torch.nn.functional.avg_pool2d(y, 3, stride=1, padding=1)
    # Blur destroys fine detail: single-scale SSIM drops much more than multi-scale SSIM.
    assert float(ms_ssim_torch(blurred, y)) > float(ssim_torch(blurred, y))


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_init_fine_tunes_from_existing_model(isbi_small, tmp_path):
    s = _sampler(isbi_small)
    tiny = TrainConfig(steps=1, batch=2, val_every=1, ckpt_every=100, val_patches=2, lr=1e-12)
    src = train(s, ModelConfig(size="small"), tmp_path / "a.safetensors", tiny, progress=False)
    ft = train(
        _sampler(isbi_small),
        ModelConfig(size="small"),
        tmp_path / "b.safetensors",
        tiny,
        progress=False,
        init=src,
    )
    wa, wb = load_file(str(src)), load_file(str(ft))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    assert read_metadata(ft)["training"]["init_from"] == str(src)
    with pytest.raises(ValueError, match="fine-tuning needs the same architecture"):
        train(
            _sampler(isbi_small),
            ModelConfig(size="base"),
            tmp_path / "c.safetensors",
            tiny,
            progress=False,
            init=src,
        )


# ------------------------------------------------------------------ interrupt, then resume
# "An interrupted run resumes and reproduces an uninterrupted one exactly", for a Ctrl-C (a
# real SIGINT, or a KeyboardInterrupt raised by a callee) at every point of a step and at every
# step, and for the napari Cancel (a callback returning False, in a worker thread). Weights,
# batch-norm statistics, the curve's history and the validation metrics must all be identical.
STEPS = 4
RESUME_CFG = TrainConfig(steps=STEPS, batch=2, val_every=2, ckpt_every=3, val_patches=2, seed=5)
# where -> (does it happen in step k?, the step the checkpoint holds after it happened in step k)
INTERRUPTS = {
    "raise after drawing the batch": (lambda k: True, lambda k: k - 1),  # sampler RNG advanced
    "raise after the forward pass": (lambda k: True, lambda k: k - 1),  # + batch-norm statistics
    "SIGINT after the forward pass": (lambda k: True, lambda k: k - 1),
    "SIGINT during the update": (lambda k: True, lambda k: k),
    "SIGINT during validation": (lambda k: k % RESUME_CFG.val_every == 0, lambda k: k),
    "SIGINT during the periodic checkpoint": (lambda k: k % RESUME_CFG.ckpt_every == 0, lambda k: k),
    "callback raises KeyboardInterrupt": (lambda k: True, lambda k: k),
    "callback returns False in a worker thread": (lambda k: True, lambda k: k),  # napari's Cancel
}


class _WithBatchNorm(torch.nn.Module):
    """SRUNet behind a batch norm, whose running statistics change in every training forward pass."""

    def __init__(self, cfg):
        from pssr.nn.model import SRUNet

        super().__init__()
        self.cfg = cfg
        self.bn = torch.nn.BatchNorm2d(cfg.in_channels)
        self.net = SRUNet(cfg)

    def forward(self, x):
        return self.net(self.bn(x))


def _quick(mp, curves, batchnorm):
    import pssr.nn.modelfile
    import pssr.training.train

    # The final save measures the receptive field (seconds on 2 cores); it never touches the weights.
    mp.setattr(pssr.nn.modelfile, "receptive_radius", lambda net: 0)
    mp.setattr(
        pssr.training.train,
        "save_curve",
        lambda history, path: curves.append(json.loads(json.dumps(history))),
    )
    if batchnorm:
        mp.setattr(pssr.training.train, "build_model", _WithBatchNorm)


@pytest.fixture(scope="module")
def uninterrupted(isbi_small, tmp_path_factory):
    """``uninterrupted(batchnorm)``: the reference run's weights, metadata and curve (computed once)."""
    runs = {}

    def run(batchnorm):
        if batchnorm not in runs:
            curves = []
            with pytest.MonkeyPatch.context() as mp:
                _quick(mp, curves, batchnorm)
                p = train(
                    _sampler(isbi_small),
                    ModelConfig(size="small"),
                    tmp_path_factory.mktemp("ref") / "ref.safetensors",
                    RESUME_CFG,
                    progress=False,
                )
                meta = read_metadata(p)
            runs[batchnorm] = {"weights": load_file(str(p)), "meta": meta, "curve": curves[0]}
        return runs[batchnorm]

    return run


def _interrupted_run(mp, where, k, sampler, out):
    """Train to ``out`` with a Ctrl-C (or Cancel) injected at ``where`` during step ``k``."""
    import itertools
    import os
    import signal
    import threading

    import pssr.training.train

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)  # as from the terminal: Python handles it in the main thread

    def inject(owner, name, action, nth=k, match=lambda *a, **kw: True):
        """``action`` on the ``nth`` call of ``owner.name`` for which ``match(*args)`` holds."""
        orig, seen = getattr(owner, name), itertools.count(1)

        def wrapper(*a, **kw):
            hit = match(*a, **kw) and next(seen) == nth
            if hit and action == "SIGINT before":
                ctrl_c()
            r = orig(*a, **kw)
            if hit and action == "SIGINT after":
                ctrl_c()
            if hit and action == "raise after":
                raise KeyboardInterrupt
            return r

        mp.setattr(owner, name, wrapper)

    if where == "raise after drawing the batch":
        inject(PairSampler, "sample", "raise after", match=lambda *a, split="train", **kw: split == "train")
    elif where == "raise after the forward pass":
        inject(pssr.training.train, "loss_fn", "raise after")
    elif where == "SIGINT after the forward pass":
        inject(pssr.training.train, "loss_fn", "SIGINT before")
    elif where == "SIGINT during the update":  # the update is applied; the step is not yet counted
        inject(torch.optim.AdamW, "step", "SIGINT after")
    elif where == "SIGINT during validation":  # validations run after steps 2, 4, ...
        inject(pssr.training.train, "validate", "SIGINT before", nth=k // RESUME_CFG.val_every)
    elif where == "SIGINT during the periodic checkpoint":
        inject(
            pssr.training.train, "save_checkpoint", "SIGINT before", nth=1, match=lambda *a: a[3]["step"] == k
        )
    callback = None
    if where == "callback raises KeyboardInterrupt":

        def callback(step, info):
            if step == k:
                raise KeyboardInterrupt

    elif where == "callback returns False in a worker thread":
        errors = []

        def work():
            try:
                train(
                    sampler,
                    ModelConfig(size="small"),
                    out,
                    RESUME_CFG,
                    progress=False,
                    callback=lambda s, i: s < k,
                )
            except BaseException as e:  # reported below, in the test's thread
                errors.append(e)

        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert not errors, errors
        return
    with pytest.raises(KeyboardInterrupt):
        train(sampler, ModelConfig(size="small"), out, RESUME_CFG, progress=False, callback=callback)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


@settings(
    max_examples=3, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(where=st.sampled_from(sorted(INTERRUPTS)), k=st.integers(1, STEPS), batchnorm=st.booleans())
@example(where="raise after drawing the batch", k=2, batchnorm=False)
@example(where="raise after the forward pass", k=3, batchnorm=True)
@example(where="SIGINT after the forward pass", k=1, batchnorm=False)
@example(where="SIGINT during the update", k=2, batchnorm=True)
@example(where="SIGINT during validation", k=4, batchnorm=False)
@example(where="SIGINT during the periodic checkpoint", k=3, batchnorm=True)
@example(where="callback raises KeyboardInterrupt", k=1, batchnorm=False)
@example(where="callback returns False in a worker thread", k=3, batchnorm=True)
def test_interrupt_at_any_point_of_any_step_then_resume_is_bit_identical(
    uninterrupted, isbi_small, where, k, batchnorm
):
    import signal
    import tempfile
    from pathlib import Path

    happens, done = INTERRUPTS[where]
    assume(happens(k))
    reference = uninterrupted(batchnorm)
    curves = []
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        _quick(mp, curves, batchnorm)
        out = Path(d) / "m.safetensors"
        with pytest.MonkeyPatch.context() as inject:
            _interrupted_run(inject, where, k, _sampler(isbi_small), out)
        ckpt = Path(d) / "m.ckpt.safetensors"
        state = checkpoint_state(ckpt)  # the history is stored as tensors, the rest as JSON
        # The checkpoint is a step boundary: the last step that completed, with all its history.
        ref = reference["curve"]
        assert state["step"] == done(k)
        n_val = done(k) // RESUME_CFG.val_every
        assert state["history"] == {
            "step": ref["step"][: done(k)],
            "loss": ref["loss"][: done(k)],
            **{key: ref[key][:n_val] for key in ("val_step", "val_psnr", "val_psnr_bilinear")},
        }
        # Resumed: bit-identical weights (and batch-norm statistics), curve and metrics.
        curves.clear()
        p = train(
            _sampler(isbi_small), ModelConfig(size="small"), out, RESUME_CFG, progress=False, resume=ckpt
        )
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        got = load_file(str(p))
        differ = [n for n, v in reference["weights"].items() if not torch.equal(v, got[n])]
        assert not differ, f"{len(differ)} of {len(got)} tensors differ, e.g. {differ[:3]}"
        assert curves[-1] == ref
        assert read_metadata(p)["metrics"] == reference["meta"]["metrics"]


# ------------------------------------------------------------------ issue 12 / 15 additions
def test_train_draws_from_the_callers_sampler_generator(isbi_small, tmp_path):
    import pssr.nn.modelfile

    cfg = TrainConfig(steps=1, batch=2, val_every=1, ckpt_every=100, val_patches=2, seed=0)
    gen = np.random.default_rng(7)
    s = _sampler(isbi_small)
    s.rng = gen
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pssr.nn.modelfile, "receptive_radius", lambda net: 0)
        a = train(s, ModelConfig(size="small"), tmp_path / "a.safetensors", cfg, progress=False)
        assert s.rng is gen  # not replaced: the caller's generator drew the batch
        b = train(
            _sampler(isbi_small), ModelConfig(size="small"), tmp_path / "b.safetensors", cfg, progress=False
        )
    wa, wb = load_file(str(a)), load_file(str(b))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # other patches, other weights


def test_checkpoint_header_stays_small_and_old_checkpoints_load(tmp_path):
    from safetensors.torch import save_file

    from pssr.training.checkpoint import load_checkpoint, save_checkpoint

    net = torch.nn.Conv2d(1, 2, 3)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.zeros(1, 1, 4, 4)).sum().backward()
    opt.step()
    sizes = {}
    for n in (10, 20000):
        hist = {"step": list(range(1, n + 1)), "loss": [0.1 + i * 1e-7 for i in range(n)], "val_step": [n]}
        hist["val_psnr"] = [20.123456789]
        p = tmp_path / f"c{n}.safetensors"
        save_checkpoint(p, net, opt, {"step": n, "history": hist, "elapsed": 1.0})
        sizes[n] = int.from_bytes(p.read_bytes()[:8], "little")  # the JSON header
        assert checkpoint_state(p)["history"] == hist  # exact: ints stay ints, floats round-trip
    assert sizes[20000] < sizes[10] + 200  # the history lives in tensors, not in the header
    # A checkpoint of the earlier format (history in the JSON header) still resumes.
    t = load_file(str(tmp_path / "c10.safetensors"))
    old = {k: v for k, v in t.items() if not k.startswith("history.")}
    state = {"step": 3, "history": {"step": [1, 2, 3], "loss": [0.3, 0.2, 0.1]}, "elapsed": 2.0}
    save_file(old, str(tmp_path / "old.safetensors"), metadata={"pssr_ckpt": json.dumps(state)})
    assert load_checkpoint(tmp_path / "old.safetensors", net, opt)["history"] == state["history"]


def test_divergence_names_the_learning_rate_flag(isbi_small, tmp_path, monkeypatch):
    import pssr.training.train

    monkeypatch.setattr(
        pssr.training.train, "loss_fn", lambda *a, **kw: torch.tensor(float("nan"), requires_grad=True)
    )
    cfg = TrainConfig(steps=2, batch=2, val_every=2, ckpt_every=100, val_patches=2, lr=0.5)
    with pytest.raises(ValueError, match=r"diverged at step 0 .* lower --learning-rate \(now 0.5\)"):
        train(
            _sampler(isbi_small), ModelConfig(size="small"), tmp_path / "m.safetensors", cfg, progress=False
        )


def test_feature_loss_training_records_the_feature_net(isbi_small, tmp_path):
    import pssr.nn.modelfile
    from pssr.training.losses import FEATURE_NET, file_sha256

    cfg = TrainConfig(steps=2, batch=2, val_every=2, ckpt_every=100, val_patches=2, loss="l1+feature")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pssr.nn.modelfile, "receptive_radius", lambda net: 0)
        p = train(
            _sampler(isbi_small), ModelConfig(size="small"), tmp_path / "m.safetensors", cfg, progress=False
        )
    loss = read_metadata(p)["training"]["loss"]
    assert loss["name"] == "l1+feature" and loss["feature_weight"] == 1.0 and loss["style_weight"] == 0.0
    assert loss["feature_net"]["sha256"] == file_sha256(FEATURE_NET)
    assert np.isfinite(read_metadata(p)["metrics"]["validation"]["psnr"])


def test_train_config_loss_option_errors():
    with pytest.raises(
        ValueError, match=r"style_weight=1.0 applies to the feature losses .* use --loss l1\+feature"
    ):
        TrainConfig(loss="l1", style_weight=1.0)
    with pytest.raises(ValueError, match=r"weights must be >= 0"):
        TrainConfig(loss="l1+feature", feature_weight=-1)
    with pytest.raises(ValueError, match=r"loss='vgg' is unknown"):
        TrainConfig(loss="vgg")


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_init_single_frame_parent_with_more_frames_spreads_its_input(isbi, tmp_path, capsys, caplog):
    """`--init em --frames 3`: a 3-section model that starts as `em` on the sections' mean."""
    import tifffile

    from pssr.cli.app import main
    from pssr.errors import PssrError
    from pssr.nn.model import ModelConfig, build_model
    from pssr.training.train import load_init

    parent = load_model("em")
    cfg3 = ModelConfig.from_dict({**parent.config.to_dict(), "in_channels": 3})
    net = build_model(cfg3).eval()
    load_init(net, "em", cfg3)
    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, 40, 40), dtype=np.float32))
    with torch.no_grad():
        same = net(x.repeat(1, 3, 1, 1))  # a static scene: three identical sections
        ref = parent.net.eval()(x)
    assert torch.allclose(same, ref, atol=1e-5)
    # Another architecture (here: size) is refused, with more frames or not
    small3 = ModelConfig(size="small", in_channels=3)
    with pytest.raises(PssrError, match="differs from the model being trained"):
        load_init(build_model(small3), "em", small3)
    # The command line: the trained model takes 3 sections, records its parent
    vol = tmp_path / "vol.tif"
    tifffile.imwrite(vol, isbi[:6, :128, :128])
    out = tmp_path / "m3.safetensors"
    rc = main(["-q", "train", str(vol), "--axes", "ZYX", "--init", "em", "--frames", "3", "--steps", "2",
               "--batch", "2", "--patch", "16", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    m = load_model(out)
    assert m.frames == 3 and m.meta["training"]["init_from"] == "em"
    assert m.meta["context_axis"] == "Z"  # trained on a ZYX stack: prediction takes Z neighbours
    # A plain multi-page TIFF says nothing about its axes (it reads as ZYX, stack or timelapse):
    # without --axes the model records "T/Z" and the command says how to be explicit.
    guessed = tmp_path / "g.safetensors"
    rc = main(["-q", "train", str(vol), "--init", "em", "--frames", "3", "--steps", "2", "--batch", "2",
               "--patch", "16", "--out", str(guessed)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert load_model(guessed).meta["context_axis"] == "T/Z"
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "were guessed" in said and "--axes TYX" in said
    timelapse = tmp_path / "t.safetensors"
    rc = main(["-q", "train", str(vol), "--axes", "TYX", "--init", "em", "--frames", "3", "--steps", "2",
               "--batch", "2", "--patch", "16", "--out", str(timelapse)])  # fmt: skip
    assert rc == 0 and load_model(timelapse).meta["context_axis"] == "T"
    rc = main(["-q", "train", str(vol), "--axes", "ZYX", "--init", "em", "--size", "small", "--steps", "2",
               "--out", str(tmp_path / "x.safetensors")])  # fmt: skip
    assert rc != 0 and "--size small differs from the --init model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"cfg": {"seed": 6}}, r"training.seed: 5 in the checkpoint, 6 now"),
        ({"cfg": {"lr": 0.1}}, r"training.lr"),
        ({"cfg": {"steps": 9}}, r"training.steps: 6 in the checkpoint, 9 now"),
        ({"cfg": {"loss": "mse"}}, r"training.loss"),
        ({"model": {"size": "base"}}, r"network.size|network.widths"),
        ({"crap": "em"}, r"data.crappifier"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_them(isbi_small, tmp_path, change, match):
    """A resumed run whose settings differ would write a model whose metadata lies about half its training."""
    cfg = TrainConfig(steps=6, batch=2, val_every=3, ckpt_every=3, val_patches=2, seed=5)
    out = tmp_path / "b.safetensors"
    train(
        _sampler(isbi_small), ModelConfig(size="small"), out, cfg, progress=False, callback=lambda s, i: s < 3
    )
    ckpt = tmp_path / "b.ckpt.safetensors"
    cfg2 = TrainConfig(**{**cfg.__dict__, **change.get("cfg", {})})
    mcfg = ModelConfig(**{"size": "small", **change.get("model", {})})
    s = _sampler(isbi_small)
    if "crap" in change:
        s = PairSampler([Source(isbi_small, "isbi")], 4, crappifier=get_preset("em", 4), patch=16, rng=0)
    with pytest.raises(PssrError, match=match):
        train(s, mcfg, tmp_path / "c.safetensors", cfg2, progress=False, resume=ckpt)


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_resume_checks_the_parent_model_the_axis_and_the_data_content(isbi_small, tmp_path):
    cfg = TrainConfig(steps=6, batch=2, val_every=3, ckpt_every=3, val_patches=2, seed=5)
    parent = train(
        _sampler(isbi_small), ModelConfig(size="small"), tmp_path / "p.safetensors", cfg, progress=False
    )
    other = train(
        _sampler(isbi_small), ModelConfig(size="small"), tmp_path / "o.safetensors",
        TrainConfig(**{**cfg.__dict__, "seed": 9}), progress=False,
    )  # fmt: skip
    out = tmp_path / "b.safetensors"
    stop = dict(progress=False, callback=lambda s, i: s < 3)
    train(_sampler(isbi_small), ModelConfig(size="small"), out, cfg, init=str(parent), **stop)
    ckpt = tmp_path / "b.ckpt.safetensors"
    with pytest.raises(PssrError, match="start.init_sha256"):
        train(
            _sampler(isbi_small),
            ModelConfig(size="small"),
            out,
            cfg,
            progress=False,
            resume=ckpt,
            init=str(other),
        )
    changed = isbi_small.copy()
    changed[0, :8, :8] = 255 - changed[0, :8, :8]  # same shape, other content
    with pytest.raises(PssrError, match=r"data.sources"):
        train(
            _sampler(changed),
            ModelConfig(size="small"),
            out,
            cfg,
            progress=False,
            resume=ckpt,
            init=str(parent),
        )
    # a 3-frame run along Z, resumed as a timelapse: another context axis
    mf = tmp_path / "mf.safetensors"
    zs = _sampler(isbi_small, frames=3, axes="ZYX")
    train(zs, ModelConfig(size="small", in_channels=3), mf, cfg, **stop)
    ts = _sampler(isbi_small, frames=3, axes="TYX")
    with pytest.raises(PssrError, match="data.context_axis"):
        train(
            ts,
            ModelConfig(size="small", in_channels=3),
            mf,
            cfg,
            progress=False,
            resume=tmp_path / "mf.ckpt.safetensors",
        )
