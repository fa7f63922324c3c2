"""CPU inference levers for the network, each against float32 in the same run (issue 13 item 6).

    python benchmarks/bench_levers.py [--quick] [--rounds 3] [--batch 1] [--side 392]

The input is what the engine feeds the network for an interior block at ``--tile 256``: real
ssTEM crops of ``256 + 2 x 68`` halo = 392 px, normalised as ``pssr predict`` does.
Each lever is timed interleaved with the float32 baseline (one call of each per round, rounds
repeated, median of the per-round speed ratios), and its output compared with the baseline:
max |difference| as a fraction of the baseline output's range (the project's rule: < 1/1000).

Levers: ``torch.inference_mode``, channels_last, bfloat16 autocast (with and without
channels_last), ``torch.compile`` (compile time reported separately), TorchScript trace + freeze,
one thread instead of all, the head's 2x2 blur as four shifted adds instead of avg_pool2d
(a model.py change, measured here by patching a copy of the network), and ONNX Runtime (run in
a virtualenv with ``onnxruntime``; ``--ort-venv`` builds it when missing:
``python -m venv --system-site-packages /tmp/ort-venv &&
/tmp/ort-venv/bin/pip install onnx onnxruntime onnxscript``).  Writes
docs/benchmarks/levers.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ORT_VENV = Path("/tmp/ort-venv")


def ensure_ort() -> bool:
    """Re-run under a virtualenv with onnxruntime when this interpreter lacks it (built if missing)."""
    try:
        import onnxruntime  # noqa: F401

        return True
    except ImportError:
        pass
    py = ORT_VENV / "bin" / "python"
    if not py.exists():
        print(f"building {ORT_VENV} (system site packages + onnx, onnxruntime, onnxscript) ...", flush=True)
        r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(ORT_VENV)])
        if r.returncode == 0:
            r = subprocess.run([str(py), "-m", "pip", "install", "-q", "onnx", "onnxruntime", "onnxscript"])
        if r.returncode:
            print("could not build the ONNX Runtime virtualenv: ONNX Runtime skipped", flush=True)
            return False
    os.execve(str(py), [str(py), *sys.argv, "--no-ort-venv"], _bench.env())
    return True  # not reached


def blur_by_adds(self, x: torch.Tensor) -> torch.Tensor:
    """PixelShuffleUp.forward with the 2x2 stride-1 mean written as shifted adds (same maths)."""
    x = self.shuffle(F.relu(self.conv(x)))
    if self.blur:
        p = F.pad(x, (1, 0, 1, 0), mode="replicate")
        x = (p[..., :-1, :-1] + p[..., 1:, :-1] + p[..., :-1, 1:] + p[..., 1:, 1:]) * 0.25
    return x


def make_input(lm, batch: int, side: int) -> torch.Tensor:
    from pssr.nn.normalization import percentile_norm

    sec = _bench.em_section(1024)
    lo, hi = percentile_norm(sec.astype(np.float32), lm.normalization)
    xs = []
    for i in range(batch):
        y0, x0 = (i // 2) * (1024 - side) // 1, (i % 2) * (1024 - side)
        y0 = min(y0, 1024 - side)
        xs.append((sec[y0 : y0 + side, x0 : x0 + side].astype(np.float32) - lo) / (hi - lo))
    return torch.from_numpy(np.stack(xs)[:, None].copy())


def build_variants(net, x, with_ort: bool, skip_compile: bool):
    """name -> (callable returning a float32 numpy output, setup seconds)."""
    v = {}

    def base(t=x):
        with torch.no_grad():
            return net(t).numpy()

    v["float32 (baseline)"] = (base, 0.0)

    def infmode():
        with torch.inference_mode():
            return net(x).numpy()

    v["inference_mode"] = (infmode, 0.0)

    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def cl():
        with torch.no_grad():
            return net_cl(x_cl).contiguous().numpy()

    v["channels_last"] = (cl, 0.0)

    def bf16():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x).float().numpy()

    v["bfloat16 autocast"] = (bf16, 0.0)

    def bf16_cl():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return net_cl(x_cl).float().contiguous().numpy()

    v["bfloat16 + channels_last"] = (bf16_cl, 0.0)

    def one_thread():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return net(x).numpy()
        finally:
            torch.set_num_threads(n)

    v["1 thread (vs all)"] = (one_thread, 0.0)

    net_b = copy.deepcopy(net)
    net_b.head.forward = types.MethodType(blur_by_adds, net_b.head)

    def blur():
        with torch.no_grad():
            return net_b(x).numpy()

    v["head blur as shifted adds (model.py)"] = (blur, 0.0)

    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            traced = torch.jit.freeze(torch.jit.trace(copy.deepcopy(net), x[:1]))
            traced(x)
            traced(x)

        def jit():
            with torch.no_grad():
                return traced(x).numpy()

        v["TorchScript trace + freeze"] = (jit, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        print(f"TorchScript skipped: {type(e).__name__}: {e}", flush=True)

    if not skip_compile:
        t0 = time.perf_counter()
        try:
            comp = torch.compile(copy.deepcopy(net))
            with torch.no_grad():
                comp(x)

            def compiled():
                with torch.no_grad():
                    return comp(x).numpy()

            v["torch.compile (inductor)"] = (compiled, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001
            print(f"torch.compile skipped: {type(e).__name__}: {str(e)[:300]}", flush=True)

    if with_ort:
        t0 = time.perf_counter()
        try:
            import onnxruntime as ort

            f = Path(tempfile.mkdtemp()) / "net.onnx"
            torch.onnx.export(copy.deepcopy(net), (x,), str(f), dynamo=True, input_names=["x"])
            so = ort.SessionOptions()
            so.intra_op_num_threads = torch.get_num_threads()
            sess = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
            xn = x.numpy()
            sess.run(None, {sess.get_inputs()[0].name: xn})

            def onnx():
                return sess.run(None, {sess.get_inputs()[0].name: xn})[0]

            v[f"ONNX Runtime {ort.__version__}"] = (onnx, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001
            print(f"ONNX Runtime skipped: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return v


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--quick", action="store_true", help="196 px blocks, 2 rounds, no compile (a few minutes)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--batch", type=int, default=1, help="blocks per call (the CPU engine runs one at a time)"
    )
    ap.add_argument("--side", type=int, default=392, help="LR side of each block read (tile + 2 halo)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--no-ort-venv", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=_bench.DOCS)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.side, args.no_compile = 2, 196, True
    with_ort = False
    if not args.no_ort:
        with_ort = ensure_ort() if not args.no_ort_venv else _has_ort()

    from pssr.nn.modelfile import load_model

    m0 = _bench.machine()
    print(_bench.machine_line(m0), flush=True)
    torch.manual_seed(0)
    lm = load_model("em")
    net = lm.net.eval()
    x = make_input(lm, args.batch, args.side)
    variants = build_variants(net, x, with_ort, args.no_compile)
    ref = variants["float32 (baseline)"][0]()
    rng = float(ref.max() - ref.min())
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    diffs = {n: float(np.abs(variants[n][0]().astype(np.float64) - ref).max()) / rng for n in names}
    for r in range(args.rounds):
        tb = None
        for n in names:  # the baseline first in every round, then each lever
            t0 = time.perf_counter()
            variants[n][0]()
            dt = time.perf_counter() - t0
            times[n].append(dt)
            if n == names[0]:
                tb = dt
            ratios[n].append(tb / dt)
            # the baseline again between levers keeps each ratio local in time
            if n != names[0]:
                t0 = time.perf_counter()
                variants[names[0]][0]()
                tb = time.perf_counter() - t0
                times[names[0]].append(tb)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    m1 = _bench.machine()
    out_px = args.batch * (args.side * lm.scale) ** 2
    rows = []
    for n in names:
        rows.append(
            {
                "lever": n,
                "median_s": _bench.median(times[n]),
                "out_mpx_s": out_px / _bench.median(times[n]) / 1e6,
                "speed_ratio": _bench.median(ratios[n]),
                "ratios": ratios[n],
                "max_abs_diff_over_range": diffs[n],
                "setup_s": variants[n][1],
                "within_1e-3": diffs[n] < 1e-3,
            }
        )
    lines = [
        "## CPU levers for the network (issue 13 item 6)",
        "",
        _bench.machine_line(m0, m1),
        f"Input: {args.batch} real ssTEM crops of {args.side}x{args.side} LR px (an interior block read at "
        f"--tile 256), `em` model, x{lm.scale}. {args.rounds} interleaved rounds; speed ratio = median over "
        "rounds of baseline time / lever time (> 1: faster). Difference: max |lever - float32| / float32 "
        "output range (rule: < 0.001).",
        f"Command: `python benchmarks/bench_levers.py{' --quick' if args.quick else ''}`",
        "",
        "| lever | median s / batch | output Mpx/s | speed ratio vs float32 | max abs diff / range | "
        "within 1/1000 | setup / compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lever']} | {r['median_s']:.2f} | {r['out_mpx_s']:.2f} | {r['speed_ratio']:.2f} | "
            f"{r['max_abs_diff_over_range']:.1e} | {'yes' if r['within_1e-3'] else 'no'} | "
            f"{r['setup_s']:.1f} |"
        )
    _bench.report("levers", lines, args, m0, m1, rows=rows)
    plot(rows, args.out / "levers.png")
    return 0


def _has_ort() -> bool:
    try:
        import onnxruntime  # noqa: F401

        return True
    except ImportError:
        return False


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    names = [r["lever"] for r in rows]
    vals = [r["speed_ratio"] for r in rows]
    cols = ["tab:green" if r["within_1e-3"] else "tab:red" for r in rows]
    ax.barh(names, vals, color=cols)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speed vs float32 (median of interleaved rounds); red: output off by > 1/1000 of range")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
