"""Project-wide rules: the core never imports the GUI; the code is lint-clean."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_never_imports_napari_or_qt():
    code = (
        "import sys, pssr, pssr.cli.app, pssr.blockwise.predict, pssr.training.train\n"
        "import pssr.blockwise.distributed, pssr.cli.commands\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'superqt')]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_import_pssr_is_light():
    r = subprocess.run(
        [sys.executable, "-c", "import sys, pssr; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "False"


def test_ruff_clean():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is part of the dev extra"
    r = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
