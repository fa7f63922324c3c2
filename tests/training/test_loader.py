"""Training batches drawn ahead in worker processes (pssr.training.loader, ``--loader-workers``)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pssr.degrade.crappify import get_preset
from pssr.errors import PssrError
from pssr.nn.model import ModelConfig
from pssr.training.data import PairSampler, Source
from pssr.training.loader import ParallelBatches, batch_key
from pssr.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def vol(isbi):
    return isbi[:6, :192, :192]


def _sampler(vol, frames=1, rng=0):
    return PairSampler(
        [Source(vol, "isbi")], 4, crappifier=get_preset("pssr-em", 4), patch=16, frames=frames, rng=rng
    )


def test_batch_of_step_k_depends_only_on_key_and_k(vol):
    s = _sampler(vol, frames=3)
    key = batch_key(s)
    state = s.rng.bit_generator.state
    with ParallelBatches(s, workers=2, batch=3) as pb:
        got = [pb.sample(3) for _ in range(5)]
        assert pb.rng.bit_generator.state == state  # the sampler's generator is not advanced
        with pytest.raises(ValueError, match="batch=2 differs"):
            pb.sample(2)
    for k, (lr, hr) in enumerate(got):
        elr, ehr = _sampler(vol, frames=3).sample(3, rng=np.random.default_rng([key, k]))
        np.testing.assert_array_equal(lr, elr)
        np.testing.assert_array_equal(hr, ehr)
    assert lr.shape == (3, 3, 16, 16) and hr.shape == (3, 1, 64, 64)
    assert not np.array_equal(got[0][0], got[1][0])  # steps differ
    # Another seed: other batches; seek() restarts at any step
    other = _sampler(vol, frames=3, rng=1)
    assert batch_key(other) != key
    with ParallelBatches(_sampler(vol, frames=3), workers=1, batch=3, start=0) as pb:
        pb.seek(3)
        np.testing.assert_array_equal(pb.sample(3)[0], got[3][0])
    with pytest.raises(ValueError, match="workers=0"):
        ParallelBatches(s, workers=0, batch=3)


def _weights(path):
    return load_file(str(path))


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_any_number_of_workers_trains_the_same_model(vol, tmp_path):
    cfg = dict(steps=4, batch=2, val_every=2, ckpt_every=2, val_patches=2, seed=5)
    w = {}
    for n in (1, 3):
        out = train(
            _sampler(vol),
            ModelConfig(size="small"),
            tmp_path / f"w{n}.safetensors",
            TrainConfig(loader_workers=n, **cfg),
            progress=False,
        )
        w[n] = _weights(out)
    for k in w[1]:
        assert torch.equal(w[1][k], w[3][k]), k
    # ... and differs from drawing in the training process (other batches), which is recorded
    plain = _weights(
        train(
            _sampler(vol),
            ModelConfig(size="small"),
            tmp_path / "p.safetensors",
            TrainConfig(**cfg),
            progress=False,
        )
    )
    assert any(not torch.equal(plain[k], w[1][k]) for k in plain)
    with safe_open(str(tmp_path / "w3.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["pssr"])
    assert meta["training"]["config"]["loader_workers"] == 3


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_resume_with_loader_workers_is_bit_identical(vol, tmp_path):
    cfg = TrainConfig(steps=6, batch=2, val_every=3, ckpt_every=3, val_patches=2, seed=5, loader_workers=2)
    a = train(_sampler(vol), ModelConfig(size="small"), tmp_path / "a.safetensors", cfg, progress=False)
    train(
        _sampler(vol),
        ModelConfig(size="small"),
        tmp_path / "b.safetensors",
        cfg,
        progress=False,
        callback=lambda step, info: step < 3,
    )
    ckpt = tmp_path / "b.ckpt.safetensors"
    b = train(
        _sampler(vol), ModelConfig(size="small"), tmp_path / "b.safetensors", cfg, progress=False, resume=ckpt
    )
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_bad_loader_workers_is_a_clear_error(bad):
    with pytest.raises(PssrError, match=r"loader_workers=.*--loader-workers"):
        TrainConfig(steps=2, loader_workers=bad)


def test_cli_loader_workers(isbi_path, tmp_path, capsys):
    from pssr.cli.app import main

    out = tmp_path / "m.safetensors"
    rc = main(
        ["-q", "train", str(isbi_path), "--out", str(out), "--steps", "2", "--batch", "2", "--patch", "16",
         "--size", "small", "--preset", "pssr-em", "--loader-workers", "2"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["pssr"])["training"]["config"]["loader_workers"] == 2


class _DiesInWorkers:
    """An array that kills the process reading it, except in the training process (a stand-in for
    a worker killed by the OOM killer)."""

    def __init__(self, a, parent):
        self.a, self.parent = a, parent
        self.shape, self.ndim, self.dtype = a.shape, a.ndim, a.dtype

    def __getitem__(self, idx):
        import os

        if os.getpid() != self.parent:
            os._exit(7)
        return self.a[idx]


def test_a_dead_worker_is_a_clear_error_not_a_hang(vol, tmp_path):
    import os

    s = PairSampler(
        [Source(_DiesInWorkers(vol, os.getpid()), "isbi")], 4, crappifier=get_preset("pssr-em", 4), patch=16
    )
    cfg = TrainConfig(steps=4, batch=2, val_every=2, ckpt_every=2, val_patches=2, loader_workers=2)
    with pytest.raises(PssrError, match="--loader-workers process died .* fewer --loader-workers"):
        train(s, ModelConfig(size="small"), tmp_path / "m.safetensors", cfg, progress=False)


def test_resume_in_the_other_loader_mode_is_refused(vol, tmp_path):
    cfg = TrainConfig(steps=6, batch=2, val_every=3, ckpt_every=3, val_patches=2, seed=5)
    stop = dict(progress=False, callback=lambda step, info: step < 3)
    train(_sampler(vol), ModelConfig(size="small"), tmp_path / "a.safetensors", cfg, **stop)
    with pytest.raises(PssrError, match="written with --loader-workers 0; resume with --loader-workers 0"):
        train(
            _sampler(vol),
            ModelConfig(size="small"),
            tmp_path / "a.safetensors",
            TrainConfig(**{**cfg.__dict__, "loader_workers": 2}),
            progress=False,
            resume=tmp_path / "a.ckpt.safetensors",
        )


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_ctrl_c_in_a_terminal_checkpoints_and_exits(isbi, tmp_path):
    """SIGINT to the whole process group (what Ctrl-C does) reaches the workers too: training must
    still write its checkpoint and exit (it once hung on the pool's lock)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import tifffile

    tifffile.imwrite(tmp_path / "vol.tif", isbi[:6, :160, :160])
    vol, out = str(tmp_path / "vol.tif"), str(tmp_path / "m.safetensors")
    cmd = [sys.executable, "-m", "pssr", "-q", "train", vol, "--axes", "ZYX", "--preset", "pssr-em",
           "--steps", "100000", "--patch", "16", "--batch", "2", "--size", "small", "--loader-workers", "2",
           "--ckpt-every", "100000", "--out", out]  # fmt: skip
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p = subprocess.Popen(cmd, start_new_session=True, **pipe)
    ckpt = tmp_path / "m.ckpt.safetensors"
    time.sleep(25)  # start-up, then some steps (a process that failed early shows in the asserts)
    os.killpg(p.pid, signal.SIGINT)
    try:
        out, _ = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("training did not exit within 60 s of Ctrl-C")
    assert p.returncode == 130, out[-2000:]
    assert "resume with --resume" in out and ckpt.exists()
