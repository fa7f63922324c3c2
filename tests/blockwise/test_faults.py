"""Fault injection: kill -9 at random block counts, a really full disk, two runs at once.

Each fault is followed by "run the same command again"; the result must equal an uninterrupted
run on every level and side array, pass ``verify_output``, and leave the input's bytes as they were.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pssr.blockwise import store as S
from pssr.blockwise.verify import verify_output
from pssr.io import formats as io

RUN = """
import sys, time
import pssr.blockwise.predict as P
import pssr.blockwise.store as S
src, model, out, tile, slow = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
orig = S.write_block
def write(*a, **k):
    rec = orig(*a, **k)
    time.sleep(slow)
    return rec
S.write_block = write
try:
    # disk_check=False: the disk must really fill up mid-run (the estimate would refuse it up front)
    P.restore(src, model=model, output=out, tile=tile, fidelity=True, progress=False, disk_check=False)
    print("ok")
except Exception as e:
    print(type(e).__name__, str(e).splitlines()[0])
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from pssr.degrade.crappify import get_preset
    from pssr.nn.model import ModelConfig, build_model
    from pssr.nn.modelfile import save_model

    torch.manual_seed(1)
    cfg = ModelConfig(scale=4, in_channels=1, size="small", widths=(8, 16), blocks=1)
    net = build_model(cfg)
    with torch.no_grad():
        net.out.weight.mul_(10)
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    return str(save_model(path, net, cfg, {"crappifier": get_preset("pssr-em", 4).to_dict()}))


@pytest.fixture(scope="module")
def src(isbi, tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    return io.write_tiff(d / "in.tif", isbi[:2, :64, :64], axes="ZYX")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _start(src, model, out, tile=16, slow=0.0):
    args = [sys.executable, "-c", RUN, str(src), str(model), str(out), str(tile), str(slow)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _all_arrays(out: Path) -> dict[str, np.ndarray]:
    if out.is_dir():
        g = zarr.open_group(str(out), mode="r")
        return {k: np.asarray(a[...]) for k, a in {**dict(g.arrays()), **S.open_arrays(out)}.items()}
    res = {"s0": tifffile.imread(out)}
    fid = out.with_name(out.name.replace(".tif", ".fidelity.tif"))
    res["fidelity"] = tifffile.imread(fid)
    return res


@pytest.fixture(scope="module")
def reference(src, tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    refs = {}
    for ext in (".ome.zarr", ".tif"):
        p = _start(src, tiny, d / f"ref{ext}")
        assert p.communicate(timeout=300)[0].strip() == "ok"
        refs[ext] = _all_arrays(d / f"ref{ext}")
    return refs


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
@pytest.mark.parametrize(("ext", "seed"), [(".ome.zarr", 0), (".tif", 1)])
def test_kill9_at_random_block_count_then_resume(src, tiny, reference, tmp_path, ext, seed):
    n_blocks = 2 * 4 * 4
    kill_at = int(np.random.default_rng(seed).integers(1, n_blocks - 5))
    out = tmp_path / f"o{ext}"
    work = out if ext == ".ome.zarr" else tmp_path / f".o{ext}.pssr-work.zarr"
    before = _sha(src)
    proc = _start(src, tiny, out, slow=0.05)
    t0 = time.time()
    while time.time() - t0 < 120:
        if len(S.done_blocks(str(work))) >= kill_at:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The dead run's lock is stale: the same command takes it over and finishes.
    again = _start(src, tiny, out)
    assert again.communicate(timeout=300)[0].strip() == "ok"
    got = _all_arrays(out)
    assert set(got) == set(reference[ext])
    for k in got:
        np.testing.assert_array_equal(got[k], reference[ext][k], err_msg=k)
    verify_output(out, progress=False)
    assert _sha(src) == before
    assert not list(tmp_path.glob(".*pssr*"))  # no work folder, no lock left


def _try_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_really_full_disk_then_resume_after_freeing_space(src, tiny, reference, tmp_path):
    disk = tmp_path / "disk"
    if not _try_tmpfs(disk, "300k"):
        pytest.skip("cannot mount a small tmpfs here; test_integrity simulates ENOSPC instead")
    try:
        out = disk / "o.tif"
        p = _start(src, tiny, out)
        line = p.communicate(timeout=300)[0].strip()
        assert line.startswith("OSError") and "No space left" in line, line
        assert not out.exists()  # never a half-written output passed off as complete
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = _start(src, tiny, out)
        assert again.communicate(timeout=300)[0].strip() == "ok"
        got = _all_arrays(out)
        for k in got:
            np.testing.assert_array_equal(got[k], reference[".tif"][k], err_msg=k)
        assert sorted(f.name for f in disk.iterdir()) == ["o.fidelity.json", "o.fidelity.tif", "o.tif"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
@pytest.mark.parametrize("ext", [".ome.zarr", ".tif"])
def test_two_concurrent_runs_one_wins_other_refused(src, tiny, reference, tmp_path, ext):
    out = tmp_path / f"o{ext}"
    procs = [_start(src, tiny, out, slow=0.02) for _ in range(2)]
    lines = sorted(p.communicate(timeout=300)[0].strip() for p in procs)
    assert lines[0].startswith("LockedError") and lines[1] == "ok", lines
    got = _all_arrays(out)
    for k in got:
        np.testing.assert_array_equal(got[k], reference[ext][k], err_msg=k)
    verify_output(out, progress=False)
