"""Out-of-core restoration throughput and peak memory, 1x vs 8x volume, 1 vs 2 workers.

    python benchmarks/bench_predict.py [--model em] [--planes 4] [--size 256] [--out FILE.md]

Builds an EM-like uint8 zarr volume from the real ISBI ssTEM stack (tiling and flipping
its sections to the requested size) as the low-resolution input, then restores it into
OME-Zarr with the model and, through the identical I/O path, with plain bilinear
upsampling (the I/O-bound reference), each run in a fresh process whose peak RSS (its
own plus any dask worker processes, sampled every 0.1 s) is recorded.  The "8x" volume
has 8 times as many sections as the "1x" one; peak memory should not grow with it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ISBI = ROOT.parent / "shared" / "data" / "em" / "isbi2012_sstem_train.tif"

CHILD = r"""
import json, sys, threading, time, psutil
from pssr.blockwise.predict import restore
proc = psutil.Process()
peak = [0]
def sample():
    while True:
        rss = proc.memory_info().rss
        for c in proc.children(recursive=True):
            try:
                rss += c.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], rss)
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
src, out, model, workers, tile = sys.argv[1:6]
t0 = time.perf_counter()
r = restore(src, model=model, output=out, workers=int(workers) or None, tile=int(tile) or None,
            progress=False, empty_threshold=0)
dt = time.perf_counter() - t0
time.sleep(0.15)
print(json.dumps({"seconds": dt, "peak_rss": peak[0], "blocks": r.summary["blocks"]}))
"""


def make_volume(path: Path, planes: int, size: int) -> None:
    import tifffile
    import zarr

    isbi = tifffile.imread(ISBI)
    z = zarr.create_array(
        str(path), shape=(planes, size, size), chunks=(1, min(size, 256), min(size, 256)), dtype="uint8"
    )
    for i in range(planes):
        sec = isbi[i % len(isbi)]
        if (i // len(isbi)) % 2:
            sec = sec[:, ::-1]
        reps = -(-size // sec.shape[0])
        tiled = np.tile(np.concatenate([sec, sec[::-1]], 0), (reps, reps))[:size, :size]
        z[i] = tiled


def run(src: Path, out: Path, model: str, workers: int, tile: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(out), model, str(workers), str(tile)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="em")
    ap.add_argument("--planes", type=int, default=4, help="sections of the 1x volume")
    ap.add_argument("--size", type=int, default=256, help="LR section size (pixels)")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        for mult in (1, 8):
            vol = td / f"vol{mult}.zarr"
            make_volume(vol, args.planes * mult, args.size)
            for workers in (0, 2):
                for model in (args.model, "bilinear:4"):
                    out = td / f"out-{mult}-{workers}-{model.replace(':', '')}.ome.zarr"
                    res = run(vol, out, model, workers, args.tile)
                    vox = args.planes * mult * (args.size * 4) ** 2
                    rows.append(
                        {
                            "volume": f"{mult}x ({args.planes * mult}x{args.size}x{args.size} in)",
                            "workers": workers or 1,
                            "engine": "local" if not workers else "LocalCluster",
                            "model": model,
                            "mvox_s": vox / res["seconds"] / 1e6,
                            "peak_mb": res["peak_rss"] / 2**20,
                            "seconds": res["seconds"],
                        }
                    )
                    print(rows[-1], flush=True)
    lines = [
        f"Input: EM-like uint8 zarr from the ISBI ssTEM sections; output 4x OME-Zarr; tile {args.tile}.",
        f"Command: `python benchmarks/bench_predict.py --model {args.model} --planes {args.planes} "
        f"--size {args.size} --tile {args.tile}`",
        "",
        "| volume | engine | workers | model | output Mvoxel/s | seconds | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['volume']} | {r['engine']} | {r['workers']} | {r['model']} | {r['mvox_s']:.2f} | "
            f"{r['seconds']:.1f} | {r['peak_mb']:.0f} |"
        )
    by = {(r["volume"][:2], r["workers"], r["model"]): r for r in rows}
    lines.append("")
    for w in (1, 2):
        a, b = by.get(("1x", w, args.model)), by.get(("8x", w, args.model))
        if a and b:
            lines.append(
                f"- {args.model}, {w} worker(s): peak RSS 8x / 1x = {b['peak_mb'] / a['peak_mb']:.2f}; "
                f"model / bilinear throughput (8x) = "
                f"{b['mvox_s'] / by[('8x', w, 'bilinear:4')]['mvox_s']:.3f}"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
