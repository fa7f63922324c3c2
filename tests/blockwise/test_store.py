"""The work store: a killed run resumes to the same bytes; other settings are refused; relative paths."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from pssr.blockwise.predict import PredictError, restore
from pssr.blockwise.store import done_blocks
from pssr.io import formats as io

RUN_SCRIPT = """
import sys, time
import pssr.blockwise.engine as E
import pssr.blockwise.predict as P
import pssr.blockwise.store as S
slow = sys.argv[4] == "slow"
orig_p, orig_w = E.process_blocks, S.write_block
counts = {"computed": 0, "written": 0}
def w(*a, **k):
    rec = orig_w(*a, **k)
    counts["written"] += 1
    if slow:
        time.sleep(0.3)
    return rec
def p(arr, pred, job, blocks):
    counts["computed"] += len(blocks)
    return orig_p(arr, pred, job, blocks)
S.write_block, E.process_blocks = w, p
P.restore(sys.argv[1], model=sys.argv[2], output=sys.argv[3], tile=32, progress=False)
print(counts["computed"], counts["written"])
"""


def _run(src, model, out, mode):
    args = [sys.executable, "-c", RUN_SCRIPT, str(src), str(model), str(out), mode]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_sigkill_then_same_command_resumes_identically(model_path, isbi, tmp_path):
    src = io.write_tiff(tmp_path / "in.tif", isbi[:2, :160, :160], axes="ZYX")
    out = tmp_path / "o.ome.zarr"
    proc = _run(src, model_path, out, "slow")
    t0 = time.time()
    while time.time() - t0 < 120:
        if len(done_blocks(str(out))) >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(done_blocks(str(out)))
    assert 0 < n_done < 50  # 2 planes x 5 x 5 blocks
    assert zarr.open_group(str(out), mode="r").attrs["pssr"]["status"] == "running"
    # The same command again finishes the job ...
    again = _run(src, model_path, out, "fast")
    computed, written = map(int, again.communicate(timeout=300)[0].split())
    assert again.returncode == 0
    assert written == 50 - n_done  # finished blocks are never written again
    assert computed <= 50 - n_done + 3  # at most the rest of the batch that was in flight
    assert zarr.open_group(str(out), mode="r").attrs["pssr"]["status"] == "complete"
    # ... and the result is identical to an uninterrupted run of that command.
    ref = _run(src, model_path, tmp_path / "ref.ome.zarr", "fast")
    ref.communicate(timeout=300)
    np.testing.assert_array_equal(
        np.asarray(io.read_image(out).data[...]),
        np.asarray(io.read_image(tmp_path / "ref.ome.zarr").data[...]),
    )


def test_resume_with_other_settings_refused(model_path, isbi, tmp_path):
    src = io.write_tiff(tmp_path / "in.tif", isbi[0, :64, :64], axes="YX")
    out = tmp_path / "o.ome.zarr"
    stop = lambda done, total: False  # cancel after the first block  # noqa: E731
    with pytest.raises(InterruptedError):
        restore(str(src), model=model_path, output=out, tile=32, progress=False, callback=stop)
    with pytest.raises(PredictError, match=r"used other settings or inputs \(tile 32 -> 64\)"):
        restore(str(src), model=model_path, output=out, tile=64, resume=True, progress=False)
    restore(str(src), model=model_path, output=out, tile=32, resume=True, progress=False)


def test_same_relative_command_resumes(model_path, isbi, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    io.write_tiff("in.tif", isbi[0, :64, :64], axes="YX")
    with pytest.raises(InterruptedError):
        restore(
            "in.tif",
            model=model_path,
            output="o.ome.zarr",
            tile=32,
            progress=False,
            callback=lambda done, total: False,
        )
    r = restore("in.tif", model=model_path, output="o.ome.zarr", tile=32, progress=False)
    assert r.summary["blocks"] == 4
    assert zarr.open_group("o.ome.zarr", mode="r").attrs["pssr"]["status"] == "complete"


def test_overwrite_never_deletes_a_folder_pssr_did_not_write(tmp_path, em_lr):
    lr = em_lr[:2, :48, :48]
    foreign = tmp_path / "raw.ome.zarr"  # e.g. a mistyped output name that is someone's raw data
    foreign.mkdir()
    (foreign / "important.txt").write_text("precious")
    with pytest.raises(PredictError, match="not a pssr output"):
        restore(lr, model="bilinear:2", output=foreign, overwrite=True, progress=False)
    assert (foreign / "important.txt").read_text() == "precious"
    as_tif = tmp_path / "dir.tif"  # a folder where a TIFF output should go
    as_tif.mkdir()
    (as_tif / "x").write_text("keep")
    with pytest.raises(PredictError, match="not a pssr output"):
        restore(lr, model="bilinear:2", output=as_tif, overwrite=True, progress=False)
    assert (as_tif / "x").read_text() == "keep"
    ours = tmp_path / "ours.ome.zarr"  # a pssr output, an empty folder: replaced
    restore(lr, model="bilinear:2", output=ours, progress=False)
    restore(lr, model="bilinear:2", output=ours, overwrite=True, progress=False)
    (tmp_path / "empty.ome.zarr").mkdir()
    restore(lr, model="bilinear:2", output=tmp_path / "empty.ome.zarr", overwrite=True, progress=False)


def test_corrupt_metadata_of_an_interrupted_output_names_it(tmp_path, em_lr):
    out = tmp_path / "o.ome.zarr"
    lr = em_lr[:2, :64, :64]
    with pytest.raises(InterruptedError):
        restore(lr, model="bilinear:2", output=out, tile=16, progress=False, callback=lambda d, n: d < 3)
    (out / "s0" / "zarr.json").write_bytes(b"\x93\x00garbage")
    with pytest.raises(PredictError, match=r"is damaged .* pass --overwrite"):
        restore(lr, model="bilinear:2", output=out, tile=16, progress=False)
    restore(lr, model="bilinear:2", output=out, tile=16, overwrite=True, progress=False)


def _to_old_layout(out, *, running: bool) -> None:
    """Lay a pssr output out as pssr 0.1 did: its bookkeeping inside the image group."""
    book = out / ".pssr"
    for name in ("fidelity", "uncertainty"):
        if (book / name).exists():
            os.replace(book / name, out / name)
    if running:
        os.replace(book / "done", out / ".pssr_done")
    else:
        os.replace(book / "checksums", out / "pssr_checksums")
        g = zarr.open_group(str(out), mode="r+")
        g.attrs["pssr"] = {**g.attrs["pssr"], "checksums": "pssr_checksums"}
    book.rmdir()


def _image_group_arrays(out) -> list[str]:
    import warnings

    with warnings.catch_warnings():  # zarr warns that .pssr is no zarr node: that is the point
        warnings.simplefilter("ignore")
        g = zarr.open_group(str(out), mode="r")
        return sorted(g.array_keys()) + sorted(g.group_keys())


def test_image_group_holds_only_the_image_and_old_outputs_still_verify_and_resume(model_path, isbi, tmp_path):
    from pssr.blockwise import store
    from pssr.blockwise.integrity import IntegrityError
    from pssr.blockwise.verify import verify_output

    x = isbi[0, :64, :128]
    kw = dict(model=model_path, tile=32, fidelity=True, tta=True, noise="model", progress=False)
    ref = tmp_path / "ref.ome.zarr"
    restore(x, output=ref, **kw)
    # What readers see (napari's built-in reader opens every array and the first subgroup).
    assert _image_group_arrays(ref) == ["s0", "s1"]
    assert sorted(p.name for p in (ref / ".pssr").iterdir()) == ["checksums", "fidelity", "uncertainty"]
    want = {k: np.asarray(a[...]) for k, a in store.open_arrays(ref).items()}
    assert set(want) == {"s0", "fidelity", "uncertainty"}

    # A complete output of the old layout verifies, its side arrays checked against their checksums.
    _to_old_layout(ref, running=False)
    assert verify_output(ref, progress=False)["blocks"] == 8
    fid = zarr.open_group(str(ref), mode="r+")["fidelity"]
    fid[40, 40] = fid[40, 40] + 1.0
    with pytest.raises(IntegrityError, match=r"fidelity block at y 32:64 x 32:64"):
        verify_output(ref, progress=False)

    # An interrupted output of the old layout resumes to the same bytes, in the new layout.
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(InterruptedError):
        restore(x, output=out, callback=lambda done, total: done < 2, **kw)
    _to_old_layout(out, running=True)
    assert 0 < len(list((out / ".pssr_done").iterdir())) < 8
    restore(x, output=out, **kw)
    assert _image_group_arrays(out) == ["s0", "s1"]
    assert not (out / ".pssr_done").exists() and not (out / "fidelity").exists()
    got = {k: np.asarray(a[...]) for k, a in store.open_arrays(out).items()}
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert verify_output(out, progress=False)["blocks"] == 8
