"""Where the time of a GPU restore goes (issue 13): cProfile of pssr.restore on the GPU, tile sizes, dask.

    python benchmarks/gpu_profile.py --out DIR [--size 2048]

Same input as bench_gpu.py (a real ssTEM section tiled to size x size, TIFF -> x4 OME-Zarr, `em`).
Runs: one warm-up; restore under cProfile (top functions by own time and by cumulative time);
restore with the automatic tile and with --tile 512 / 1024; restore with dask workers=1 and 2.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=2048)
    args = ap.parse_args()
    import tifffile

    from pssr import restore

    args.out.mkdir(parents=True, exist_ok=True)
    td = Path(tempfile.mkdtemp())
    tif = td / "in.tif"
    tifffile.imwrite(tif, _bench.em_section(args.size))
    res: dict = {}

    def run(tag: str, **kw) -> float:
        out = td / f"{tag}.ome.zarr"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        r = restore(str(tif), model="em", output=str(out), progress=False, **kw)
        dt = time.perf_counter() - t0
        res[tag] = {"seconds": dt, "summary": {k: r.summary.get(k) for k in ("device", "blocks", "seconds")}}
        print(tag, res[tag], flush=True)
        return dt

    run("warm-up")
    prof = cProfile.Profile()
    prof.enable()
    run("profiled")
    prof.disable()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(30)
        (args.out / f"profile-{key}.txt").write_text(buf.getvalue())
        print(buf.getvalue()[-6000:] if key == "tottime" else "", flush=True)
    for tile in (None, 512, 1024):
        run(f"tile {tile or 'auto'}", tile=tile)
    for w in (1, 2):
        run(f"dask workers={w} warm-up", workers=w)
        run(f"dask workers={w}", workers=w)
    (args.out / "profile.json").write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
