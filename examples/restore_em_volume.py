"""Restore a serial-section EM volume into OME-Zarr with the built-in `em` model, then view it.

    python examples/restore_em_volume.py [INPUT] [OUTPUT.ome.zarr] [--view] [--fidelity]

INPUT defaults to the bundled ISBI ssTEM sample (16 nm pixels, 4 sections). The output is a
4x OME-Zarr pyramid (4 nm pixels) written block by block: kill the script and run it again
and it resumes. With --view the input and the restoration open overlaid in napari.
"""

import argparse
from pathlib import Path

import pssr
from pssr.io import formats as io

SAMPLE = Path(pssr.__file__).parent / "data" / "isbi_em_lr.tif"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("input", nargs="?", default=str(SAMPLE))
    ap.add_argument("output", nargs="?", default="em_restored.ome.zarr")
    ap.add_argument("--model", default="em")
    ap.add_argument("--fidelity", action="store_true")
    ap.add_argument("--view", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    res = pssr.restore(
        args.input, model=args.model, output=args.output, fidelity=args.fidelity, overwrite=args.overwrite
    )
    print(f"restored {args.input} -> {args.output}: {res.output.shape}, pixel size {res.scale} {res.unit}")
    if "fidelity" in res.summary:
        print(f"{100 * res.summary['fidelity']['frac_beyond_3sigma']:.2f}% of input pixels beyond 3 sigma")
    if args.view:
        import napari

        from napari_pssr._logic import restored_geometry

        inp = io.read_image(args.input)
        v = napari.Viewer()
        sc = tuple(inp.scale.get(a, 1.0) for a in inp.axes)
        v.add_image(inp.data, name="input", scale=sc)
        osc, otr = restored_geometry(sc, (0.0,) * len(sc), 4)
        v.add_image(res.output, name="restored", scale=osc, translate=otr)
        napari.run()


if __name__ == "__main__":
    main()
