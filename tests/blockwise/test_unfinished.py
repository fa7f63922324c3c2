"""An interrupted pssr output is never read as if complete (issue 26, item 1).

Every reader of images (``read_image``: predict, crappify, evaluate, train, fit-noise; the napari
reader) refuses an output whose status is not ``complete``, naming the status and the command
that finishes it: the OME-Zarr group, each of its arrays opened by path, a TIFF output's work
store and its arrays, a TIFF output whose files are being moved into place, and one that was never
written.  Complete outputs read as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import pssr.blockwise.store as S
from pssr.blockwise.predict import restore
from pssr.cli.app import main
from pssr.errors import PssrIOError
from pssr.io import formats as io


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(0)
    return io.write_tiff(d / "in.tif", rng.integers(0, 255, (2, 48, 48), dtype=np.uint8), axes="ZYX")


def _cancel_after(n):
    def cb(done, total):
        return done < n

    return cb


@pytest.fixture(scope="module")
def unfinished_zarr(src, model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("o") / "kx.ome.zarr"
    with pytest.raises(InterruptedError):
        restore(src, model=model_path, output=out, tile=16, fidelity=True, progress=False,
                callback=_cancel_after(2))  # fmt: skip
    assert zarr.open_group(str(out), mode="r").attrs["pssr"]["status"] == "running"
    return out


@pytest.fixture(scope="module")
def unfinished_tiff(src, model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "kt.tif"
    orig, n = S.write_block, [0]

    def write(*a, **k):
        n[0] += 1
        if n[0] > 2:
            raise OSError("simulated crash")
        return orig(*a, **k)

    S.write_block = write
    try:
        with pytest.raises(OSError):
            restore(src, model=model_path, output=out, tile=16, fidelity=True, progress=False)
    finally:
        S.write_block = orig
    work = out.with_name(f".{out.name}.pssr-work.zarr")
    assert work.is_dir() and not out.exists()
    return out


def _refused(path, *words):
    with pytest.raises(PssrIOError) as e:
        io.read_image(path)
    msg = str(e.value)
    assert "status 'running'" in msg or "status 'finishing'" in msg, msg
    assert "pssr predict" in msg and "--tile 16" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("sub", ["", "s0", ".pssr/fidelity"])
def test_unfinished_ome_zarr_refused_on_every_array(unfinished_zarr, sub):
    p = unfinished_zarr / sub if sub else unfinished_zarr
    msg = _refused(p, str(unfinished_zarr))
    assert "--fidelity" in msg


def test_unfinished_ome_zarr_refused_after_pyramid_and_metadata(unfinished_zarr, tmp_path):
    """A run killed between finish_zarr (levels, NGFF metadata) and mark_complete is not complete."""
    import shutil

    out = tmp_path / "fin.ome.zarr"
    shutil.copytree(unfinished_zarr, out)
    g = zarr.open_group(str(out), mode="r+")
    g.create_array("s1", shape=(2, 48, 48), dtype="uint8")
    for sub in ("", "s0", "s1"):
        _refused(out / sub if sub else out)


@pytest.mark.parametrize("sub", [None, "", "s0", ".pssr/fidelity"])
def test_unfinished_tiff_refused(unfinished_tiff, sub):
    work = unfinished_tiff.with_name(f".{unfinished_tiff.name}.pssr-work.zarr")
    if sub is None:
        msg = _refused(unfinished_tiff, "interrupted before it was written")
        assert f"{unfinished_tiff}" in msg
    else:
        msg = _refused(work / sub if sub else work)
        assert f" {unfinished_tiff} " in msg  # the command names the TIFF output, not the work store


@pytest.mark.parametrize("side", ["kt.tif", "kt.fidelity.tif"])
def test_tiff_being_finished_refused(unfinished_tiff, tmp_path, side):
    """Files of a TIFF output whose work store says 'finishing' (moved into place) are refused."""
    import shutil

    work = unfinished_tiff.with_name(f".{unfinished_tiff.name}.pssr-work.zarr")
    out = tmp_path / "kt.tif"
    shutil.copytree(work, tmp_path / work.name)
    g = zarr.open_group(str(tmp_path / work.name), mode="r+")
    g.attrs["pssr"] = {**dict(g.attrs["pssr"]), "status": "finishing"}
    io.write_tiff(tmp_path / side, np.zeros((2, 8, 8), np.float32), axes="ZYX")
    _refused(tmp_path / side, "moved into place")
    assert out.name == "kt.tif"


def test_old_tiff_beside_a_running_replacement_is_readable(unfinished_tiff, tmp_path):
    """--overwrite keeps the previous, complete TIFF until the new one replaces it: it stays readable."""
    import shutil

    work = unfinished_tiff.with_name(f".{unfinished_tiff.name}.pssr-work.zarr")
    shutil.copytree(work, tmp_path / work.name)
    io.write_tiff(tmp_path / "kt.tif", np.ones((2, 8, 8), np.float32), axes="ZYX")
    assert io.read_image(tmp_path / "kt.tif").data.sum() == 128


def test_complete_output_reads(src, model_path, tmp_path):
    out = tmp_path / "ok.ome.zarr"
    restore(src, model=model_path, output=out, tile=16, progress=False)
    assert io.read_image(out).shape == (2, 96, 96)
    assert io.read_image(out / "s0").shape == (2, 96, 96)


@pytest.mark.parametrize(
    "argv",
    [
        ["crappify", "{p}/s0", "{t}/cr.tif"],
        ["crappify", "{p}", "{t}/cr.ome.zarr"],
        ["fit-noise", "{p}/s0"],
        ["evaluate", "{p}/s0", "--model", "{m}"],
        ["predict", "{p}/s0", "{t}/r.tif", "--model", "{m}"],
        ["train", "{p}/s0", "--out", "{t}/m.safetensors", "--preset", "em", "--steps", "1"],
    ],
)
def test_every_command_refuses_an_unfinished_input(unfinished_zarr, model_path, tmp_path, capsys, argv):
    argv = [a.format(p=unfinished_zarr, t=tmp_path, m=model_path) for a in argv]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert "unfinished pssr restoration" in err and "status 'running'" in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_napari_reader_refuses_unfinished(unfinished_zarr):
    from napari_pssr._reader import get_reader, ome_zarr_layer_data

    for p in (unfinished_zarr, unfinished_zarr / "s0"):
        reader = get_reader(str(p))
        assert reader is not None  # ours, so that napari's own reader does not show zeros
        with pytest.raises(PssrIOError, match="status 'running'"):
            reader(str(p))
    with pytest.raises(PssrIOError, match="unfinished"):
        ome_zarr_layer_data(str(unfinished_zarr))


def test_restore_refuses_an_unfinished_zarr_array_object(unfinished_zarr, model_path, tmp_path):
    arr = zarr.open_array(str(unfinished_zarr / "s0"), mode="r")
    with pytest.raises(PssrIOError, match="status 'running'"):
        restore(arr, model=model_path, tile=16, progress=False)


def test_status_is_read_from_zarr_json(tmp_path):
    """Any pssr status other than complete is refused (a future 'finishing' too); no status passes."""
    g = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    g.create_array("x", shape=(8, 8), dtype="f4")
    io.read_image(tmp_path / "a.zarr" / "x")
    g.attrs["pssr"] = {"status": "complete"}
    io.read_image(tmp_path / "a.zarr" / "x")
    g.attrs["pssr"] = {"status": "whatever", "job": {"input": "i.tif", "tile": 16}}
    with pytest.raises(PssrIOError, match="status 'whatever'"):
        io.read_image(tmp_path / "a.zarr" / "x")
    assert json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())["attributes"]["pssr"]
    assert Path(tmp_path / "a.zarr").is_dir()


# ------------------------------------------------------------------ item 3: an input's container
@pytest.fixture()
def ome_input(tmp_path):
    rng = np.random.default_rng(1)
    return io.write_ome_zarr(tmp_path / "in.ome.zarr", rng.random((64, 64), np.float32), axes="YX")


@pytest.mark.parametrize(
    "out",
    ["in.ome.zarr/s9.ome.zarr", "in.ome.zarr/s0/x.tif", "in.ome.zarr/sub/deeper/o.ome.zarr", "in.ome.zarr"],
)
def test_crappify_never_writes_inside_the_input_container(ome_input, tmp_path, capsys, out):
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert main(["-q", "crappify", str(ome_input / "s0"), str(tmp_path / out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "in.ome.zarr" in err and ("container" in err or "input" in err), err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_predict_never_writes_inside_the_input_container(ome_input, model_path, tmp_path):
    from pssr.errors import IntegrityError

    for out in ("in.ome.zarr/s9.ome.zarr", "in.ome.zarr/s1/r.tif"):
        with pytest.raises(IntegrityError, match="zarr container"):
            restore(ome_input / "s0", model=model_path, output=tmp_path / out, tile=16, progress=False)
    assert not (tmp_path / "in.ome.zarr" / "s9.ome.zarr").exists()


def test_nothing_written_in_a_tiff_inputs_work_folder(tmp_path, capsys):
    src = io.write_tiff(tmp_path / "a.tif", np.ones((32, 32), np.float32), axes="YX")
    (tmp_path / ".a.tif.pssr-work.zarr").mkdir()
    out = tmp_path / ".a.tif.pssr-work.zarr" / "x.tif"
    assert main(["-q", "crappify", str(src), str(out)]) == 2
    assert "work folder" in capsys.readouterr().err
    assert not out.exists()


def test_train_out_inside_the_input_container(ome_input, capsys):
    out = ome_input / "m.safetensors"
    assert main(["-q", "train", str(ome_input / "s0"), "--out", str(out), "--preset", "em"]) == 2
    assert "container" in capsys.readouterr().err
    assert not out.exists()


def test_sibling_outputs_still_allowed(ome_input, tmp_path):
    out = tmp_path / "in2.ome.zarr"
    assert main(["-q", "crappify", str(ome_input / "s0"), str(out), "--scale", "2"]) == 0


def test_an_outputs_side_array_as_input_guards_the_whole_output(src, model_path, tmp_path):
    """Input out.ome.zarr/.pssr/fidelity: nothing may be written anywhere in out.ome.zarr."""
    from pssr.errors import IntegrityError

    out = tmp_path / "done.ome.zarr"
    restore(src, model=model_path, output=out, tile=16, fidelity=True, progress=False)
    fid = out / ".pssr" / "fidelity"
    assert fid.is_dir()
    assert main(["-q", "crappify", str(fid), str(out / "x.ome.zarr"), "--scale", "2"]) == 2
    with pytest.raises(IntegrityError, match="zarr container"):
        restore(fid, model=model_path, output=out / "r.tif", tile=16, progress=False)
    assert not (out / "x.ome.zarr").exists() and not (out / "r.tif").exists()
