"""The house rules of docs/architecture.md, checked on the source (imports include lazy ones).

Covers ``pssr/`` and ``napari_pssr/``: no import circle between modules, each package imports
only the layers below it, no private name or private module crosses a module or package, every
package says what it owns in its ``__init__`` docstring, and the core never imports a GUI.
"""

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pssr"
PLUGIN = ROOT / "napari_pssr"

# What each package may import (besides itself); the layers of docs/architecture.md.
BASE = {"pssr", "pssr.errors", "pssr.util", "pssr._version"}
LAYERS: dict[str, set[str]] = {
    "pssr.io": BASE,
    "pssr.degrade": BASE,
    "pssr.nn": BASE | {"pssr.io", "pssr.degrade"},
    "pssr.blockwise": BASE | {"pssr.io", "pssr.degrade", "pssr.nn"},
    "pssr.quality": BASE | {"pssr.io", "pssr.degrade", "pssr.nn", "pssr.blockwise"},
    # training uses block geometry (frame windows) from pssr.blockwise.tiling and nothing else of it
    "pssr.training": BASE | {"pssr.io", "pssr.degrade", "pssr.nn", "pssr.quality", "pssr.blockwise.tiling"},
    "pssr.cli": BASE
    | {"pssr.io", "pssr.degrade", "pssr.nn", "pssr.blockwise", "pssr.quality", "pssr.training"},
    "napari_pssr": BASE | {"pssr.io", "pssr.degrade", "pssr.nn", "pssr.blockwise", "pssr.training"},
}
# The restore path: none of these may import `predict` (which wires them).
RESTORE_PATH = (
    "engine",
    "plan",
    "store",
    "runners",
    "distributed",
    "fidelity",
    "verify",
    "integrity",
    "tiling",
    "inputs",
)
B = "pssr.blockwise."


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every pssr / napari_pssr import in a file (``name`` None for a module)."""
    out: list[tuple[str, str | None]] = []
    mods = _modules()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return  # type hints only: not a runtime dependency
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in mods:  # `from pssr.blockwise import store` imports a module
                    out.append((sub, None))
                else:
                    out.append((node.module, a.name))
        elif isinstance(node, ast.Import):
            out.extend((a.name, None) for a in node.names if a.name.split(".")[0] in PACKAGES)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


PACKAGES = ("pssr", "napari_pssr")


@cache
def _modules() -> dict[str, Path]:
    out = {}
    for top in (PKG, PLUGIN):
        for p in top.rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = p
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t, _ in _imports(p) if t in mods and t != m} for m, p in mods.items()}


def _package(mod: str) -> str:
    if mod.startswith("napari_pssr"):
        return "napari_pssr"
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else mod


def test_no_import_circle():
    graph = {m: {n for n in ns if not m.startswith(n + ".")} for m, ns in _graph().items()}
    state: dict[str, int] = {}

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(n) :], n]))
            if n not in state:
                walk(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])


def test_every_package_imports_only_the_layers_below_it():
    bad = []
    for m, targets in _graph().items():
        own = _package(m)
        allowed = LAYERS.get(own)
        if allowed is None:
            continue  # pssr/__init__, errors, util, _version, __main__: the base and the public face
        for t in targets:
            if _package(t) == own or t in allowed or _package(t) in allowed:
                continue
            bad.append(f"{m} -> {t}")
    assert not bad, "imports against the layers of docs/architecture.md: " + ", ".join(sorted(bad))


def test_every_subpackage_says_what_it_owns():
    for init in [*PKG.glob("*/__init__.py"), PLUGIN / "__init__.py"]:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"{init.relative_to(ROOT)} needs a docstring saying what it owns"
    # The folder names are the map: tiling, formats, networks, training and the plugin.
    assert {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()} >= {
        "io",
        "degrade",
        "nn",
        "blockwise",
        "training",
        "quality",
        "cli",
    }


def test_restore_path_dependencies_run_one_way():
    g = _graph()
    for m in RESTORE_PATH:
        assert B + "predict" not in g[B + m], f"{m} imports predict"
    assert B + "distributed" not in g[B + "runners"] and B + "runners" not in g[B + "distributed"]
    assert B + "engine" in g[B + "runners"] and B + "engine" in g[B + "distributed"]
    assert not {B + "engine", B + "predict", B + "runners"} & g[B + "store"]
    assert not {B + "predict", B + "engine", "pssr.nn.model", "pssr.nn.modelfile"} & g[B + "verify"]
    assert not {B + "engine"} & g[B + "plan"]  # the plan is plain JSON: no torch module


def test_no_private_name_or_module_crosses_modules():
    found = set()
    for m, p in _modules().items():
        for target, name in _imports(p):
            if target == m:
                continue
            if name and name.startswith("_") and not name.startswith("__"):
                found.add((m, target, name))
            private = [s for s in target.split(".")[1:] if s.startswith("_") and s != "__init__"]
            if private and _package(target) != _package(m) and target != "pssr._version":
                found.add((m, target, "module"))
    assert not found, f"private names or modules imported across modules/packages: {sorted(found)}"


def test_the_plugin_never_imports_the_cli():
    for m, targets in _graph().items():
        if m.startswith("napari_pssr"):
            assert not [t for t in targets if t.startswith("pssr.cli")], f"{m} imports the CLI"


def test_core_never_imports_a_gui():
    for p in PKG.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for n in names:
                assert n.split(".")[0] not in {
                    "napari",
                    "qtpy",
                    "PyQt5",
                    "PyQt6",
                    "PySide2",
                    "PySide6",
                    "magicgui",
                }, f"{p.name} imports {n}"


def test_the_restore_command_loads_no_heavy_module_it_does_not_use():
    # Startup is part of every `pssr predict` (docs/benchmarks/e2e-ort.md): scikit-image and
    # scipy.stats are for training, metrics and noise fits; torch._dynamo (~1 s) was pulled in by
    # drawing the initial weights of the meta-device skeleton load_model checks tensor names on.
    # (scipy.ndimage does load: load_model checks a model's crappifier by running it on 4x4 px.)
    import subprocess
    import sys

    code = (
        "import sys, pssr.cli.app, pssr.blockwise.predict\n"
        "from pssr.nn.modelfile import load_model\n"
        "load_model('em'); load_model('em-3d')\n"
        "heavy = ('scipy.stats', 'skimage', 'torch._dynamo')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    env_path = str(PKG.parent)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": env_path, "PATH": ""}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported at startup: {out.stdout.strip()}"
