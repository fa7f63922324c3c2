"""Bookkeeping at a million blocks: record, resume and verify time per block (issue 23 item 5).

A sparse declared output (one plane of ``side`` x ``side`` pixels at ``--tile`` 32 and scale 1:
``(side/32)^2`` blocks, no chunk written, so the numbers are the bookkeeping's and not the
network's or the disk's bandwidth) goes through what a run does with its done records:

* **record**: each block's done record (its stats, input and output checksums, as a real block's)
  appended to the ledger a batch of 4 at a time (one write and one fsync per batch, as
  :func:`pssr.blockwise.engine.write_group` does);
* **load**: what a resumed run reads first (:meth:`LocalLedger.load`);
* **resume check**: :func:`pssr.blockwise.store.verified_done`, every done block read back and
  compared with its checksum (here: missing chunks, read as the fill value);
* **finish**: :func:`pssr.blockwise.store.finish_zarr` (checksums array, metadata) without the
  pyramid, and **verify**: ``pssr verify``'s block check (every block against its checksum) --
  the pyramid check is left out (it reads pyramid chunks, not bookkeeping).

The baseline in the same run is the previous bookkeeping, one JSON marker file per block
(written to a temporary file and renamed), at ``--baseline-blocks`` (a million files is what the
issue wants to avoid).  Results: docs/benchmarks/bookkeeping.md / .json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402


def _job(out: Path, side: int, tile: int):
    from pssr.blockwise.plan import Job

    return Job(
        input="<declared>", input_axes="ZYX", input_array=None, model="bilinear:1", scale=1, frames=1,
        context_axis=None, lo=0.0, hi=255.0, full_scale=255.0, tile=tile, halo=0, out=str(out),
        out_dtype="uint8",
    )  # fmt: skip


def _old_markers(d: Path, items) -> float:
    """The per-block marker files of pssr before the ledger (tmp file + rename per block)."""
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    for key, stats in items:
        tmp = d / f".{key}.tmp"
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, d / key)
    return time.perf_counter() - t0


def _old_load(d: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    res = {}
    for f in d.iterdir():
        if not f.name.startswith("."):
            res[f.name] = json.loads(f.read_text() or "{}")
    return time.perf_counter() - t0, len(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1_000_000, help="about this many blocks (a square plane)")
    ap.add_argument("--baseline-blocks", type=int, default=100_000)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=_bench.DOCS)
    args = ap.parse_args()

    import zarr

    from pssr.blockwise import store
    from pssr.blockwise.integrity import digest
    from pssr.blockwise.ledger import LocalLedger
    from pssr.blockwise.tiling import group_blocks, plan_blocks
    from pssr.blockwise.verify import _check_blocks

    m0 = _bench.machine()
    root = Path(tempfile.mkdtemp(prefix="pssr-bench-bk-", dir=args.dir))
    try:
        side = int(round(args.blocks**0.5)) * args.tile
        shape = (1, side, side)
        out = root / "o.ome.zarr"
        job = _job(out, side, args.tile)
        t = time.perf_counter()
        blocks = plan_blocks(shape, args.tile, 0)
        t_plan = time.perf_counter() - t
        n = len(blocks)
        store.create_store(out, job, shape)
        g = zarr.open_group(str(out), mode="r+")
        fill = store.fill_digest(g["s0"], blocks[0].out_slices(1))
        rec = {"empty": False, "input": digest(b"x"), "digest": {"s0": fill}}
        led = store.ledger(out)
        t = time.perf_counter()
        for grp in group_blocks(blocks, 4):
            led.record([(b.key, rec) for b in grp])
        t_record = time.perf_counter() - t
        led.close()
        log_bytes = sum(f.stat().st_size for f in (out / ".pssr" / "done").iterdir())
        t = time.perf_counter()
        done = LocalLedger(out / ".pssr" / "done").load()
        t_load = time.perf_counter() - t
        assert len(done) == n
        t = time.perf_counter()
        good = store.verified_done(g, job, blocks, done)
        t_check = time.perf_counter() - t
        assert len(good) == n
        t = time.perf_counter()
        # finish without the pyramid (built=True and no levels: one level only at this tile)
        store.finish_zarr(out, job, "ZYX", {}, None, {"blocks": n}, done, built=True)
        t_finish = time.perf_counter() - t
        g = zarr.open_group(str(out), mode="r")
        t = time.perf_counter()
        n_checked = _check_blocks(out, g, dict(g.attrs["pssr"]), progress=False)
        t_verify = time.perf_counter() - t
        assert n_checked == n

        nb = min(args.baseline_blocks, n)
        items = [(b.key, rec) for b in blocks[:nb]]
        t_old = _old_markers(root / "old", items)
        t_old_load, n_old = _old_load(root / "old")
        assert n_old == nb
        t_new_small = time.perf_counter()
        led2 = LocalLedger(root / "new-small")
        for grp in group_blocks(blocks[:nb], 4):
            led2.record([(b.key, rec) for b in grp])
        t_new_small = time.perf_counter() - t_new_small
        led2.close()
        t = time.perf_counter()
        assert len(LocalLedger(root / "new-small").load()) == nb
        t_new_small_load = time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)
    m1 = _bench.machine()

    us = lambda s, k: 1e6 * s / k  # noqa: E731
    rows = [
        ("plan the blocks", t_plan, n),
        ("record (ledger, batches of 4, fsync per batch)", t_record, n),
        ("load on resume (ledger)", t_load, n),
        ("resume check: every block read back vs checksum", t_check, n),
        ("finish: checksums array + metadata", t_finish, n),
        ("verify: every block against its checksum", t_verify, n),
        (f"baseline: record, one marker file per block ({nb:,} blocks)", t_old, nb),
        (f"baseline: load, one marker file per block ({nb:,} blocks)", t_old_load, nb),
        (f"ledger at the baseline's count: record ({nb:,} blocks)", t_new_small, nb),
        (f"ledger at the baseline's count: load ({nb:,} blocks)", t_new_small_load, nb),
    ]
    lines = [
        f"# Bookkeeping at {n:,} blocks (issue 23 item 5)",
        "",
        f"A sparse declared output of shape {shape} at tile {args.tile} (scale 1): {n:,} blocks, "
        "no chunk written (every block reads as the fill value), so the times are the bookkeeping's.",
        "Reproduce: `python benchmarks/bench_bookkeeping.py` "
        f"(`--blocks {args.blocks} --baseline-blocks {args.baseline_blocks}`).",
        "",
        "| step | blocks | total s | per block |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {k:,} | {s:.1f} | {us(s, k):.0f} us |" for name, s, k in rows],
        "",
        f"Ledger size: {log_bytes / 1e6:.0f} MB in 1 file ({log_bytes / n:.0f} bytes per block); "
        f"the baseline wrote {nb:,} files.",
        "",
        _bench.machine_line(m0, m1),
    ]
    _bench.report(
        "bookkeeping", lines, args, m0, m1, blocks=n, shape=list(shape),
        seconds={name: s for name, s, _ in rows}, counts={name: k for name, _, k in rows},
        log_bytes=log_bytes,
    )  # fmt: skip


if __name__ == "__main__":
    main()
