"""Batch-restore a folder of images or a zarr dataset on a dask cluster.

    python examples/batch_dask.py INPUT_DIR_OR_ZARR OUTPUT_DIR [--workers 2 | --scheduler tcp://host:8786]

Every image in INPUT (TIFF/zarr/OME-Zarr, or the one zarr volume) becomes
OUTPUT_DIR/<name>.ome.zarr.  Blocks run as dask tasks (retried if a worker dies); outputs
that are complete are skipped and interrupted ones resume, so the same command can be rerun
after a crash.  On Slurm, start the cluster with dask-jobqueue and pass its address
(see docs/distributed.md).
"""

import argparse
from pathlib import Path

import zarr

import pssr


def inputs(path: Path):
    if path.suffix == ".zarr" or (path / "zarr.json").exists():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix.lower() in (".tif", ".tiff", ".zarr"))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--model", default="em")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--tile", type=int, default=None)
    args = ap.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    for src in inputs(args.input):
        out = args.output / (src.name.split(".")[0] + ".ome.zarr")
        if (
            out.exists()
            and zarr.open_group(str(out), mode="r").attrs.get("pssr", {}).get("status") == "complete"
        ):
            print(f"skip {src.name}: done")
            continue
        res = pssr.restore(
            str(src),
            model=args.model,
            output=out,
            tile=args.tile,
            workers=None if args.scheduler else args.workers,
            scheduler=args.scheduler,
        )
        print(f"{src.name} -> {out} ({res.summary['blocks']} blocks, {res.summary['seconds']} s)")


if __name__ == "__main__":
    main()
