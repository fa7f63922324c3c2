"""Network cost and speed per size preset, with the original-PSSR design measured in the same run.

    python benchmarks/bench_model.py [--threads 2] [--out docs/benchmarks/model.md]

Prints (and writes as Markdown) parameters, forward FLOPs per output pixel (torch
FlopCounterMode), training throughput (patches/s: batch 8, 48x48 LR patches, forward +
backward + AdamW step) and inference speed (output megapixels/s on a 256x256 LR tile),
and each preset's ratio to the original design.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from pssr.nn.model import ModelConfig, build_model, flops_per_output_pixel, n_parameters

CONFIGS = [
    ("srunet small", ModelConfig(size="small")),
    ("srunet base", ModelConfig(size="base")),
    ("srunet large", ModelConfig(size="large")),
    ("original PSSR (ResNet-34 U-Net at HR, attention)", ModelConfig(arch="pssr-resunet", attention=True)),
]


def train_rate(net, scale: int, batch: int = 8, patch: int = 48, seconds: float = 8.0) -> float:
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x = torch.rand(batch, 1, patch, patch)
    y = torch.rand(batch, 1, patch * scale, patch * scale)
    net.train()
    for _ in range(2):  # warm-up
        opt.zero_grad()
        (net(x) - y).abs().mean().backward()
        opt.step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        opt.zero_grad()
        (net(x) - y).abs().mean().backward()
        opt.step()
        n += 1
    return n * batch / (time.perf_counter() - t0)


@torch.no_grad()
def infer_rate(net, scale: int, size: int = 256, seconds: float = 6.0) -> float:
    net.eval()
    x = torch.rand(1, 1, size, size)
    net(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        net(x)
        n += 1
    return n * (size * scale) ** 2 / (time.perf_counter() - t0) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name, cfg in CONFIGS:
        net = build_model(cfg)
        rows.append(
            {
                "name": name,
                "params": n_parameters(net),
                "flops": flops_per_output_pixel(net),
                "train": train_rate(net, cfg.scale, seconds=args.seconds),
                "infer": infer_rate(net, cfg.scale, seconds=args.seconds * 0.75),
            }
        )
        print(f"{name}: done", flush=True)
    ref = rows[-1]
    head = (
        f"Machine: {platform.machine()} CPU, {args.threads} torch threads, torch {torch.__version__}. "
        "Scale 4, 1 input frame.\nCommand: `python benchmarks/bench_model.py`\n"
    )
    lines = [
        head,
        "| model | parameters | kFLOP / output px | train patches/s | infer output MP/s | "
        "FLOPs vs original | train speed vs original | infer speed vs original |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['flops'] / 1e3:.1f} | {r['train']:.1f} | "
            f"{r['infer']:.2f} | {r['flops'] / ref['flops']:.3f}x | {r['train'] / ref['train']:.1f}x | "
            f"{r['infer'] / ref['infer']:.1f}x |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
