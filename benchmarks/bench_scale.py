"""Peak memory and wall time of `pssr predict` from 1 x 512^2 to 1000 x 200000^2 (issue 23 item 1).

    python benchmarks/bench_scale.py [--quick] [--tile 256] [--models em bilinear:4] [--dense]

Every case is a fresh process (``pssr.restore`` of a zarr input into an OME-Zarr output, at a
fixed tile) whose peak resident memory is read from the kernel (``VmHWM``, exact, not sampled)
and whose wall time is measured around the restore call (and, separately, from start to exit).

* **sparse** cases declare volumes from 1 x 512^2 to 1000 x 200000^2 (uint8, 256^2 chunks) with
  the same four populated chunks (real ssTEM pixels) and every other chunk missing: the blocks
  to restore are the same few in every case, so the goal is a peak RSS within 15 % of the
  smallest case and a wall time that follows the populated blocks, not the declared volume;
* **dense** cases (``--dense MODEL:SIZE ...``) fill every chunk: 1 x 16384^2 and 8 x 8192^2 with
  ``em`` by default (hours on 2 cores), or the smaller 1 x 2048^2 and 1 x 4096^2.

Writes docs/benchmarks/scale.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench  # noqa: E402

CHILD = r"""
import json, sys, time
t_start = time.monotonic()
src, out, model, tile = sys.argv[1:5]
from pssr import restore
t0 = time.monotonic()
res = restore(src, model=model, output=out, tile=int(tile), progress=False, backend="torch")
t1 = time.monotonic()
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
print(json.dumps({"restore_s": t1 - t0, "process_s": time.monotonic() - t_start,
                  "peak_rss_mb": int(hwm.split()[1]) / 1024, "summary": res.summary}))
"""

SPARSE = [(1, 512, 512), (1, 2048, 2048), (1, 16384, 16384), (4, 100000, 100000), (1000, 200000, 200000)]
DENSE = {
    "2048": (1, 2048, 2048),
    "4096": (1, 4096, 4096),
    "16384": (1, 16384, 16384),
    "8x8192": (8, 8192, 8192),
}
CHUNK = 256


def make_input(path: Path, shape: tuple[int, int, int], dense: bool) -> int:
    """A uint8 zarr of ``shape`` (chunks 1 x 256^2): every chunk, or four chunks, of real ssTEM."""
    import numpy as np
    import zarr

    z = zarr.create_array(str(path), shape=shape, chunks=(1, CHUNK, CHUNK), dtype="uint8", fill_value=0)
    if dense:
        sec = _bench.em_section(shape[1])
        for p in range(shape[0]):
            for y in range(0, shape[1], 4096):  # a band at a time: this process stays small too
                z[p, y : y + 4096] = np.roll(sec, 97 * p, axis=1)[y : y + 4096, : shape[2]]
        return int(np.prod(shape)) // CHUNK**2
    sec = _bench.em_section(1024)
    n, h, w = shape
    # the same four chunks in every case: two side by side in the first plane, one in the middle
    # of the volume, one in the last plane's far corner
    cells = [
        (0, 0, 0),
        (0, 0, 1),
        (n // 2, (h // CHUNK) // 2, (w // CHUNK) // 2),
        (n - 1, h // CHUNK - 1, w // CHUNK - 1),
    ]
    for i, (p, cy, cx) in enumerate(dict.fromkeys(cells)):
        z[p, cy * CHUNK : (cy + 1) * CHUNK, cx * CHUNK : (cx + 1) * CHUNK] = sec[
            256 * (i % 4) : 256 * (i % 4) + CHUNK, :CHUNK
        ]
    return len(dict.fromkeys(cells))


def run_case(tmp: Path, shape, model: str, tile: int, dense: bool) -> dict:
    src, out = tmp / "in.zarr", tmp / "out.ome.zarr"
    import shutil

    for p in (src, out):
        shutil.rmtree(p, ignore_errors=True)
    chunks = make_input(src, shape, dense)
    cmd = ["nice", "-n", "5", _bench.python(), "-c", CHILD, str(src), str(out), model, str(tile)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_bench.env())
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{shape} {model}: {r.stderr[-3000:]}")
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    s = rec.pop("summary")
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    for p in (src, out):
        shutil.rmtree(p, ignore_errors=True)
    return {
        "shape": list(shape),
        "declared_voxels": int(shape[0]) * int(shape[1]) * int(shape[2]),
        "kind": "dense" if dense else "sparse",
        "model": model,
        "tile": tile,
        "stored_input_chunks": chunks,
        "blocks": s["blocks"],
        "restored_blocks": s["blocks"] - s.get("skipped_blocks", 0),
        "skipped_blocks": s.get("skipped_blocks", 0),
        "wall_s": wall,
        "output_bytes_on_disk": disk,
        **rec,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        for kind, mk in (("sparse", "o-"), ("dense", "s--")):
            rs = [r for r in rows if r["model"] == model and r["kind"] == kind]
            if not rs:
                continue
            x = [r["declared_voxels"] for r in rs]
            axs[0].plot(x, [r["peak_rss_mb"] for r in rs], mk, label=f"{model} {kind}")
            axs[1].plot(x, [r["restore_s"] for r in rs], mk, label=f"{model} {kind}")
    for ax, yl in zip(axs, ("peak RSS (MB)", "restore wall time (s)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("declared input voxels")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axs[1].set_yscale("log")
    axs[0].set_ylim(bottom=0)
    fig.suptitle(
        f"pssr restore at a fixed tile ({rows[0]['tile']} px): sparse volumes hold 4 populated chunks"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--models", nargs="+", default=["em", "bilinear:4"])
    ap.add_argument(
        "--dense",
        nargs="*",
        default=None,
        metavar="MODEL:SIZE",
        help="dense cases, e.g. em:16384 em:8x8192 bilinear:4:4096 (minutes each on 2 cores); "
        f"sizes {', '.join(DENSE)}; --dense alone: em:16384 em:8x8192",
    )
    ap.add_argument("--quick", action="store_true", help="sparse cases up to 4 x 100000^2 only")
    ap.add_argument("--out", type=Path, default=None, help="folder for the results (default docs/benchmarks)")
    args = ap.parse_args()
    m0 = _bench.machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pssr-scale-") as d:
        tmp = Path(d)
        for model in args.models:
            for shape in SPARSE[:4] if args.quick else SPARSE:
                rows.append(run_case(tmp, shape, model, args.tile, dense=False))
                print(json.dumps(rows[-1]), flush=True)
        dense = args.dense if args.dense else (["em:16384", "em:8x8192"] if args.dense is not None else [])
        for case in dense:
            model, size = case.rsplit(":", 1)
            rows.append(run_case(tmp, DENSE[size], model, args.tile, dense=True))
            print(json.dumps(rows[-1]), flush=True)
    m1 = _bench.machine()
    lines = [
        f"# Scale: peak memory and time from 1 x 512^2 to 1000 x 200000^2 (tile {args.tile})",
        "",
        "`python benchmarks/bench_scale.py"
        + (" --dense " + " ".join(args.dense) if args.dense else "")
        + "`: "
        "each case is a fresh "
        "process restoring a uint8 zarr (chunks 1 x 256^2) into an OME-Zarr (pyramid, checksums, "
        "verification included); peak RSS is the kernel's VmHWM of that process. Sparse volumes "
        "hold the same 4 populated chunks of real ssTEM pixels, every other chunk missing.",
        "",
        "| kind | model | declared shape | declared voxels | blocks | restored | skipped | peak RSS (MB) "
        "| vs smallest | restore (s) | process (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["kind"] == "sparse")
        rel = r["peak_rss_mb"] / base["peak_rss_mb"] - 1
        lines.append(
            f"| {r['kind']} | {r['model']} | {' x '.join(map(str, r['shape']))} | {r['declared_voxels']:.3g} "
            f"| {r['blocks']:,} | {r['restored_blocks']:,} | {r['skipped_blocks']:,} "
            f"| {r['peak_rss_mb']:.0f} "
            f"| {100 * rel:+.1f} % | {r['restore_s']:.2f} | {r['process_s']:.2f} |"
        )
    lines += ["", _bench.machine_line(m0, m1)]
    _bench.report("scale", lines, args, m0, m1, rows=rows)
    plot(rows, (args.out or _bench.DOCS) / "scale.png")


if __name__ == "__main__":
    main()
