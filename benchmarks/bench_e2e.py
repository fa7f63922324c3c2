"""End-to-end speed of `pssr predict` against the network alone, and against PSSR2 (issue 13 item 7).

    python benchmarks/bench_e2e.py [--quick] [--rounds 3] [--size 1024] [--no-pssr2]

Input: one real ssTEM section (Drosophila L3 VNC, 1024 x 1024 uint8) as a TIFF; output 4x
OME-Zarr with the built-in ``em`` model and default settings (automatic tile, no TTA, no
fidelity map).  Every round runs, interleaved:

* **network only**: the same blocks and batches the run used (tile, halo and batches read back
  from the output's job), read and normalised beforehand, through the same ``Predictor``;
* **library**: ``pssr.restore(tif, output=...)`` in this process (model load, reading,
  network, writing, checksums, pyramid, verification before ``complete``);
* **process**: ``python -m pssr predict IN OUT.ome.zarr --model em`` as a user runs it;
* **PSSR2** (PyPI ``pssr`` 2.x, its own virtualenv, default ``ResUNet()`` at scale 4, its
  ``predict_images`` on the same TIFF, writing a TIFF) as a whole process.  The virtualenv is
  built when missing: ``python -m venv /tmp/pssr2-venv && /tmp/pssr2-venv/bin/pip install
  torch==2.13.0 pssr``; PSSR2 is skipped with a message when that fails.  PSSR2 publishes no
  trained weights, so its network runs with its initial weights: a speed comparison only.

Reported: medians over rounds and the median of per-round ratios (the machine may be shared).
A profile (cProfile) of one more library run gives where the non-network time goes.  Writes
docs/benchmarks/e2e.{json,md,png}.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
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

PSSR2_VENV = Path("/tmp/pssr2-venv")
PSSR2_CHILD = r"""
import os, sys, types, torch
import pssr
# pssr.models/__init__ also imports the timm-based networks, whose torchvision import does not load
# against the CPU torch wheel; the default ResUNet needs neither, so load its module directly.
_pkg = types.ModuleType("pssr.models")
_pkg.__path__ = [os.path.join(os.path.dirname(pssr.__file__), "models")]
sys.modules["pssr.models"] = _pkg
from pssr.models.resunet import ResUNet
from pssr.training.data import ImageDataset
from pssr.blockwise.predict import predict_images
src, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = ResUNet()  # PSSR2's default network (channels 1, hidden 64..1024, scale 4)
ds = ImageDataset(src, hr_res=4 * size, lr_scale=4, val_split=1)  # LR mode: input <= hr_res / 4
predict_images(model, ds, device="cpu", out_dir=out)
"""


def ensure_pssr2() -> Path | None:
    """The PSSR2 interpreter (virtualenv built when missing), or None with a message."""
    py = PSSR2_VENV / "bin" / "python"
    ok = py.exists() and _pssr2_ok(py)
    if ok:
        return py
    print(f"building {PSSR2_VENV}: python -m venv {PSSR2_VENV} && pip install torch==2.13.0 pssr", flush=True)
    try:
        r = subprocess.run([sys.executable, "-m", "venv", str(PSSR2_VENV)])
        if r.returncode == 0:
            r = subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "pssr"])
    except OSError as e:
        print(f"PSSR2 skipped: {e}")
        return None
    if r.returncode or not _pssr2_ok(py):
        print("PSSR2 skipped: its virtualenv could not be built (see pip's message above)")
        return None
    return py


def _pssr2_ok(py: Path) -> bool:
    """PSSR2 2.x importable there (isolated mode, outside this checkout: both are called ``pssr``)."""
    code = "import pssr, sys; sys.exit(0 if pssr.__version__.startswith('2.') else 1)"
    r = subprocess.run([str(py), "-I", "-c", code], capture_output=True, cwd=tempfile.gettempdir())
    return r.returncode == 0


def _predictor_cls():
    try:
        from pssr.blockwise.engine import Predictor
    except ImportError:  # before the engine split
        from pssr.blockwise.predict import Predictor
    return Predictor


def job_of(out: Path) -> dict:
    import zarr

    return dict(zarr.open_group(str(out), mode="r").attrs["pssr"])["job"]


def network_only(img: np.ndarray, job: dict, lm) -> tuple[float, int]:
    """Seconds the network takes on the run's blocks and batches (input pre-read), output voxels."""
    Predictor = _predictor_cls()
    # The backend the run used (ONNX Runtime on the CPU when installed): the ratio compares like with like.
    backend = job.get("backend", "torch")
    try:
        pred = Predictor(lm, device="cpu", tta=False, precision="float32", backend=backend)
    except TypeError:  # before the backend option
        pred = Predictor(lm, device="cpu", tta=False, precision="float32")
    batches, vox = _bench.job_batches(img, job, lm)
    t0 = time.perf_counter()
    for x in batches:
        pred(x)
    return time.perf_counter() - t0, vox


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_process(args: list[str], env=None, cwd=None, cpu: list | None = None) -> float:
    """Wall seconds of a child process; its CPU seconds (user + system) appended to ``cpu``."""
    c0, t0 = _child_cpu(), time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{args[:4]} failed:\n{r.stderr[-3000:]}")
    if cpu is not None:
        cpu.append(_child_cpu() - c0)
    return dt


def profile_breakdown(tif: Path, out: Path) -> tuple[dict, list]:
    """Stages of one library run by cumulative time (they nest: see the notes), and top functions."""
    from pssr import restore

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    restore(str(tif), model="em", output=str(out), progress=False, overwrite=True)
    prof.disable()
    total = time.perf_counter() - t0
    st = pstats.Stats(prof)
    stages = {
        "network (Predictor.__call__)": ("__call__", ("engine.py", "predict.py")),
        "read + normalise + empty check (process_blocks minus network)": ("process_blocks", None),
        "write blocks (zarr chunk writes + checksums + done markers)": ("write_block", None),
        "checksums (blake2b, all calls)": ("digest", ("integrity.py",)),
        "verify written blocks before complete (verified_done)": ("verified_done", None),
        "finalize: pyramid + metadata + checksum array": ("_finalize_zarr", None),
        "pyramid levels (write_level)": ("write_level", ("pyramid.py",)),
        "verify_output (pssr verify, before complete)": ("verify_output", ("verify.py",)),
        "read input file (read_image)": ("read_image", ("io.py",)),
        "model load (load_model)": ("load_model", ("modelfile.py",)),
        "normalisation sample (_strided_sample + percentiles)": ("_strided_sample", None),
    }
    cum: dict[str, float] = {}
    for label, (fn, files) in stages.items():
        t = 0.0
        for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            if name == fn and (files is None or any(file.endswith(f) for f in files)) and "pssr" in file:
                t += ct
        cum[label] = t
    net = cum["network (Predictor.__call__)"]
    key = "read + normalise + empty check (process_blocks minus network)"
    cum[key] = max(0.0, cum[key] - net)
    cum["total (restore call)"] = total
    buf = io.StringIO()
    ps = pstats.Stats(prof, stream=buf)
    rows = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in ps.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {"function": f"{Path(file).name}:{line}({name})", "calls": nc, "tottime": tt, "cumtime": ct}
        )
    rows.sort(key=lambda r: -r["tottime"])
    return cum, rows[:15]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="512 px input, 1 round, no profile (about 2-3 min)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--size", type=int, default=1024, help="LR input side (real section, mirrored beyond 1024)"
    )
    ap.add_argument("--no-pssr2", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", type=Path, default=_bench.DOCS)
    args = ap.parse_args()
    if args.quick:
        args.size, args.rounds, args.no_profile = 512, 1, True
    import tifffile

    from pssr import restore
    from pssr.nn.modelfile import load_model

    pssr2 = None if args.no_pssr2 else ensure_pssr2()
    m0 = _bench.machine()
    print(_bench.machine_line(m0), flush=True)
    td = Path(tempfile.mkdtemp(prefix="pssr-e2e-"))
    try:
        img = _bench.em_section(args.size)
        tif = td / "in" / "section.tif"
        tif.parent.mkdir()
        tifffile.imwrite(tif, img)
        lm = load_model("em")
        rec: dict[str, list[float]] = {
            k: [] for k in ("net", "lib", "proc", "pssr2", "startup", "ome_zarr_import")
        }
        cpu: dict[str, list[float]] = {k: [] for k in ("net", "lib", "proc", "pssr2")}
        vox = 0
        for r in range(args.rounds):
            out = td / f"lib{r}.ome.zarr"
            c0, t0 = time.process_time(), time.perf_counter()
            restore(str(tif), model="em", output=str(out), progress=False)
            rec["lib"].append(time.perf_counter() - t0)
            cpu["lib"].append(time.process_time() - c0)
            job = job_of(out)
            c0 = time.process_time()
            dt, vox = network_only(img, job, lm)
            rec["net"].append(dt)
            cpu["net"].append(time.process_time() - c0)
            py = [
                sys.executable,
                "-m",
                "pssr",
                "predict",
                str(tif),
                str(td / f"p{r}.ome.zarr"),
                "--model",
                "em",
            ]
            rec["proc"].append(run_process(py, _bench.env(), cpu=cpu["proc"]))
            imp = (
                "import pssr.cli.app, pssr.blockwise.predict, pssr.blockwise.runners, pssr.blockwise.store, "
                "pssr.blockwise.verify"
            )
            rec["startup"].append(run_process([sys.executable, "-c", imp], _bench.env()))
            rec["ome_zarr_import"].append(
                run_process([sys.executable, "-c", imp + ", ome_zarr.writer"], _bench.env())
                - rec["startup"][-1]
            )
            if pssr2 is not None:
                o2 = td / f"pssr2-{r}"
                cmd = [str(pssr2), "-I", "-c", PSSR2_CHILD, str(tif.parent), str(o2), str(args.size)]
                rec["pssr2"].append(run_process(cmd, cwd=td, cpu=cpu["pssr2"]))
            shutil.rmtree(out, ignore_errors=True)
            print(
                f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in rec.items() if v), flush=True
            )
            args.out.mkdir(parents=True, exist_ok=True)  # partial results survive an interrupted run
            (args.out / "e2e.partial.json").write_text(
                json.dumps({"seconds": rec, "cpu_seconds": cpu}, indent=1)
            )
        cum, top = ({}, []) if args.no_profile else profile_breakdown(tif, td / "prof.ome.zarr")
        # quality check of our own output is elsewhere (docs/models); PSSR2 has no trained weights.
        m1 = _bench.machine()
    finally:
        shutil.rmtree(td, ignore_errors=True)
    med = {k: _bench.median(v) for k, v in rec.items()}
    n = args.rounds
    frac_lib = _bench.median([rec["net"][i] / rec["lib"][i] for i in range(n)])
    frac_proc = _bench.median([rec["net"][i] / rec["proc"][i] for i in range(n)])
    frac_lib_cpu = _bench.median([cpu["net"][i] / cpu["lib"][i] for i in range(n)])
    frac_proc_cpu = _bench.median([cpu["net"][i] / cpu["proc"][i] for i in range(n)])
    vs2 = _bench.median([rec["pssr2"][i] / rec["proc"][i] for i in range(n)]) if rec["pssr2"] else None
    vs2_cpu = _bench.median([cpu["pssr2"][i] / cpu["proc"][i] for i in range(n)]) if cpu["pssr2"] else None
    mc = {k: _bench.median(v) for k, v in cpu.items()}
    out_mvox = vox / 1e6
    lines = [
        "## End to end vs network only, and vs PSSR2 (issue 13 item 7)",
        "",
        _bench.machine_line(m0, m1),
        f"Input: real ssTEM section, {args.size}x{args.size} uint8 TIFF -> x4 OME-Zarr "
        f"({out_mvox:.1f} Mvoxel), "
        f"`em` model, default settings (tile {job['tile']}, batch {job['batch']}, no TTA, no fidelity). "
        f"{n} interleaved round(s); medians.",
        f"Command: `python benchmarks/bench_e2e.py{' --quick' if args.quick else ''}`",
        "",
        "| what | median wall s | median CPU s | output Mvoxel/s (wall) | "
        "fraction of network-only rate: wall (CPU) |",
        "|---|---|---|---|---|",
        f"| network only (same blocks, input pre-read) | {med['net']:.1f} | {mc['net']:.1f} | "
        f"{out_mvox / med['net']:.2f} | 1.00 |",
        f"| `pssr.restore(...)` in process | {med['lib']:.1f} | {mc['lib']:.1f} | "
        f"{out_mvox / med['lib']:.2f} | "
        f"{frac_lib:.2f} ({frac_lib_cpu:.2f}) |",
        f"| `python -m pssr predict` whole process | {med['proc']:.1f} | {mc['proc']:.1f} | "
        f"{out_mvox / med['proc']:.2f} | {frac_proc:.2f} ({frac_proc_cpu:.2f}) |",
        f"| (interpreter start + imports alone) | {med['startup']:.1f} | | | |",
        f"| (of which importing ome_zarr.writer adds) | {med['ome_zarr_import']:.1f} | | | |",
    ]
    if rec["pssr2"]:
        lines.append(
            f"| PSSR2 2.x `ResUNet()` whole process | {med['pssr2']:.1f} | {mc['pssr2']:.1f} | "
            f"{out_mvox / med['pssr2']:.2f} | pssr {vs2:.2f}x faster in wall time, "
            f"{vs2_cpu:.2f}x in CPU time "
            "(medians of per-round ratios) |"
        )
    else:
        lines.append("| PSSR2 | skipped | | | |")
    if cum:
        lines += [
            "",
            "Where one library run's time goes (cProfile, main thread; stages nest: checksums are inside the "
            "writing and verification lines).  Writing blocks, their checksums and the pyramid run in the "
            "write-behind and I/O threads (`pssr.util.io_threads`), overlapping the network: cProfile sees "
            "only the main thread, so those rows read ~0 here; the restore call's wall time above includes "
            "whatever of them the network did not hide:",
            "",
            "| stage | seconds | share of the restore call |",
            "|---|---|---|",
        ]
        tot = cum["total (restore call)"]
        for k, v in cum.items():
            lines.append(f"| {k} | {v:.2f} | {v / tot:.1%} |")
        lines += [
            "",
            "Top functions by own time:",
            "",
            "| function | calls | own s | cumulative s |",
            "|---|---|---|---|",
        ]
        for r in top:
            lines.append(f"| `{r['function']}` | {r['calls']} | {r['tottime']:.2f} | {r['cumtime']:.2f} |")
    _bench.report(
        "e2e", lines, args, m0, m1,
        job=job, output_voxels=vox, seconds=rec, cpu_seconds=cpu, pssr_vs_pssr2_cpu=vs2_cpu, median_s=med,
        fraction_library=frac_lib, fraction_process=frac_proc, fraction_library_cpu=frac_lib_cpu,
        fraction_process_cpu=frac_proc_cpu, pssr_vs_pssr2=vs2, profile_stages_s=cum, profile_top=top,
    )  # fmt: skip
    (args.out / "e2e.partial.json").unlink(missing_ok=True)
    plot(med, out_mvox, args.out / "e2e.png")
    return 0


def plot(med: dict, mvox: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "net": "network only",
        "lib": "pssr.restore",
        "proc": "pssr predict (process)",
        "pssr2": "PSSR2 (process)",
    }
    keys = [k for k in labels if med.get(k) == med.get(k) and med.get(k)]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.barh([labels[k] for k in keys], [mvox / med[k] for k in keys], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("output Mvoxel/s (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
