"""``pssr verify`` of TIFF outputs and side files, and ``--overwrite`` that keeps the old result
until the new one replaces it (issue 26, items 2 and 4), on every level of every output kind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import pssr.blockwise.store as S
from pssr.blockwise.predict import restore
from pssr.blockwise.verify import verify_output
from pssr.cli.app import main
from pssr.errors import IntegrityError
from pssr.io import formats as io


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(0)
    return io.write_tiff(d / "in.tif", rng.integers(0, 255, (2, 40, 40), dtype=np.uint8), axes="ZYX")


@pytest.fixture(scope="module")
def tiff_out(src, model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("o") / "r.tif"
    restore(src, model=model_path, output=out, tile=16, fidelity=True, tta=True, progress=False)
    return out


def _files(out: Path) -> list[Path]:
    st = out.name[: -len(".tif")]
    return [out, *(out.with_name(st + s) for s in (".fidelity.tif", ".uncertainty.tif", ".fidelity.json"))]


def _copy(out: Path, dst: Path) -> Path:
    import shutil

    for f in _files(out):
        shutil.copy2(f, dst / f.name)
    return dst / out.name


def test_verify_tiff_output_checks_every_block_and_side_file(tiff_out, capsys):
    r = verify_output(tiff_out, progress=False)
    assert r["files"] == 3  # output, fidelity, uncertainty
    n_blocks = 2 * 3 * 3  # 2 planes of 40x40 in 16-px tiles
    assert r["blocks"] == 3 * n_blocks
    assert main(["-q", "verify", str(tiff_out)]) == 0
    assert "ok:" in capsys.readouterr().out
    for f in _files(tiff_out)[1:3]:
        assert verify_output(f, progress=False)["files"] == 1


def _edit_tiff(p: Path, page: int, y: int, x: int) -> None:
    """Change one pixel of a page, keeping every tag (the pssr record included), as an editor would."""
    with tifffile.TiffFile(p) as tif:
        data = tif.series[0].asarray()
        ij = dict(tif.imagej_metadata or {})
    flat = data.reshape((-1, *data.shape[-2:]))
    flat[page, y, x] = flat[page, y, x] + (1 if data.dtype.kind in "ui" else 0.5)
    meta = {"axes": "ZYX", "Info": ij["Info"]}
    tifffile.imwrite(p, flat.reshape(data.shape), imagej=True, metadata=meta)


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize(("page", "y", "x", "block"), [(0, 0, 0, "y 0:"), (1, 79, 79, "Z=1")])
def test_verify_detects_an_edit_of_any_tiff_file(tiff_out, tmp_path, which, page, y, x, block):
    out = _copy(tiff_out, tmp_path)
    f = _files(out)[which]
    if which == 1:  # the fidelity map is LR-sized (40x40)
        y, x = y // 2, x // 2
    _edit_tiff(f, page, y, x)
    with pytest.raises(IntegrityError, match="does not match the checksum") as e:
        verify_output(out, progress=False)
    assert block in str(e.value)
    with pytest.raises(IntegrityError, match="does not match the checksum"):
        verify_output(f, progress=False)


def test_verify_detects_a_changed_fidelity_summary_or_a_side_file_of_another_run(
    tiff_out, src, model_path, tmp_path
):
    out = _copy(tiff_out, tmp_path)
    js = _files(out)[3]
    js.write_text(js.read_text().replace("0", "1", 1))
    with pytest.raises(IntegrityError, match="fidelity summary"):
        verify_output(out, progress=False)
    other = tmp_path / "o2"
    other.mkdir()
    restore(src, model=model_path, output=other / "r.tif", tile=16, fidelity=True, tta=True, progress=False)
    out = _copy(tiff_out, tmp_path)  # fresh copy, then a side file from another run of the same command
    (other / "r.uncertainty.tif").replace(tmp_path / "r.uncertainty.tif")
    with pytest.raises(IntegrityError, match="another run"):
        verify_output(out, progress=False)
    with pytest.raises(IntegrityError, match="another run"):
        verify_output(tmp_path / "r.uncertainty.tif", progress=False)
    _files(out)[1].unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verify_output(out, progress=False)


def test_verify_refuses_a_tiff_pssr_did_not_write(tmp_path, capsys):
    p = tmp_path / "foreign.tif"
    tifffile.imwrite(p, np.zeros((4, 8, 8), np.uint16))
    with pytest.raises(IntegrityError, match="not a pssr output: nothing to verify against"):
        verify_output(p, progress=False)
    assert main(["-q", "verify", str(p)]) == 2
    assert "not a pssr output: nothing to verify against" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, np.int16])
def test_crappify_and_write_tiff_outputs_are_verifiable(tmp_path, dtype):
    data = (np.random.default_rng(2).random((3, 17, 23)) * 200).astype(dtype)
    p = io.write_tiff(tmp_path / "a.tif", data, axes="ZYX")
    assert verify_output(p, progress=False)["blocks"] == 3
    _edit_tiff(p, 2, 16, 22)
    with pytest.raises(IntegrityError, match="Z=2"):
        verify_output(p, progress=False)


def test_crappify_cli_output_verifies(src, tmp_path):
    out = tmp_path / "lr.tif"
    assert main(["-q", "crappify", str(src), str(out), "--scale", "2"]) == 0
    assert main(["-q", "verify", str(out)]) == 0


def test_float64_output_checksums_follow_the_conversion(src, model_path, tmp_path):
    """A float64 work store is written as float32: the TIFF's checksums are of what it holds."""
    data = io.read_image(src).data.astype(np.float64)
    out = tmp_path / "f.tif"
    restore(data, axes="ZYX", model=model_path, output=out, tile=16, dtype="float32", progress=False)
    assert verify_output(out, progress=False)["blocks"] == 18


# -------------------------------------------------------------------------- item 4: --overwrite
def _fail_after(n):
    orig, count = S.write_block, [0]

    def write(*a, **k):
        count[0] += 1
        if count[0] > n:
            raise OSError("simulated crash")
        return orig(*a, **k)

    return orig, write


@pytest.mark.parametrize("ext", [".tif", ".ome.zarr"])
def test_overwrite_keeps_the_old_result_until_the_new_one_replaces_it(src, model_path, tmp_path, ext):
    out = tmp_path / f"o{ext}"
    restore(src, model=model_path, output=out, tile=16, fidelity=True, progress=False)
    old = {k: np.asarray(v) for k, v in _arrays(out).items()}
    orig, write = _fail_after(3)
    S.write_block = write
    try:
        with pytest.raises(OSError, match="simulated crash"):
            restore(src, model=model_path, output=out, tile=8, fidelity=True, overwrite=True, progress=False)
    finally:
        S.write_block = orig
    # The old result is intact, complete, readable by every command and verifies.
    now = _arrays(out)
    assert set(now) == set(old)
    for k in old:
        np.testing.assert_array_equal(now[k], old[k], err_msg=k)
    verify_output(out, progress=False)
    assert io.read_image(out).shape == (2, 80, 80)
    # The same command again resumes the new run and replaces the old result.
    restore(src, model=model_path, output=out, tile=8, fidelity=True, overwrite=True, progress=False)
    verify_output(out, progress=False)
    assert _job(out)["tile"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work store, staged file, lock


def _arrays(out: Path) -> dict[str, np.ndarray]:
    if out.is_dir():
        g = zarr.open_group(str(out), mode="r")
        return {k: np.asarray(a[...]) for k, a in g.arrays() if k != "pssr_checksums"}
    return {"s0": tifffile.imread(out), "fidelity": tifffile.imread(_files(out)[1])}


def _job(out: Path) -> dict:
    if out.is_dir():
        return dict(zarr.open_group(str(out), mode="r").attrs)["pssr"]["job"]
    g = io.tiff_record(out)
    assert g is not None
    grid = g["grid"][0]
    return {"tile": grid // 2}


def test_overwrite_without_fidelity_drops_the_old_side_files_only_at_the_end(src, model_path, tmp_path):
    out = tmp_path / "o.tif"
    restore(src, model=model_path, output=out, tile=16, fidelity=True, tta=True, progress=False)
    (tmp_path / "o.notes.txt").write_text("mine")
    restore(src, model=model_path, output=out, tile=16, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.notes.txt", "o.tif"]
    verify_output(out, progress=False)


def test_an_interrupted_move_into_place_is_finished_by_the_same_command(
    src, model_path, tmp_path, monkeypatch
):
    """A kill after the first file replaced the old one: readers refuse the mix; rerun completes it."""
    import os

    out = tmp_path / "o.tif"
    restore(src, model=model_path, output=out, tile=16, fidelity=True, progress=False)
    real, calls = os.replace, [0]

    def replace(a, b):
        calls[0] += 1
        if str(b).endswith(".fidelity.tif") and ".pssr-new" in str(a):
            raise KeyboardInterrupt  # killed between the two renames
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        restore(src, model=model_path, output=out, tile=8, fidelity=True, overwrite=True, progress=False)
    monkeypatch.setattr(os, "replace", real)
    for f in (out, _files(out)[1]):
        with pytest.raises(io.PssrIOError, match="status 'finishing'"):
            io.read_image(f)
    with pytest.raises(IntegrityError, match="another run"):
        verify_output(out, progress=False)
    restore(src, model=model_path, output=out, tile=8, fidelity=True, overwrite=True, progress=False)
    verify_output(out, progress=False)
    io.read_image(_files(out)[1])


def test_fidelity_json_is_the_recorded_one(tiff_out):
    rec = io.tiff_record(tiff_out)
    assert rec is not None
    js = _files(tiff_out)[3]
    assert hashlib.sha256(js.read_bytes()).hexdigest() == rec["fidelity_json"]["sha256"]
    assert json.loads(js.read_text())["blocks"] == 18
