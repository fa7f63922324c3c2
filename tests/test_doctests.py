"""The examples in the public docstrings run (``doctest``), each module in a fresh folder.

Every name in ``pssr.__all__`` (and the package itself) must carry an example, so a new public
function without one fails here; a failing or missing example fails too.
"""

import doctest
import importlib
import inspect

import pytest

import pssr

MODULES = [
    "pssr",
    "pssr.errors",
    "pssr.io.formats",
    "pssr.quality.metrics",
    "pssr.degrade.crappify",
    "pssr.nn.modelfile",
    "pssr.blockwise.predict",
    "pssr.blockwise.verify",
    "pssr.quality.evaluate",
    "pssr.training.train",  # two steps of a tiny network: about 5 s on 2 busy cores
]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write relative paths (cells.tif, restored.ome.zarr)
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} failed in {name} (see above)"


@pytest.mark.parametrize("name", [n for n in pssr.__all__ if n != "__version__"])
def test_every_public_name_has_an_example_in_a_tested_module(name):
    obj = getattr(pssr, name)
    assert ">>>" in (inspect.getdoc(obj) or ""), f"pssr.{name} has no example in its docstring"
    assert obj.__module__ in MODULES, f"pssr.{name} is defined in {obj.__module__}, which the doctests skip"


def test_package_docstring_has_an_example():
    assert ">>>" in (pssr.__doc__ or "")


def test_version_is_the_installed_metadata_or_the_source_file():
    from importlib import metadata

    from pssr import _version

    try:
        expected = metadata.version("pssr-toolkit")
    except metadata.PackageNotFoundError:
        expected = _version.__version__
    assert isinstance(pssr.__version__, str) and pssr.__version__ == expected


def test_dir_lists_the_lazy_entry_points_without_importing_them():
    import subprocess
    import sys

    code = "import sys, pssr; d = dir(pssr); print(all(n in d for n in pssr.__all__), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
