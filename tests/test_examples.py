"""The examples run on small inputs, so they cannot rot."""

import importlib.util
from pathlib import Path

import pytest
import tifffile

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _need_builtins():
    from pssr.nn.modelfile import builtin_models

    missing = {"em", "fluo", "fluo-mf"} - set(builtin_models())
    assert not missing, f"built-in models missing: {missing} (run scripts/train_builtin.py)"


def test_restore_em_volume(tmp_path, capsys):
    _load("restore_em_volume").main(
        [str(ROOT / "pssr" / "data" / "isbi_em_lr.tif"), str(tmp_path / "o.ome.zarr"), "--fidelity"]
    )
    out = capsys.readouterr().out
    assert "(4, 256, 256)" in out and "beyond 3 sigma" in out


def test_restore_timelapse_mf(tmp_path, capsys, data_dir):
    _load("restore_timelapse_mf").main(["--frames", "5", "--out", str(tmp_path / "t.tif")])
    out = capsys.readouterr().out
    assert "fluo-mf" in out and "bilinear" in out
    assert tifffile.imread(tmp_path / "t.tif").shape[0] == 5


@pytest.mark.slow
def test_batch_dask(tmp_path, capsys, isbi):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        tifffile.imwrite(src / f"sec{i}.tif", isbi[i, :64, :64])
    mod = _load("batch_dask")
    mod.main([str(src), str(tmp_path / "out"), "--workers", "2", "--tile", "32"])
    mod.main([str(src), str(tmp_path / "out"), "--workers", "2", "--tile", "32"])  # rerun: skips
    out = capsys.readouterr().out
    assert out.count("skip") == 2
    from pssr.io import formats as io

    assert io.read_image(tmp_path / "out" / "sec0.ome.zarr").shape == (256, 256)
