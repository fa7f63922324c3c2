"""Where a dask run's extra time goes, against the local runner on the same input (issue 13 item 7).

    python benchmarks/bench_dask_overhead.py [--model bilinear:4] [--size 2048] [--rounds 2] [--device cpu]

Each round restores a real ssTEM section tiled (mirrored) to ``size`` x ``size`` LR pixels,
TIFF -> OME-Zarr, with the local runner and with a one-worker ``LocalCluster`` (``workers=1``),
interleaved, in this process (after one warm-up restore).  For the dask run it splits the time
into: cluster start-up (worker process spawned, imports), the span from the start of the run to
the first finished task (includes the worker loading the model), the span of the tasks (first to
last finished), and what follows (finishing the output, closing the cluster).  With
``bilinear:4`` the network is negligible: the I/O path is what is compared, the CPU proxy of a GPU
run.  Run it on a GPU node with ``--model em --device cuda`` to profile the GPU case.  Writes
docs/benchmarks/dask-overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench  # noqa: E402


def one_round(tif: Path, td: Path, model: str, device: str, i: int) -> dict[str, float]:
    import pssr.blockwise.distributed as D
    from pssr import restore

    res: dict[str, float] = {}
    t = time.perf_counter()
    restore(tif, model=model, device=device, output=td / f"local{i}.ome.zarr", progress=False)
    res["local"] = time.perf_counter() - t

    marks: dict[str, float] = {}
    finished: list[float] = []
    make_cluster, run = D._local_cluster, D.run_distributed

    def cluster(*a, **k):
        t0 = time.perf_counter()
        c = make_cluster(*a, **k)
        marks["cluster_up"] = time.perf_counter()
        marks["cluster_start"] = marks["cluster_up"] - t0
        close = c.close

        def timed_close(*a, **k):
            t1 = time.perf_counter()
            out = close(*a, **k)
            marks["cluster_close"] = time.perf_counter() - t1
            return out

        c.close = timed_close
        return c

    def timed_run(*a, on_written=None, **k):
        def seen(keys):
            finished.append(time.perf_counter())
            if on_written is not None:
                on_written(keys)

        return run(*a, on_written=seen, **k)

    D._local_cluster, D.run_distributed = cluster, timed_run
    try:
        t = time.perf_counter()
        restore(tif, model=model, device=device, output=td / f"dask{i}.ome.zarr", progress=False, workers=1)
        end = time.perf_counter()
    finally:
        D._local_cluster, D.run_distributed = make_cluster, run
    res["dask"] = end - t
    res["cluster_start"] = marks["cluster_start"]
    res["to_first_task"] = finished[0] - marks["cluster_up"]
    res["tasks"] = finished[-1] - finished[0]
    res["after_tasks"] = end - finished[-1]
    res["cluster_close"] = marks.get("cluster_close", float("nan"))
    res["n_tasks"] = len(finished)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bilinear:4")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=_bench.DOCS)
    args = ap.parse_args()

    import tifffile

    from pssr import restore

    m0 = _bench.machine()
    td = Path(tempfile.mkdtemp(prefix="pssr-dask-"))
    tif = td / "in.tif"
    tifffile.imwrite(tif, _bench.em_section(args.size))
    restore(tif, model=args.model, device=args.device, output=td / "warm.ome.zarr", progress=False)
    rounds = []
    for i in range(args.rounds):
        r = one_round(tif, td, args.model, args.device, i)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
        rounds.append(r)
    shutil.rmtree(td, ignore_errors=True)
    med = {k: _bench.median([r[k] for r in rounds]) for k in rounds[0]}
    m1 = _bench.machine()
    lines = [
        "## A dask run against the local runner, and where its extra time goes (issue 13 item 7)",
        "",
        _bench.machine_line(m0, m1),
        f"Input: real ssTEM section mirrored to {args.size}x{args.size} uint8 TIFF -> x4 OME-Zarr, "
        f"`{args.model}` on `{args.device}`, default settings; {args.rounds} interleaved round(s), medians.",
        f"Command: `python benchmarks/bench_dask_overhead.py --model {args.model} --size {args.size} "
        f"--rounds {args.rounds} --device {args.device}`",
        "",
        "| what | median s |",
        "|---|---|",
        f"| local runner, whole `pssr.restore` | {med['local']:.2f} |",
        f"| dask `workers=1`, whole `pssr.restore` | {med['dask']:.2f} |",
        f"| of which: cluster start-up (LocalCluster, one worker process) | {med['cluster_start']:.2f} |",
        f"| of which: cluster up -> first task done (worker loads the model) | {med['to_first_task']:.2f} |",
        f"| of which: first -> last of {int(med['n_tasks'])} tasks finished | {med['tasks']:.2f} |",
        f"| of which: after the last task (finish output, close cluster) | {med['after_tasks']:.2f} |",
        f"| of which: closing the cluster | {med['cluster_close']:.2f} |",
        "",
        f"dask / local = {med['dask'] / med['local']:.2f}; without the cluster's start-up and close: "
        f"{(med['dask'] - med['cluster_start'] - med['cluster_close']) / med['local']:.2f}.",
    ]
    _bench.report("dask-overhead", lines, args, m0, m1, rounds=rounds, median=med)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
