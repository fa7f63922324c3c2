"""GPU runtime: mixed precision accuracy and end-to-end speed (issue 13, items 2 and 7).

    python benchmarks/bench_gpu.py --out DIR [--size 2048] [--rounds 2] [--budget 200]

Needs a CUDA device (exits with a message otherwise).  In one run, on real data:

1. **Precision** (item 2): the built-in models restore held-out real images (ISBI ssTEM
   sections 25-29 degraded with ``em``'s own degradation, seed 0; BPAE actin degraded with
   ``fluo``'s) in memory with ``dtype="float32"`` output, on the GPU in float32, bfloat16 and
   float16 autocast, and on the CPU in float32.  Reported per model and precision: the largest
   and the 99.9th-percentile absolute difference to the GPU float32 output as a fraction of its
   range (max - min), and the PSNR against the high-resolution truth (so a difference in quality
   shows, not only a difference in bits).  The rule of the issue: mixed precision may become the
   GPU default where the largest difference is below 1/1000 of the range.
2. **Speed** (item 7): a real ssTEM section tiled (mirrored) to ``size`` x ``size`` LR pixels,
   saved as TIFF, restored to OME-Zarr (x4) with ``em``, each way ``rounds`` times (median):

   * ``network only``: the blocks and batches of the run (read from its job), pre-read and
     normalised, through the same ``Predictor`` on the GPU;
   * ``pssr.restore`` (library, default settings, device auto) in float32 / bfloat16 / float16,
     with the GPU's utilisation sampled every 50 ms (NVML) during the run;
   * a **naive per-block loop** on the same GPU: for each block read, normalise, copy to the
     GPU, run the network in float32, copy back, write the block into a zarr array (same
     chunks), one block at a time, no overlap, no pyramid and no checksums;
   * ``pssr.restore(workers=1)`` and ``workers=2`` (dask ``LocalCluster`` on the one GPU).

Writes ``DIR/gpu.json`` and ``DIR/gpu.md`` (and prints the tables).  Sections stop being started
once ``budget`` seconds have passed (a lent GPU is short).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench  # noqa: E402
import numpy as np  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PRECISIONS = ["float32", "bfloat16", "float16"]
DEV = "cuda"  # --cpu-dry-run: "cpu" (checks the script's logic without a GPU; numbers meaningless)


def sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


class Utilisation:
    """GPU utilisation (percent) sampled every ``period`` s through NVML while active."""

    def __init__(self, period: float = 0.05) -> None:
        self.period, self.samples, self._stop = period, [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # NVML missing: no utilisation column
            self._nvml = None

    def __enter__(self) -> Utilisation:
        if self._nvml is not None:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)
            time.sleep(self.period)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def precision_check() -> list[dict]:
    import tifffile

    from pssr import restore
    from pssr.nn.modelfile import load_model
    from pssr.quality.metrics import crop_to_scale, psnr

    cases = {
        "em": tifffile.imread(DATA / "em" / "isbi2012_sstem_train.tif")[25:30],
        "fluo": tifffile.imread(DATA / "fluo" / "BPAE_actin.tif").astype(np.float32),
    }
    rows = []
    for name, hr in cases.items():
        lm = load_model(name)
        lr = lm.crappifier(hr, rng=0)
        hr = crop_to_scale(hr, lr.shape, lm.scale)
        outs = {}
        for dev, prec in [(DEV, p) for p in PRECISIONS] + [("cpu", "float32")]:
            t0 = time.perf_counter()
            r = restore(lr, model=name, device=dev, precision=prec, dtype="float32", progress=False)
            outs[(dev, prec)] = (np.asarray(r.output, np.float32), time.perf_counter() - t0)
        ref = outs[(DEV, "float32")][0]
        span = float(ref.max() - ref.min())
        for (dev, prec), (o, dt) in outs.items():
            d = np.abs(o.astype(np.float64) - ref)
            rows.append(
                {
                    "model": name,
                    "data": "ISBI ssTEM sections 25-29" if name == "em" else "BPAE actin",
                    "device": dev,
                    "precision": prec,
                    "max_diff_of_range": float(d.max() / span),
                    "p999_diff_of_range": float(np.percentile(d, 99.9) / span),
                    "mean_diff_of_range": float(d.mean() / span),
                    "psnr_vs_truth": float(psnr(o, hr)),
                    "seconds": dt,
                }
            )
            print(rows[-1], flush=True)
    return rows


def network_only(img: np.ndarray, job: dict, lm, precision: str) -> tuple[float, int]:
    from pssr.blockwise.engine import Predictor

    pred = Predictor(lm, device=DEV, tta=False, precision=precision)
    batches, vox = _bench.job_batches(img, job, lm)
    pred(batches[0])  # warm-up (cuDNN autotuning, allocator)
    sync()
    t0 = time.perf_counter()
    for x in batches:
        pred(x)
    sync()
    return time.perf_counter() - t0, vox


def naive_loop(img: np.ndarray, job: dict, lm, out: Path) -> float:
    """Per block: read, normalise, to GPU, network (float32), back, write; nothing overlapped."""
    import torch
    import zarr

    from pssr.blockwise.tiling import plan_blocks

    net = lm.net.to(DEV).eval()
    s = lm.scale
    blocks = plan_blocks(img.shape, job["tile"], job["halo"], lm.config.multiple)
    lo, rng = job["lo"], job["hi"] - job["lo"]
    t0 = time.perf_counter()
    z = zarr.create_array(
        str(out), shape=(img.shape[0] * s, img.shape[1] * s), chunks=(512, 512), dtype="uint8", overwrite=True
    )
    with torch.inference_mode():
        for b in blocks:
            x = (img[b.read[0] : b.read[1], b.read[2] : b.read[3]].astype(np.float32) - lo) / rng
            y = net(torch.from_numpy(x)[None, None].to(DEV))[0, 0].float().cpu().numpy()
            oy, ox = (b.core[0] - b.read[0]) * s, (b.core[2] - b.read[2]) * s
            h, w = (b.core[1] - b.core[0]) * s, (b.core[3] - b.core[2]) * s
            core = y[oy : oy + h, ox : ox + w] * rng + lo
            z[b.core[0] * s : b.core[1] * s, b.core[2] * s : b.core[3] * s] = np.clip(
                np.rint(core), 0, 255
            ).astype(np.uint8)
    return time.perf_counter() - t0


def speed(size: int, rounds: int, deadline: float) -> dict:
    import tifffile
    import torch
    import zarr

    from pssr import restore
    from pssr.nn.modelfile import load_model

    res: dict = {"size": size, "rounds": rounds, "rows": []}
    img = _bench.em_section(size)
    lm = load_model("em")
    vox_total = img.size * lm.scale**2
    td = Path(tempfile.mkdtemp(prefix="pssr-gpu-"))
    tif = td / "in.tif"
    tifffile.imwrite(tif, img)

    def lib(prec: str, workers: int | None = None) -> tuple[float, dict, float | None]:
        out = td / f"out-{prec}-{workers}.ome.zarr"
        shutil.rmtree(out, ignore_errors=True)
        with Utilisation() as u:
            t0 = time.perf_counter()
            r = restore(
                str(tif), model="em", output=str(out), precision=prec, workers=workers, progress=False
            )
            dt = time.perf_counter() - t0
        job = dict(zarr.open_group(str(out), mode="r").attrs["pssr"])["job"]
        summary = {k: r.summary.get(k) for k in ("device", "precision", "blocks")}
        return dt, {"summary": summary, "job": job}, u.mean

    lib("float32")  # warm-up: imports, cuDNN, allocator
    times: dict[str, list] = {}
    job = None
    for _ in range(rounds):
        for prec in PRECISIONS:
            dt, info, util = lib(prec)
            job = job or info["job"]
            times.setdefault(f"pssr.restore {prec}", []).append((dt, util, info["summary"]))
        for prec in PRECISIONS:
            dt, vox = network_only(img, job, lm, prec)
            times.setdefault(f"network only {prec}", []).append((dt, None, None))
        times.setdefault("naive per-block loop float32", []).append(
            (naive_loop(img, job, lm, td / "naive.zarr"), None, None)
        )
        if time.perf_counter() > deadline:
            break
    for w in (1, 2):
        if time.perf_counter() > deadline:
            res["skipped"] = "dask workers (budget)"
            break
        try:
            lib("float32", workers=w)  # start-up of the cluster included: one warm-up run per size
            dt, info, util = lib("float32", workers=w)
            times[f"pssr.restore float32, dask workers={w}"] = [(dt, util, info["summary"])]
        except Exception as e:  # report and go on
            res[f"dask workers={w} error"] = f"{type(e).__name__}: {e}"
    for label, xs in times.items():
        secs = [x[0] for x in xs]
        utils = [x[1] for x in xs if x[1] is not None]
        res["rows"].append(
            {
                "what": label,
                "seconds": _bench.median(secs),
                "all_seconds": secs,
                "mvox_s": vox_total / _bench.median(secs) / 1e6,
                "gpu_util_pct": float(np.mean(utils)) if utils else None,
                "summary": xs[0][2],
            }
        )
        print(res["rows"][-1], flush=True)
    res["job"] = {k: job.get(k) for k in ("tile", "halo", "batch", "device", "precision")} if job else None
    res["card"] = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (dry run)"
    shutil.rmtree(td, ignore_errors=True)
    return res


def table(prec_rows: list[dict], sp: dict | None) -> str:
    lines = []
    if prec_rows:
        lines += [
            "Precision: restored output vs the GPU float32 output (fraction of its range), "
            "and PSNR vs truth.",
            "",
            "| model | data | device | precision | max diff / range | 99.9 % diff / range | PSNR (dB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in prec_rows:
            lines.append(
                f"| {r['model']} | {r['data']} | {r['device']} | {r['precision']} "
                f"| {r['max_diff_of_range']:.2e} | {r['p999_diff_of_range']:.2e} | {r['psnr_vs_truth']:.3f} |"
            )
    if sp and sp.get("rows"):
        s = sp["size"]
        lines += [
            "",
            f"Speed: {s}x{s} LR uint8 ssTEM (tiled real section) -> {4 * s}x{4 * s} OME-Zarr, `em`, "
            f"{sp['card']}, median of {sp['rounds']} (job: {sp['job']}).",
            "",
            "| what | seconds | output Mvoxel/s | GPU utilisation (mean %) |",
            "|---|---|---|---|",
        ]
        net = {r["what"].split()[-1]: r for r in sp["rows"] if r["what"].startswith("network only")}
        for r in sp["rows"]:
            u = f"{r['gpu_util_pct']:.0f}" if r["gpu_util_pct"] is not None else "-"
            lines.append(f"| {r['what']} | {r['seconds']:.2f} | {r['mvox_s']:.1f} | {u} |")
        lines.append("")
        for r in sp["rows"]:
            if r["what"].startswith("pssr.restore") and "dask" not in r["what"]:
                p = r["what"].split()[-1]
                if p in net:
                    ratio = r["mvox_s"] / net[p]["mvox_s"]
                    lines.append(f"- {r['what']}: end-to-end / network-only rate = {ratio:.2f}")
        naive = [r for r in sp["rows"] if r["what"].startswith("naive")]
        lib32 = [r for r in sp["rows"] if r["what"] == "pssr.restore float32"]
        if naive and lib32:
            ratio = naive[0]["seconds"] / lib32[0]["seconds"]
            lines.append(f"- pssr.restore float32 vs naive per-block loop: {ratio:.2f}x")
        d = {r["what"]: r for r in sp["rows"] if "dask" in r["what"]}
        a, b = d.get("pssr.restore float32, dask workers=1"), d.get("pssr.restore float32, dask workers=2")
        if a and b:
            lines.append(f"- two dask workers on one GPU vs one: {a['seconds'] / b['seconds']:.2f}x")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", type=float, default=200.0, help="seconds after which no new section starts")
    ap.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    global DEV
    if args.cpu_dry_run:
        DEV = "cpu"
        PRECISIONS.remove("float16")
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing to measure.")
        return 2
    deadline = time.perf_counter() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    payload: dict = {
        "machine": _bench.machine(),
        "card": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
    }
    prec_rows, sp = [], None
    try:
        prec_rows = precision_check()
    except Exception:
        payload["precision_error"] = traceback.format_exc()
        print(payload["precision_error"], flush=True)
    payload["precision"] = prec_rows
    (args.out / "gpu.json").write_text(json.dumps(payload, indent=2, default=str))
    try:
        sp = speed(args.size, args.rounds, deadline)
    except Exception:
        payload["speed_error"] = traceback.format_exc()
        print(payload["speed_error"], flush=True)
    payload["speed"] = sp
    text = table(prec_rows, sp)
    payload["table"] = text
    (args.out / "gpu.json").write_text(json.dumps(payload, indent=2, default=str))
    (args.out / "gpu.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
