import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from pssr.cli.app import main
from pssr.io import formats as io


def run(*args):
    return subprocess.run([sys.executable, "-m", "pssr", *args], capture_output=True, text=True)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("pssr ")
    r = run("--help")
    assert r.returncode == 0 and "crappify" in r.stdout


def test_crappify_real_stack_tiff_and_zarr(tmp_path, isbi_path, capsys):
    assert main(["-q", "crappify", str(isbi_path), str(tmp_path / "lr.tif"), "--seed", "3"]) == 0
    img = io.read_image(tmp_path / "lr.tif")
    assert img.shape == (30, 128, 128) and img.axes == "ZYX"
    assert img.scale["X"] == pytest.approx(0.016) and img.scale["Z"] == pytest.approx(0.05)
    assert (
        main(
            [
                "-q",
                "crappify",
                str(isbi_path),
                str(tmp_path / "lr.ome.zarr"),
                "--preset",
                "pssr-em",
                "--scale",
                "2",
            ]
        )
        == 0
    )
    z = io.read_image(tmp_path / "lr.ome.zarr")
    assert z.shape == (30, 256, 256) and z.scale["Y"] == pytest.approx(0.008)


def test_same_seed_same_output(tmp_path, isbi_path):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, tifffile.imread(isbi_path)[:2])
    for n in ("a", "b"):
        assert main(["-q", "crappify", str(src), str(tmp_path / f"{n}.tif"), "--seed", "5"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif"))


def test_cli_errors_are_one_line(tmp_path, isbi_path):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.zeros((2, 2), np.uint8))
    out = tmp_path / "o.tif"
    cases = [
        ((str(tmp_path / "nope.tif"), str(out)), "does not exist"),
        ((str(src), str(out)), "smaller than the scale 4"),
        ((str(isbi_path), str(out), "--scale", "1"), "--scale 1: must be an integer >= 2"),
        ((str(isbi_path), str(tmp_path / "o.jpg")), "must end in .tif"),
        ((str(isbi_path), str(tmp_path / "no" / "o.tif")), "does not exist; create it"),
    ]
    for args, msg in cases:
        r = run("crappify", *args)
        assert r.returncode == 2, r.stderr
        assert msg in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_output_refused_and_input_untouched(tmp_path, isbi_path):
    out = tmp_path / "o.tif"
    out.write_bytes(b"keep")
    before = isbi_path.read_bytes()
    r = run("crappify", str(isbi_path), str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert out.read_bytes() == b"keep"
    assert isbi_path.read_bytes() == before


def test_nan_input(tmp_path):
    src = tmp_path / "nan.tif"
    a = np.ones((32, 32), np.float32)
    a[3, 3] = np.nan
    tifffile.imwrite(src, a)
    r = run("crappify", str(src), str(tmp_path / "o.tif"))
    assert r.returncode == 2 and "NaN" in r.stderr
    assert not (tmp_path / "o.tif").exists()


def test_fit_noise_cli(tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.poisson(np.full((256, 256), 0.5) * 30) / 30 * 200).astype(np.float32)
    tifffile.imwrite(tmp_path / "n.tif", img)
    r = run("fit-noise", str(tmp_path / "n.tif"))
    assert r.returncode == 0 and '"dose"' in r.stdout
    fit = json.loads(r.stdout)
    assert fit["dose"] == pytest.approx(30, rel=0.1), fit  # the image was made with a dose of 30
    assert fit["read_sigma"] < 0.01, fit  # and no read noise


def test_crappify_noise_from_a_real_image(tmp_path, isbi_path, capsys):
    lr = tmp_path / "lr.tif"
    args = ["-q", "crappify", str(isbi_path), str(lr), "--noise-from", str(isbi_path), "--seed", "1"]
    assert main(args) == 0
    ref = tmp_path / "ref.tif"
    assert main(["-q", "crappify", str(isbi_path), str(ref), "--seed", "1"]) == 0
    # The fitted noise is not the preset's default, so the two crappified stacks differ.
    assert not np.array_equal(io.read_image(lr).data, io.read_image(ref).data)
    # The built-ins' own degradation takes --noise-from too (issue 27 item 4): only its noise level
    # (pssr-em's var_factor) is refitted, so the result differs from the preset's nominal noise.
    fit = tmp_path / "fit.tif"
    nominal = tmp_path / "nominal.tif"
    pe = ["--preset", "pssr-em", "--seed", "1"]
    assert main(["-q", "crappify", str(isbi_path), str(fit), *pe, "--noise-from", str(isbi_path)]) == 0
    assert main(["-q", "crappify", str(isbi_path), str(nominal), *pe]) == 0
    a, b = io.read_image(fit).data, io.read_image(nominal).data
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_noise_from_adds_the_fitted_noise_in_intensity_units_whatever_the_dtypes(tmp_path, isbi_path):
    """A fit's dose is relative to the intensity it was made at: the degradation carries that full scale,
    so the noise added matches the fitted image's in intensity units, for any dtype of either image."""
    from pssr.degrade.crappify import estimate_noise

    vol = io.read_image(isbi_path).data[:2, :256, :256]
    noise_u8, noise_f = tmp_path / "n16.tif", tmp_path / "nf.tif"
    src = tmp_path / "lr_real.tif"
    # a real low-dose-like image: the ISBI section with added Poisson-Gaussian noise, as uint8 and float32
    rng = np.random.default_rng(0)
    noisy = np.clip(rng.poisson(vol[0].astype(np.float64) / 4) * 4 + rng.normal(0, 3, vol[0].shape), 0, 255)
    # uint16 using a small part of its range (full scale 65535) and the same pixels as float32
    io.write_tiff(noise_u8, (noisy * 4).astype(np.uint16), axes="YX")
    io.write_tiff(noise_f, (noisy * 4).astype(np.uint16).astype(np.float32), axes="YX")
    io.write_tiff(src, (vol.astype(np.float32) * 40).astype(np.uint16), axes="ZYX")  # HR in other units
    fits = []
    for ref in (noise_u8, noise_f):
        out = tmp_path / f"lr_{ref.stem}.tif"
        assert (
            main(
                [
                    "-q",
                    "crappify",
                    str(src),
                    str(out),
                    "--preset",
                    "em",
                    "--noise-from",
                    str(ref),
                    "--seed",
                    "0",
                ]
            )
            == 0
        )
        fits.append(estimate_noise(io.read_image(out).data[0].astype(np.float32), full_scale=255.0 * 40))
    # the same noise in intensity units whichever dtype the noise image had
    assert fits[0]["gain"] == pytest.approx(fits[1]["gain"], rel=0.15)
    assert fits[0]["sigma"] == pytest.approx(fits[1]["sigma"], rel=0.25, abs=2e-4)
