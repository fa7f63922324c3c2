"""The house rules of docs/architecture.md, checked on the source (imports include lazy ones)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pssr"

# Private names still imported across modules: each is a debt to pay, never a new entry.
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()
# The restore path: none of these may import `predict` (which wires them).
RESTORE_PATH = (
    "engine",
    "store",
    "runners",
    "distributed",
    "fidelity",
    "verify",
    "pyramid",
    "integrity",
    "tiling",
)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every pssr import in a file (``name`` None for a module import)."""
    out: list[tuple[str, str | None]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return  # type hints only: not a runtime dependency
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pssr":
            for a in node.names:
                if node.module == "pssr":
                    out.append((f"pssr.{a.name}", None))
                else:
                    out.append((node.module, a.name))
        elif isinstance(node, ast.Import):
            out.extend((a.name, None) for a in node.names if a.name.startswith("pssr."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def _modules() -> dict[str, Path]:
    return {f"pssr.{p.stem}": p for p in PKG.glob("*.py") if p.stem != "__init__"}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t, _ in _imports(p) if t in mods and t != m} for m, p in mods.items()}


def test_no_import_circle():
    graph = _graph()
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


def test_restore_path_dependencies_run_one_way():
    g = _graph()
    for m in RESTORE_PATH:
        assert "pssr.predict" not in g[f"pssr.{m}"], f"{m} imports predict"
    assert "pssr.distributed" not in g["pssr.runners"] and "pssr.runners" not in g["pssr.distributed"]
    assert "pssr.engine" in g["pssr.runners"] and "pssr.engine" in g["pssr.distributed"]
    assert not {"pssr.engine", "pssr.predict", "pssr.runners"} & g["pssr.store"]
    assert not {"pssr.predict", "pssr.engine", "pssr.model", "pssr.modelfile"} & g["pssr.verify"]


def test_no_private_name_crosses_modules():
    found = set()
    for m, p in _modules().items():
        for target, name in _imports(p):
            if name and name.startswith("_") and not name.startswith("__") and target != m:
                found.add((m, target, name))
    assert found <= KNOWN_PRIVATE, (
        f"private names imported from another module: {sorted(found - KNOWN_PRIVATE)}"
    )


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
        "import sys, pssr.cli, pssr.predict\n"
        "from pssr.modelfile import load_model\n"
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
