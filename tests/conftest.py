from pathlib import Path

import numpy as np
import pytest
import torch
from object_servers import fault_proxy, http_server, s3, s3_server  # noqa: F401  (fixtures)

from pssr.degrade.crappify import get_preset
from pssr.nn.model import ModelConfig, build_model
from pssr.nn.modelfile import save_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        # CI lays ../shared/data beside the checkout; a missing copy is a setup error,
        # not a reason to skip silently.
        raise FileNotFoundError(
            f"real test data {path} is missing: the checkout's parent must hold shared/data"
        )
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def isbi(data_dir) -> np.ndarray:
    import tifffile

    return tifffile.imread(_need(data_dir / "em" / "isbi2012_sstem_train.tif"))


@pytest.fixture(scope="session")
def isbi_path(data_dir) -> Path:
    return _need(data_dir / "em" / "isbi2012_sstem_train.tif")


def _make_model(path, frames=1, scale=2, crap="pssr-em"):
    torch.manual_seed(0)
    cfg = ModelConfig(scale=scale, in_channels=frames, size="small", widths=(8, 16), blocks=1)
    net = build_model(cfg)
    with torch.no_grad():  # make the untrained net do something non-trivial
        net.out.weight.mul_(10)
    meta = {"crappifier": get_preset(crap, scale).to_dict()}
    return save_model(path, net, cfg, meta)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """A tiny untrained 2x single-frame model that does something non-trivial (pssr-em crappifier)."""
    return _make_model(tmp_path_factory.mktemp("m") / "m.safetensors")


@pytest.fixture(scope="session")
def mf_model_path(tmp_path_factory):
    return _make_model(tmp_path_factory.mktemp("m") / "mf.safetensors", frames=3)


@pytest.fixture(scope="session")
def em_lr(isbi):
    return get_preset("pssr-em", 2)(isbi[:3, :230, :250], rng=0).astype(np.float32)


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_is_delivered():
    """The Ctrl-C tests need SIGINT delivered to this process and its children.

    A shell that starts pytest in the background without job control (``cmd &`` in a script)
    starts it with SIGINT ignored, and children inherit that: a Ctrl-C test would then wait for
    an interruption that never comes.  Put Python's own handler back for the session.
    """
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
