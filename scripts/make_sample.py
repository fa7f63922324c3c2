"""Regenerate the small bundled EM sample in pssr/data from ../shared/data.

The sample is a 4 x 256 x 256 crop of the ISBI 2012 ssTEM training volume (sections
26-29, which no built-in model trains on) and its 4x low-resolution version made with
the original PSSR EM degradation (seed 0).

    python scripts/make_sample.py
"""

from pathlib import Path

import tifffile

from pssr.degrade.crappify import crappify
from pssr.io import formats as io

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT.parent / "shared" / "data" / "em" / "isbi2012_sstem_train.tif"
OUT = ROOT / "pssr" / "data"


def main() -> None:
    vol = tifffile.imread(SRC)
    hr = vol[26:30, 128:384, 128:384]
    lr = crappify(hr, "pssr-em", scale=4, rng=0)
    scale = {"X": 0.004, "Y": 0.004, "Z": 0.05}
    io.write_tiff(OUT / "isbi_em_hr.tif", hr, axes="ZYX", scale=scale, unit="micrometer", overwrite=True)
    io.write_tiff(
        OUT / "isbi_em_lr.tif",
        lr,
        axes="ZYX",
        scale={"X": 0.016, "Y": 0.016, "Z": 0.05},
        unit="micrometer",
        overwrite=True,
    )
    print("wrote", OUT / "isbi_em_hr.tif", hr.shape, "and", OUT / "isbi_em_lr.tif", lr.shape)


if __name__ == "__main__":
    main()
