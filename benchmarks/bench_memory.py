"""Peak memory of `pssr.restore` for a 1x and a 16x plane area at a fixed tile (issue 13 item 5).

    python benchmarks/bench_memory.py [--quick] [--sizes 512 2048] [--tile 256] [--variants ...]

Each run is a fresh process restoring one uint8 plane (real ISBI ssTEM sections, mirrored to
the size) from zarr into OME-Zarr; its peak RSS (sampled every 20 ms) and the RSS after each
block are recorded.  Variants, to find what holds the memory:

* ``base``: ``restore(..., tile=T)`` as shipped;
* ``arena2``: the same with ``MALLOC_ARENA_MAX=2`` (glibc arena fragmentation?);
* ``trim``: ``malloc_trim(0)`` after every block (memory freed but kept by glibc?);
* ``microbatch``: the engine's ``Predictor`` runs each batch through the network one block at a
  time (the candidate fix, patched in the child process only: /tmp/notes/issue13-microbatch.patch);
* ``fix``: ``microbatch`` and ``trim`` together (both proposed fixes);
* ``bilinear``: ``--model bilinear:4`` through the same path (the I/O-only control);
* ``net``: the network alone on the largest batch of the plan (no I/O), the floor.

Writes docs/benchmarks/memory.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench  # noqa: E402

CHILD = r"""
import ctypes, json, sys, time
import numpy as np, zarr
src, out, model, tile, variant = sys.argv[1:6]
tile = int(tile)
libc = ctypes.CDLL("libc.so.6")
from pssr import restore
try:
    from pssr.blockwise import engine as _eng
except ImportError:
    from pssr.blockwise import predict as _eng
import psutil
if variant in ("microbatch", "fix"):
    _orig = _eng.Predictor.__call__
    def _one_at_a_time(self, x):
        if len(x) <= 1:
            return _orig(self, x)
        parts = [_orig(self, x[i : i + 1]) for i in range(len(x))]
        mean = np.concatenate([p[0] for p in parts])
        spread = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
        return mean, spread
    _eng.Predictor.__call__ = _one_at_a_time
log = []
def cb(done, total):
    if variant in ("trim", "fix"):
        libc.malloc_trim(0)
    log.append([done, _proc.memory_info().rss >> 20, PEAK[0] >> 20])
t0 = time.perf_counter()
if variant == "net":
    from pssr.nn.modelfile import load_model
    from pssr.blockwise.tiling import plan_blocks
    lm = load_model(model)
    pred = _eng.Predictor(lm)
    arr = zarr.open_array(src, mode="r")
    side = max(b.read[1] - b.read[0] for b in plan_blocks(arr.shape, tile, lm.halo, lm.config.multiple))
    n = sum(1 for b in plan_blocks(arr.shape, tile, lm.halo, lm.config.multiple)
            if b.read[1] - b.read[0] == side and b.read[3] - b.read[2] == side)
    x = np.random.default_rng(0).random((min(4, n), 1, side, side), dtype=np.float32)
    pred(x)
else:
    restore(src, model=model, output=out, tile=tile, progress=False, empty_threshold=0, callback=cb)
dt = time.perf_counter() - t0
time.sleep(0.1)
print(json.dumps({"seconds": dt, "peak_mb": PEAK[0] / 2**20, "log": log}))
"""


def make_plane(path: Path, size: int) -> None:
    import numpy as np
    import tifffile
    import zarr

    isbi = tifffile.imread(_bench.ISBI)[0]
    t = np.concatenate([isbi, isbi[::-1]], 0)
    t = np.concatenate([t, t[:, ::-1]], 1)
    reps = -(-size // t.shape[0])
    z = zarr.create_array(str(path), shape=(size, size), chunks=(256, 256), dtype="uint8")
    z[...] = np.tile(t, (reps, reps))[:size, :size]


def run(src: Path, out: Path, model: str, tile: int, variant: str) -> dict:
    e = _bench.env()
    if variant == "arena2":
        e["MALLOC_ARENA_MAX"] = "2"
    code = _bench.rss_child_code() + CHILD
    r = subprocess.run([sys.executable, "-c", code, str(src), str(out), model, str(tile), variant],
                       capture_output=True, text=True, env=e)  # fmt: skip
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="256 vs 1024 px planes, tile 128 (a few minutes)")
    ap.add_argument("--sizes", type=int, nargs=2, default=[512, 2048], help="1x and 16x plane side (LR px)")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--model", default="em")
    ap.add_argument(
        "--variants", nargs="+", default=["net", "base", "microbatch", "trim", "fix", "arena2", "bilinear"]
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once (peak RSS is per process, unaffected; their seconds then are not comparable)",
    )
    ap.add_argument("--out", type=Path, default=_bench.DOCS)
    ap.add_argument("--name", default="memory", help="output file stem in --out")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.tile = [256, 1024], 128
    m0 = _bench.machine()
    print(_bench.machine_line(m0), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pssr-mem-") as td:
        td = Path(td)
        for size in args.sizes:
            make_plane(td / f"in{size}.zarr", size)
        from concurrent.futures import ThreadPoolExecutor

        def one(vs):
            variant, size = vs
            model = "bilinear:4" if variant == "bilinear" else args.model
            res = run(td / f"in{size}.zarr", td / f"out-{size}-{variant}.ome.zarr", model, args.tile, variant)
            print(f"{variant} {size}: peak {res['peak_mb']:.0f} MB, {res['seconds']:.1f} s", flush=True)
            return {"variant": variant, "model": model, "size": size, **res}

        todo = [(v, s) for v in args.variants for s in args.sizes]
        with ThreadPoolExecutor(max(1, args.jobs)) as ex:
            rows = list(ex.map(one, todo))
    m1 = _bench.machine()
    by = {(r["variant"], r["size"]): r for r in rows}
    a, b = args.sizes
    lines = [
        "## Peak memory at a fixed tile, 1x vs 16x plane area (issue 13 item 5)",
        "",
        _bench.machine_line(m0, m1),
        f"Input: one uint8 plane of {a}x{a} and of {b}x{b} LR px (real ISBI ssTEM sections, mirrored), "
        f"`--tile {args.tile}`, `{args.model}` model, x4 OME-Zarr output. Peak RSS of a fresh process"
        + (f"; {args.jobs} runs at a time, so their seconds are not comparable." if args.jobs > 1 else "."),
        f"Command: `python benchmarks/bench_memory.py {' '.join(sys.argv[1:])}`",
        "",
        f"| variant | model | peak RSS {a}^2 (MB) | peak RSS {b}^2 (MB) | 16x / 1x | "
        f"seconds {a}^2 | seconds {b}^2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in args.variants:
        r1, r2 = by.get((v, a)), by.get((v, b))
        if r1 and r2:
            lines.append(
                f"| {v} | {r1['model']} | {r1['peak_mb']:.0f} | {r2['peak_mb']:.0f} | "
                f"{r2['peak_mb'] / r1['peak_mb']:.2f} | {r1['seconds']:.1f} | {r2['seconds']:.1f} |"
            )
    _bench.report(args.name, lines, args, m0, m1, rows=rows)
    plot(rows, args.out / f"{args.name}.png", args.sizes)
    return 0


def plot(rows, path: Path, sizes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3))
    w = 0.38
    for j, s in enumerate(sizes):
        vals = [
            next((r["peak_mb"] for r in rows if r["variant"] == v and r["size"] == s), 0) for v in variants
        ]
        ax.bar([i + (j - 0.5) * w for i in range(len(variants))], vals, w, label=f"{s}x{s} plane")
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("peak RSS (MB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
