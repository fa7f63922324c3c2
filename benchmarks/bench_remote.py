"""Restoring from (and to) an S3 server vs the local disk (issue 24 item 5).

Starts moto's S3 server on loopback in its own process (so it does not share this process's
GIL), puts the same zarr input there and on the local disk, and restores it with ``bilinear:4``
(I/O bound: the network is a resize) and ``em`` (compute bound), interleaving the variants round by
round; reports medians and the ratio to local -> local.  Variants:

- ``local->local``: zarr on disk -> OME-Zarr on disk (the baseline);
- ``s3->local``: the same zarr on the S3 server -> OME-Zarr on disk;
- ``s3->s3``: S3 -> OME-Zarr on the S3 server (when the output backend supports it).

    python benchmarks/bench_remote.py [--rounds 3] [--sections 4] [--size 1024] [--em-size 512]

Goal: ``bilinear:4`` within 20 % of local at the default tile.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[str, subprocess.Popen]:
    port = free_port()
    code = (
        "import time, logging; logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
        "from moto.server import ThreadedMotoServer as T\n"
        f"s = T(ip_address='127.0.0.1', port={port}, verbose=False); s.start(); time.sleep(10**7)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
            break
        except Exception:
            time.sleep(0.05)
    return endpoint, proc


def upload(store, folder: Path, key: str) -> None:
    import obstore

    for p in sorted(folder.rglob("*")):
        if p.is_file():
            obstore.put(store, f"{key}/{p.relative_to(folder).as_posix()}", p.read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sections", type=int, default=4, help="sections of the real ssTEM stack")
    ap.add_argument("--size", type=int, default=1024, help="LR section size for bilinear:4")
    ap.add_argument("--em-size", type=int, default=512, help="LR section size for em (compute bound)")
    ap.add_argument("--models", default="bilinear:4,em")
    ap.add_argument("--variants", default="local->local,s3->local,s3->s3")
    ap.add_argument("--out", type=Path, default=_bench.DOCS)
    ap.add_argument("--name", default="remote", help="result file name under --out")
    args = ap.parse_args()

    import tifffile
    import zarr
    from obstore.store import S3Store

    import pssr

    m0 = _bench.machine()
    stack = tifffile.imread(_bench.EM_STACK)[: args.sections]
    endpoint, proc = start_moto()
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint, AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )  # fmt: skip
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    store = S3Store("bench", endpoint=endpoint, region="us-east-1", client_options={"allow_http": True})
    results: dict[str, dict[str, list[float]]] = {}
    server_cpu: dict[str, dict[str, list[float]]] = {}  # CPU seconds the S3 server used during each run
    lines = []
    try:
        inputs = {}
        for model in args.models.split(","):
            size = args.size if model.startswith("bilinear") else args.em_size
            vol = np.ascontiguousarray(stack[:, :size, :size])
            local = tmp / f"in-{size}.zarr"
            if not local.exists():
                z = zarr.create_array(str(local), shape=vol.shape, chunks=(1, 512, 512), dtype=vol.dtype)
                z[:] = vol
                upload(store, local, f"in-{size}.zarr")
            inputs[model] = (str(local), f"s3://bench/in-{size}.zarr", vol.shape)
        for r in range(args.rounds):
            for model in args.models.split(","):
                local_in, s3_in, shape = inputs[model]
                for variant in args.variants.split(","):
                    src = local_in if variant.startswith("local") else s3_in
                    name = f"r{r}-{model.replace(':', '')}-{variant.replace('->', '-')}.ome.zarr"
                    out = str(tmp / name) if variant.endswith("local") else f"s3://bench/out/{name}"
                    t0 = time.perf_counter()
                    cpu0 = _cpu(proc.pid)
                    try:
                        res = pssr.restore(src, model=model, output=out, axes="ZYX", progress=False)
                    except Exception as e:  # e.g. an output backend not there yet
                        print(f"{model} {variant}: {type(e).__name__}: {e}", file=sys.stderr)
                        continue
                    dt = time.perf_counter() - t0
                    results.setdefault(model, {}).setdefault(variant, []).append(dt)
                    server_cpu.setdefault(model, {}).setdefault(variant, []).append(_cpu(proc.pid) - cpu0)
                    print(
                        f"round {r} {model:<11} {variant:<13} {dt:7.2f} s  retries {res.summary['retries']}"
                    )
                    if variant.endswith("local"):
                        shutil.rmtree(tmp / name, ignore_errors=True)
        m1 = _bench.machine()
        lines.append("## Restoring from and to an S3 server vs the local disk (issue 24)")
        lines.append("")
        lines.append(_bench.machine_line(m0, m1))
        lines.append(
            f"S3: moto {_version('moto')} on loopback in its own process. Input: the first "
            f"{args.sections} sections of the real ssTEM stack as zarr (chunks 1 x 512 x 512), "
            f"{args.size}^2 for bilinear:4, {args.em_size}^2 for em; output OME-Zarr (pyramid, checksums, "
            f"verified), default tile. Median of {args.rounds} interleaved rounds."
        )
        lines.append("")
        head = "| model | variant | seconds (rounds) | median | "
        lines.append(head + "median of per-round ratios to local->local | S3 server CPU s (median) |")
        lines.append("|---|---|---|---|---|---|")
        ratios: dict[str, dict[str, float]] = {}
        for model, by in results.items():
            base = by.get("local->local", [])
            for variant, ts in by.items():
                med = _bench.median(ts)
                runs = ", ".join(f"{t:.2f}" for t in ts)
                r = _bench.median([t / b for t, b in zip(ts, base, strict=False)]) if base else float("nan")
                ratios.setdefault(model, {})[variant] = r
                cpu = _bench.median(server_cpu[model][variant])
                lines.append(f"| {model} | {variant} | {runs} | {med:.2f} | {r:.2f}x | {cpu:.2f} |")
        extra = {"results": results, "ratios": ratios, "server_cpu": server_cpu, "endpoint": "loopback moto"}
        _bench.report(args.name, lines, args, m0, m1, **extra)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
