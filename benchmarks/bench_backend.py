"""End to end with the network in torch or in ONNX Runtime (issue 13 item 6: keep what is faster).

    python benchmarks/bench_backend.py [--quick] [--rounds 3] [--size 1024] [--threads N]

Input: one real ssTEM section (Drosophila L3 VNC, 1024 x 1024 uint8, as bench_e2e.py) as a
TIFF; output 4x OME-Zarr with the built-in ``em`` model, automatic tile, no TTA.  Every round
runs, interleaved (the order of the two backends alternates from round to round):

* **library**: ``pssr.restore(tif, output=..., backend=B, dtype="float32")`` in this process
  (wall and CPU seconds of this process; the float32 outputs are compared: max |ORT - torch| as
  a fraction of torch's output range, the project's rule being < 1/1000);
* **process**: ``pssr predict IN OUT.ome.zarr --model em --backend B`` as a child process (wall,
  CPU and peak RSS sampled every 20 ms; uint8 output as a user gets it).

The graphs are exported into a fresh cache (``$PSSR_CACHE``, a temporary folder) before the
rounds: the one-time export and the load of a cached graph are timed separately.  Reported:
medians over rounds and the median of per-round ratios (the machine may be shared).  Writes
docs/benchmarks/backend.{json,md}; with ``--threads N`` (torch's threads, and so ONNX Runtime's,
in this process and the children: 1 is what each dask worker uses, and on a shared machine it
keeps a thread that waits for a descheduled sibling out of the comparison)
docs/benchmarks/backend-threads{N}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench  # noqa: E402
import numpy as np  # noqa: E402

BACKENDS = ("torch", "onnxruntime")
CHILD = (
    _bench.rss_child_code()
    + r"""
import json, resource, sys
from pssr.cli.app import main
rc = main(sys.argv[1:])
ru = resource.getrusage(resource.RUSAGE_SELF)
print("PSSR_BENCH " + json.dumps({"rc": rc, "peak_rss": PEAK[0], "cpu": ru.ru_utime + ru.ru_stime}))
"""
)


def run_child(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (bytes) of ``pssr ARGS`` in a child process."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PSSR_BENCH ")]
    if r.returncode or not line:
        raise RuntimeError(f"pssr {' '.join(args[:3])} failed:\n{r.stderr[-3000:]}")
    rec = json.loads(line[-1].split(" ", 1)[1])
    return {"wall": wall, "cpu": rec["cpu"], "peak_rss": rec["peak_rss"]}


def export_costs(lm, shape: tuple[int, ...], tile: int) -> dict[str, float]:
    """Seconds to export the graphs a restoration of ``shape`` needs, and to load them from the cache."""
    from pssr.blockwise.tiling import plan_blocks
    from pssr.nn import onnx_backend
    from pssr.nn.onnx_backend import OnnxNetwork

    blocks = plan_blocks(shape, tile, lm.halo, lm.config.multiple)
    shapes = {(lm.config.input_channels, b.read[1] - b.read[0], b.read[3] - b.read[2]) for b in blocks}
    t0 = time.perf_counter()
    first = OnnxNetwork(lm)
    first.prepare(shapes)
    t_export = time.perf_counter() - t0
    onnx_backend._CHECKED.clear()  # as in a new process: the cached graph is checked again
    t0 = time.perf_counter()
    again = OnnxNetwork(lm)
    again.prepare(shapes)
    t_load = time.perf_counter() - t0
    assert again.exports == 0
    return {"graphs": first.exports, "export_s": t_export, "cached_load_s": t_load}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="512 px input, 1 round (a few minutes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024, help="LR input side (real section)")
    ap.add_argument("--threads", type=int, help="torch (and ONNX Runtime) threads; default: torch's")
    ap.add_argument("--out", type=Path, default=_bench.DOCS)
    args = ap.parse_args()
    if args.quick:
        args.size, args.rounds = 512, 1
    td = Path(tempfile.mkdtemp(prefix="pssr-backend-"))
    os.environ["PSSR_CACHE"] = str(td / "cache")  # a cold cache: exports timed on their own
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children's torch reads it at start
    import onnxruntime
    import tifffile
    import torch
    import zarr

    from pssr import restore
    from pssr.blockwise.predict import DEFAULT_MEMORY, auto_tile
    from pssr.nn.modelfile import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    m0 = _bench.machine()
    print(_bench.machine_line(m0), flush=True)
    try:
        img = _bench.em_section(args.size)
        tif = td / "section.tif"
        tifffile.imwrite(tif, img)
        lm = load_model("em")
        tile = auto_tile(lm, "cpu", DEFAULT_MEMORY, 4)
        costs = export_costs(lm, img.shape, tile)
        print(f"tile {tile}; ONNX export / cached load: {costs}", flush=True)
        wall: dict[str, dict[str, list[float]]] = {k: {b: [] for b in BACKENDS} for k in ("lib", "proc")}
        cpu: dict[str, dict[str, list[float]]] = {k: {b: [] for b in BACKENDS} for k in ("lib", "proc")}
        rss: dict[str, list[float]] = {b: [] for b in BACKENDS}
        diffs, uint8_diff = [], []
        env = _bench.env()
        for r in range(args.rounds):
            order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]
            outs = {}
            for b in order:
                out = td / f"lib-{b}-{r}.ome.zarr"
                c0, t0 = time.process_time(), time.perf_counter()
                res = restore(
                    str(tif), model="em", output=str(out), backend=b, dtype="float32", progress=False
                )
                wall["lib"][b].append(time.perf_counter() - t0)
                cpu["lib"][b].append(time.process_time() - c0)
                assert res.summary["backend"] == b and res.summary["device"] == "cpu"
                outs[b] = np.asarray(res.output[...], np.float64)
                shutil.rmtree(out, ignore_errors=True)
            ref = outs["torch"]
            diffs.append(float(np.abs(outs["onnxruntime"] - ref).max() / np.ptp(ref)))
            procs = {}
            for b in order:
                out = td / f"proc-{b}-{r}.ome.zarr"
                rec = run_child(["-q", "predict", str(tif), str(out), "--model", "em", "--backend", b], env)
                wall["proc"][b].append(rec["wall"])
                cpu["proc"][b].append(rec["cpu"])
                rss[b].append(rec["peak_rss"])
                procs[b] = np.asarray(zarr.open_group(str(out), mode="r")["s0"][...], np.int16)
                shutil.rmtree(out, ignore_errors=True)
            d8 = np.abs(procs["onnxruntime"] - procs["torch"])
            uint8_diff.append({"max_levels": int(d8.max()), "fraction_differing": float((d8 > 0).mean())})
            print(
                f"round {r + 1}: "
                + ", ".join(
                    f"{k} {b} {wall[k][b][-1]:.1f} s / {cpu[k][b][-1]:.1f} CPU s"
                    for k in wall
                    for b in BACKENDS
                )
                + f"; max diff {diffs[-1]:.1e} of the range",
                flush=True,
            )
        m1 = _bench.machine()
    finally:
        shutil.rmtree(td, ignore_errors=True)

    med = _bench.median
    ratio = {
        k: {
            "wall": med([t / o for t, o in zip(wall[k]["torch"], wall[k]["onnxruntime"], strict=True)]),
            "cpu": med([t / o for t, o in zip(cpu[k]["torch"], cpu[k]["onnxruntime"], strict=True)]),
        }
        for k in wall
    }
    mpx = args.size * args.size * lm.scale**2 / 1e6
    lines = [
        "## Backend end to end: torch vs ONNX Runtime (issue 13 item 6)",
        "",
        _bench.machine_line(m0, m1) + f" onnxruntime {onnxruntime.__version__}, torch threads "
        f"{torch.get_num_threads()} (ONNX Runtime intra-op threads: the same).",
        f"Input: real ssTEM section {args.size}x{args.size} uint8 TIFF -> {args.size * lm.scale}^2 OME-Zarr, "
        f"`em` (x{lm.scale}), automatic tile {tile}, no TTA. {args.rounds} interleaved rounds (the order "
        "alternates); medians; ratio = median over rounds of torch / ONNX Runtime (> 1: ONNX Runtime "
        "faster or cheaper).",
        f"Command: `python benchmarks/bench_backend.py{' --quick' if args.quick else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}`",
        "",
        "| run | torch wall s | ORT wall s | wall ratio | torch CPU s | ORT CPU s | CPU ratio | "
        "torch out Mpx/s | ORT out Mpx/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "lib": "`pssr.restore(...)` in process (float32 out)",
        "proc": "`pssr predict` process (uint8 out)",
    }
    for k in wall:
        wt, wo = med(wall[k]["torch"]), med(wall[k]["onnxruntime"])
        lines.append(
            f"| {names[k]} | {wt:.1f} | {wo:.1f} | {ratio[k]['wall']:.2f} | {med(cpu[k]['torch']):.1f} | "
            f"{med(cpu[k]['onnxruntime']):.1f} | {ratio[k]['cpu']:.2f} | {mpx / wt:.2f} | {mpx / wo:.2f} |"
        )
    lines += [
        "",
        f"Peak RSS of the `pssr predict` process (median): torch {med(rss['torch']) / 1e9:.2f} GB, ONNX "
        f"Runtime {med(rss['onnxruntime']) / 1e9:.2f} GB.",
        f"Output: max |ORT - torch| / torch's range (float32 outputs, every round): {max(diffs):.1e} "
        "(rule: < 1e-3). uint8 outputs: at most "
        f"{max(u['max_levels'] for u in uint8_diff)} level apart, "
        f"{max(u['fraction_differing'] for u in uint8_diff):.1e} of the pixels differ (rounding at .5).",
        f"One-time cost: exporting the {costs['graphs']} graph(s) this image needs took "
        f"{costs['export_s']:.1f} s (first run with a model; then cached in `$PSSR_CACHE/onnx`, default "
        f"`~/.cache/pssr/onnx`); loading and checking a cached graph {costs['cached_load_s']:.2f} s.",
    ]
    if not args.threads:
        lines.append(
            "On one thread each (what a dask worker uses; on a shared machine it keeps a thread waiting "
            "for a descheduled sibling out of the comparison): backend-threads1.md (`--threads 1`)."
        )
    _bench.report(
        f"backend-threads{args.threads}" if args.threads else "backend", lines, args, m0, m1,
        tile=tile, onnxruntime=onnxruntime.__version__, export=costs, seconds=wall, cpu_seconds=cpu,
        peak_rss_bytes=rss, ratios_torch_over_ort=ratio, max_abs_diff_over_range=diffs,
        uint8_diff=uint8_diff,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
