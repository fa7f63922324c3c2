"""Network work at the automatic tile vs a larger tile on the same image (issue 13 item 7b).

    python benchmarks/bench_tile_overhead.py [--quick] [--tiles 512 212] [--rounds 2]

Every block is read with the model's halo (68 px for ``em``) on each inner side, so small tiles
make the network process far more pixels than the image has.  Runs the network alone (the same
``Predictor``, input pre-read, batches as the engine groups them) over a 1024^2 real ssTEM
section planned at each tile, interleaved, and reports wall and CPU seconds and the pixels read
per image pixel.  Writes docs/benchmarks/tile-overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench  # noqa: E402
from bench_e2e import network_only  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="512 px image, 1 round")
    ap.add_argument("--tiles", type=int, nargs="+", default=[512, 212])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=_bench.DOCS)
    args = ap.parse_args()
    if args.quick:
        args.size, args.rounds = 512, 1
    from pssr.blockwise.tiling import plan_blocks
    from pssr.nn.modelfile import load_model
    from pssr.nn.normalization import percentile_norm

    m0 = _bench.machine()
    lm = load_model("em")
    img = _bench.em_section(args.size)
    lo, hi = percentile_norm(img.astype("float32"), lm.normalization)
    job = {"halo": lm.halo, "lo": float(lo), "hi": float(hi), "batch": 4}
    runs = []
    for r in range(args.rounds):
        for tile in args.tiles:
            c0 = time.process_time()
            wall, _ = network_only(img, dict(job, tile=tile), lm)
            runs.append({"round": r, "tile": tile, "wall": wall, "cpu": time.process_time() - c0,
                         "loadavg": list(os.getloadavg())})  # fmt: skip
            print(runs[-1], flush=True)
    m1 = _bench.machine()
    lines = [
        "## Network work vs tile size (issue 13 item 7b)",
        "",
        _bench.machine_line(m0, m1),
        "Network alone (`em`, batch 4 as grouped by the engine, input pre-read) over a "
        f"{args.size}^2 real ssTEM "
        f"section planned at each tile; {args.rounds} interleaved round(s).",
        f"Command: `python benchmarks/bench_tile_overhead.py {' '.join(sys.argv[1:])}`",
        "",
        "| tile | blocks | LR px read / image px | median wall s | median CPU s |",
        "|---|---|---|---|---|",
    ]
    for tile in args.tiles:
        bl = plan_blocks(img.shape, tile, lm.halo, lm.config.multiple)
        area = sum((b.read[1] - b.read[0]) * (b.read[3] - b.read[2]) for b in bl) / img.size
        sel = [x for x in runs if x["tile"] == tile]
        lines.append(
            f"| {tile} | {len(bl)} | {area:.2f} | {_bench.median([x['wall'] for x in sel]):.1f} | "
            f"{_bench.median([x['cpu'] for x in sel]):.1f} |"
        )
    _bench.report("tile-overhead", lines, args, m0, m1, runs=runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
