"""Shared helpers of the issue-13 benchmarks: machine record, medians, input data, output files.

Not a benchmark itself.  The machine these run on is usually shared (other processes load the
CPUs), so every benchmark interleaves its variants with the baseline, repeats the rounds and
reports medians of per-round ratios; the load average is recorded before and after.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EM_STACK = DATA / "em" / "drosophila_l3_vnc_sstem.tif"  # 20 x 1024 x 1024 uint8, real ssTEM
ISBI = DATA / "em" / "isbi2012_sstem_train.tif"  # 30 x 512 x 512 uint8
DOCS = ROOT / "docs" / "benchmarks"


def env() -> dict[str, str]:
    """Environment for child processes: this checkout first on the path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, cores, load averages and versions, recorded with every result."""
    import torch

    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        uptime = ""
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "avx512_bf16": " avx512_bf16" in flags,
        "amx": " amx_bf16" in flags,
        "loadavg": list(os.getloadavg()),
        "uptime": uptime,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": "none (CPU-only machine; GPU numbers need a GPU run)",
    }


def machine_line(m: dict[str, Any], end: dict[str, Any] | None = None) -> str:
    la = ", ".join(f"{v:.2f}" for v in m["loadavg"])
    s = f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
    s += f"no GPU. Load average (1, 5, 15 min) at start: {la}"
    if end:
        s += "; at end: " + ", ".join(f"{v:.2f}" for v in end["loadavg"])
    return s + f". {m['time_utc']}."


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def em_section(size: int = 1024, index: int = 10):
    """A real ssTEM section (uint8), cropped or tiled (mirrored) to ``size`` x ``size``."""
    import numpy as np
    import tifffile

    sec = tifffile.imread(EM_STACK, key=index) if EM_STACK.exists() else tifffile.imread(ISBI)[index % 30]
    if size <= min(sec.shape):
        return np.ascontiguousarray(sec[:size, :size])
    reps = -(-size // min(sec.shape)) + 1
    t = np.concatenate([sec, sec[::-1]], 0)
    t = np.concatenate([t, t[:, ::-1]], 1)
    return np.ascontiguousarray(np.tile(t, (reps, reps))[:size, :size])


def job_batches(img, job: dict, lm) -> tuple[list, int]:
    """A run's blocks as its normalised input batches (read from ``img`` beforehand), and the output
    voxels they restore: what "network only" timings feed the ``Predictor``."""
    import numpy as np

    from pssr.blockwise.tiling import group_blocks, plan_blocks

    blocks = plan_blocks(img.shape, job["tile"], job["halo"], lm.config.multiple)
    lo, rng = job["lo"], job["hi"] - job["lo"]
    batches = []
    for g in group_blocks(blocks, job["batch"]):
        xs = [(img[b.read[0] : b.read[1], b.read[2] : b.read[3]].astype(np.float32) - lo) / rng for b in g]
        batches.append(np.stack(xs)[:, None])
    vox = sum((b.core[1] - b.core[0]) * (b.core[3] - b.core[2]) for b in blocks) * lm.scale**2
    return batches, vox


def save(name: str, payload: dict[str, Any], text: str, out_dir: Path | None = None) -> Path:
    """Write ``NAME.json`` (results) and ``NAME.md`` (the printed table) into docs/benchmarks."""
    d = out_dir or DOCS
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    (d / f"{name}.md").write_text(text + "\n")
    return d / f"{name}.json"


def report(name: str, lines: list[str], args: Any, m0: dict, m1: dict, **results: Any) -> str:
    """Print the table, then save it and the results (with both machine records and the arguments)."""
    text = "\n".join(lines)
    print(text)
    payload = {"machine_start": m0, "machine_end": m1, "args": vars(args) | {"out": str(args.out)}, **results}
    save(name, payload, text, args.out)
    return text


def rss_child_code() -> str:
    """Python prefix for a child process: samples its own peak RSS (plus children) every 20 ms."""
    return r"""
import threading, time, psutil
_proc = psutil.Process(); PEAK = [0]
def _sample():
    while True:
        r = _proc.memory_info().rss
        for c in _proc.children(recursive=True):
            try:
                r += c.memory_info().rss
            except psutil.Error:
                pass
        PEAK[0] = max(PEAK[0], r)
        time.sleep(0.02)
threading.Thread(target=_sample, daemon=True).start()
"""


def python() -> str:
    return sys.executable
