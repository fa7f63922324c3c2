"""``pssr plan``: blocks, sizes and a calibrated estimate before a run; a run that cannot fit is refused."""

import shutil
from collections import namedtuple

import numpy as np
import pytest
import zarr

from pssr.blockwise.predict import PredictError, restore
from pssr.cli.app import main


@pytest.fixture
def sparse(tmp_path):
    """A declared (4, 100000, 100000) uint8 volume with two stored chunks (a few KB on disk)."""
    z = zarr.open_array(
        str(tmp_path / "huge.zarr"), mode="w", shape=(4, 100000, 100000), chunks=(1, 256, 256), dtype="uint8"
    )
    rng = np.random.default_rng(0)
    z[0, :256, :256] = (rng.random((256, 256)) * 255).astype(np.uint8)
    z[2, 50000:50256, 256:512] = 9  # straddles two chunks along y
    return tmp_path / "huge.zarr"


def test_plan_counts_populated_blocks_of_a_declared_huge_volume(sparse, tmp_path, capsys):
    out = tmp_path / "h.ome.zarr"
    assert main(["plan", str(sparse), str(out), "--model", "bilinear:4", "--tile", "256"]) == 0
    text = capsys.readouterr().out
    # 4 planes x 391 x 391 blocks; blocks reading a stored chunk (halo 2 reaches the next block):
    # plane 0: 2 x 2, plane 2: 4 x 3
    assert "611524 (tile 256, halo 2): 16 populated, 611508 skipped" in text
    assert "(4, 400000, 400000) uint8, 4 level(s)" in text and "s per block on cpu" in text
    assert not out.exists()  # nothing written
    plan = restore(str(sparse), output=out, model="bilinear:4", tile=256, region="0:1,0:1024,0:1024",
                   dry_run=True, progress=False).summary  # fmt: skip
    assert (plan["blocks"], plan["blocks_populated"], plan["blocks_to_do"]) == (16, 4, 4)
    assert plan["output_shape"] == [1, 4096, 4096]
    # uncompressed uint8 HR of 4 blocks, pyramid 1 + 1/4 + 1/16 + 1/64
    assert plan["disk_needed_bytes"] == int(4 * 1024**2 * (1 + 1 / 4 + 1 / 16 + 1 / 64))
    assert plan["seconds_per_block"] > 0 and plan["peak_rss_bytes"] > 1e7 and not out.exists()


def test_a_run_whose_output_cannot_fit_is_refused_before_any_work(sparse, tmp_path, monkeypatch, capsys):
    out = tmp_path / "h.ome.zarr"
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 10**5, 10**5))
    with pytest.raises(PredictError, match=r"needs up to .* GB .* has 0.0001 GB free.*Nothing was written"):
        restore(str(sparse), output=out, model="bilinear:4", tile=256, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".*pssr*"))
    cmd = ["plan", str(sparse), str(out), "--model", "bilinear:4", "--tile", "256", "--region", "0:1,0:512"]
    assert main(cmd) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    monkeypatch.undo()
    r = restore(
        str(sparse), output=out, model="bilinear:4", tile=256, region="0:1,0:512,0:512", progress=False
    )
    assert r.summary["blocks"] == 4
