"""Plant small realistic bugs one at a time in a scratch copy and check that a test fails for each.

    python scripts/plant_bugs.py [--only NAME] [--out docs/testing-bugs.json]

Each bug is a one-line edit of a function whose mistake would be silent (geometry, degradation,
metrics, checksums, path containment, pyramid, status, overwrite); the listed tests run in the
scratch copy (``python -m pytest -x -q``) and must fail.  Prints the table for docs/testing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (file, original text, planted text, tests to run)
BUGS = {
    "crappifier point sample one HR pixel off-centre at odd scales": (
        "pssr/degrade/crappify.py",
        "    c = scale // 2\n",
        "    c = (scale + 1) // 2\n",
        ["tests/degrade/test_crappify.py"],
    ),
    "PSNR ground truth normalised by hi instead of hi - lo": (
        "pssr/quality/metrics.py",
        "return (gt - lo) / max(hi - lo, 1e-12)",
        "return (gt - lo) / max(hi, 1e-12)",
        ["tests/quality/test_metrics.py"],
    ),
    "PSNR affine fit without its offset": (
        "pssr/quality/metrics.py",
        "    b = g.mean() - a * p.mean()\n",
        "    b = 0.0\n",
        ["tests/quality/test_metrics.py"],
    ),
    "EM degradation biased (noise not centred on the signal)": (
        "pssr/degrade/crappify.py",
        "def point_sample(image: np.ndarray, scale: int, *, blur_sigma: float = 0.0)",
        None,
        ["tests/degrade/test_crappify.py"],
    ),
    "block checksum over half of the bytes": (
        "pssr/io/formats.py",
        "        h.update(a.tobytes())\n",
        "        h.update(a.tobytes()[: a.nbytes // 2])\n",
        ["tests/blockwise/test_verify_overwrite.py"],
    ),
    "TIFF verify skips the last block": (
        "pssr/io/formats.py",
        "        for idx, ys, xs in cells:\n",
        "        for idx, ys, xs in cells[:-1]:\n",
        ["tests/blockwise/test_verify_overwrite.py"],
    ),
    "OME-Zarr verify skips block checksums": (
        "pssr/blockwise/verify.py",
        '    if isinstance(attrs, dict) and attrs.get("checksums"):\n',
        "    if False:\n",
        ["tests/blockwise/test_integrity.py"],
    ),
    "path containment ignores the input's zarr container": (
        "pssr/blockwise/integrity.py",
        "    top = p\n    for q in p.parents:",
        "    top = p\n    for q in []:",
        ["tests/blockwise/test_unfinished.py"],
    ),
    "path containment compares unresolved paths": (
        "pssr/blockwise/integrity.py",
        "    ins = [Path(p).resolve() for p in inputs if p is not None]",
        "    ins = [Path(p) for p in inputs if p is not None]",
        ["tests/blockwise/test_integrity.py"],
    ),
    "pyramid level by decimation instead of the 2x2 mean": (
        "pssr/io/pyramid.py",
        None,
        None,
        ["tests/blockwise/test_pyramid.py"],
    ),
    "unfinished output read as complete": (
        "pssr/io/formats.py",
        '        if status is not None and status != "complete":\n',
        '        if status is not None and status not in ("complete", "running"):\n',
        ["tests/blockwise/test_unfinished.py"],
    ),
    "--overwrite deletes the old TIFF at the start": (
        "pssr/blockwise/store.py",
        "    if work.exists() and hidden:\n        shutil.rmtree(work)\n",
        "    if work.exists() and hidden:\n        shutil.rmtree(work)\n    for p in existing:\n"
        "        if p.is_file():\n            p.unlink()\n",
        ["tests/blockwise/test_verify_overwrite.py"],
    ),
    "output origin shifted the wrong way": (
        "pssr/blockwise/store.py",
        "in_origin.get(a, 0.0) - ((s - 1) / 2",
        "in_origin.get(a, 0.0) + ((s - 1) / 2",
        ["tests/blockwise/test_predict.py", "tests/io/test_io.py"],
    ),
    "halo halved": (
        "pssr/blockwise/predict.py",
        "        halo=int(lm.halo),",
        "        halo=int(lm.halo) // 2,",
        ["tests/blockwise/test_predict.py"],
    ),
}


def _plant(copy: Path, name: str) -> None:
    f, old, new, _ = BUGS[name]
    p = copy / f
    s = p.read_text()
    if name.startswith("EM degradation"):
        old = "    lr = undersample(image, scale, mode=mode, blur_sigma=probe_sigma)\n"
        if old not in s:
            raise SystemExit(f"{name}: anchor not found in {f}")
        s = s.replace(old, old + "    lr = lr + 0.05 * float(lr.max() - lr.min())\n", 1)
    elif name.startswith("pyramid"):
        import re

        pat = re.compile(r"def downsample2\(a: np.ndarray, dtype: str \| np.dtype\) -> np.ndarray:\n")
        m = pat.search(s)
        if not m:
            raise SystemExit(f"{name}: anchor not found in {f}")
        body = '    """Planted: decimation."""\n    return cast(np.asarray(a)[..., ::2, ::2][..., : a.shape[-2] // 2, : a.shape[-1] // 2], dtype)\n'
        s = s[: m.end()] + body + "\n\ndef _unused_downsample2(a, dtype):\n" + s[m.end() :]
    else:
        if s.count(old) < 1:
            raise SystemExit(f"{name}: anchor {old!r} not found in {f}")
        s = s.replace(old, new, 1)
    p.write_text(s)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="run the bugs whose name contains this")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N bugs")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for k, (name, (f, _, _, tests)) in enumerate(BUGS.items()):
        if k < args.skip or (args.only and args.only not in name):
            continue
        with tempfile.TemporaryDirectory(prefix="pssr-plant-") as d:
            copy = Path(d) / "pssr"
            shutil.copytree(
                ROOT, copy, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__")
            )
            (Path(d) / "shared").symlink_to(
                ROOT.parent.parent / "shared"
            )  # the real test data, as CI lays it
            _plant(copy, name)
            env = {**os.environ, "PYTHONPATH": str(copy)}
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                   "--no-header", "-rf", *tests]  # fmt: skip
            r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=1500)
            failed = [ln.split(" ")[1] for ln in r.stdout.splitlines() if ln.startswith("FAILED ")]
            if not failed:
                print(r.stdout[-3000:], r.stderr[-2000:], file=sys.stderr)
            rows.append({"bug": name, "file": f, "caught": r.returncode == 1 and bool(failed),
                         "failing_test": failed[0] if failed else None, "rc": r.returncode})  # fmt: skip
            print(f"| {name} | `{f}` | {'`' + failed[0] + '`' if failed else 'NOT CAUGHT (rc ' + str(r.returncode) + ')'} |",
                  flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["caught"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
