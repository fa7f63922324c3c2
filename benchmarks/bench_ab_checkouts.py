"""The same restore timed from two checkouts of pssr, interleaved (an A/B of a change).

    git worktree add /tmp/pssr-before <commit-before>
    python benchmarks/bench_ab_checkouts.py /tmp/pssr-before . [--model bilinear:4] [--size 2048] [--rounds 3]

Each round runs, in a fresh process per checkout (order alternating), ``pssr.restore`` of a real
ssTEM section tiled (mirrored) to ``size`` x ``size`` LR pixels, TIFF -> OME-Zarr, after one warm-up
restore in the same process; prints wall and CPU seconds per run and the medians.  With
``bilinear:4`` the network is negligible, so the I/O path is what is compared (the CPU proxy for
a GPU run, where the network is a few per cent: docs/benchmarks/gpu.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import shutil, sys, tempfile, time
root, model, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = [root, root + "/benchmarks"]
import _bench, tifffile
from pssr import restore
td = tempfile.mkdtemp()
tif = td + "/in.tif"
tifffile.imwrite(tif, _bench.em_section(size))
restore(tif, model=model, output=td + "/warm.ome.zarr", progress=False)
t, c = time.perf_counter(), time.process_time()
restore(tif, model=model, output=td + "/o.ome.zarr", progress=False)
print(time.perf_counter() - t, time.process_time() - c)
shutil.rmtree(td)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="checkout A (e.g. before the change)")
    ap.add_argument("b", type=Path, help="checkout B")
    ap.add_argument("--model", default="bilinear:4")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    res: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        order = [("A", args.a), ("B", args.b)][:: 1 if r % 2 == 0 else -1]
        for tag, root in order:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(root.resolve()), args.model, str(args.size)],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                print(out.stderr[-2000:])
                return 1
            wall, cpu = (float(v) for v in out.stdout.split()[-2:])
            res[tag].append((wall, cpu))
            print(f"round {r + 1} {tag}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    for tag, root in (("A", args.a), ("B", args.b)):
        walls, cpus = [x[0] for x in res[tag]], [x[1] for x in res[tag]]
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(f"{tag} ({root}): median {wall:.2f} s wall, {cpu:.2f} s CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
