"""ONNX Runtime as the network's CPU backend: export once per model, cache the file, run it.

ONNX Runtime ran the ``em`` network 2.8x faster than torch on a 2-core CPU at 2.2e-7 of the
output range (docs/benchmarks/levers.md); end to end: docs/benchmarks/backend.md.  Only the
network call changes: batching, test-time augmentation and normalisation stay in
:class:`pssr.blockwise.engine.Predictor`.

The network is exported with ``torch.onnx.export`` (the dynamo exporter, which needs
``onnxscript``) with a dynamic batch and dynamic height and width.  A network pads its input to
a multiple of ``config.multiple`` (:attr:`pssr.nn.model.ModelConfig.multiple`) and that padding
depends on the remainder of the size, so one graph covers all sizes ``multiple * k + r`` of one
remainder ``r`` (per axis); the engine's reads have remainder 0 except at the bottom and right
edges of an image whose size is not a multiple, so most restorations need one graph, at most
four (eight with test-time augmentation, which swaps height and width).

Each graph is cached in ``$PSSR_CACHE/onnx`` (default ``~/.cache/pssr/onnx``), named by a hash
of what the network holds (its weights and configuration: a model file, or a network changed
in memory), the input channels, the remainder and the torch version; it is written atomically
(a temporary file renamed into place: processes that export the same model at once each write
a whole file).  A cached file is never trusted: before its first use in a process, its output
on a probe input must match the torch network's within 1e-4 of the output range; a file that
cannot be read or does not match is exported again.

The runtime is optional (``pip install 'pssr-toolkit[onnx]'``); ``backend="auto"`` uses it
when it is installed, the device is the CPU and the precision float32 (:func:`resolve_backend`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pssr.errors import BackendError
from pssr.nn.modelfile import LoadedModel

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "BackendError",
    "OnnxNetwork",
    "available",
    "cache_dir",
    "check_runs_here",
    "missing",
    "model_digest",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "onnxruntime")
INSTALL = "pip install 'pssr-toolkit[onnx]'"
REQUIRES = ("onnxruntime", "onnx", "onnxscript")  # onnxscript: torch's (dynamo) ONNX exporter
PROBE_TOLERANCE = 1e-4  # of the output range: a cached or fresh graph must match torch this well
_FORMAT = 1  # bump when what is exported changes (old cache files are then never picked up)
# Graphs (model digest, remainder, sha256 of the bytes) that passed the probe in this process: a
# restoration checks its graphs before the run and its Predictor loads them again.
_CHECKED: set[tuple[str, tuple[int, int], str]] = set()


def missing() -> list[str]:
    """The packages of :data:`REQUIRES` that are not installed (nothing is imported)."""
    return [name for name in REQUIRES if importlib.util.find_spec(name) is None]


def available() -> bool:
    """Whether onnxruntime, onnx and onnxscript are installed."""
    return not missing()


def resolve_backend(
    backend: str,
    device: str,
    precision: str,
    model: LoadedModel | None = None,
    stored: dict[str, Any] | None = None,
) -> str:
    """``torch`` or ``onnxruntime`` for ``backend`` (``auto``, ``torch``, ``onnxruntime``).

    ``auto`` is ``onnxruntime`` when the device is the CPU, the precision float32 and the runtime
    installed (:func:`available`), and the model has weights (the bilinear baseline has nothing
    to speed up); ``torch`` otherwise.  Resuming (``stored``: the interrupted run's job), ``auto``
    keeps the backend that run used where it can run here (a job from before the backend was
    recorded used torch), so the same command finishes with the same bytes as an uninterrupted
    run.  An explicit ``onnxruntime`` that cannot run here is an error naming why and the fix.
    """
    b = str(backend).strip().lower()
    if b not in BACKENDS:
        raise BackendError(f"backend={backend!r} must be one of {', '.join(BACKENDS)}.")
    runs_here = str(device) == "cpu" and precision == "float32"
    if b == "auto":
        weights = model is None or any(True for _ in model.net.parameters())
        ort = runs_here and weights and available()
        if isinstance(stored, dict) and stored.get("backend", "torch") in ("torch", "onnxruntime"):
            return "onnxruntime" if ort and stored.get("backend", "torch") == "onnxruntime" else "torch"
        return "onnxruntime" if ort else "torch"
    if b == "onnxruntime":
        check_runs_here(device, precision)
    return b


def check_runs_here(device: str, precision: str) -> None:
    """Raise a :class:`BackendError` unless ONNX Runtime can run the network here."""
    if str(device) != "cpu":
        raise BackendError(
            f"backend='onnxruntime' runs on the CPU only, but the device is {device!r}; use --backend "
            "torch (or auto) on a GPU, or --device cpu."
        )
    if precision != "float32":
        raise BackendError(
            f"backend='onnxruntime' computes in float32 only, but the precision is {precision!r}; use "
            "--precision float32, or --backend torch for autocast precisions."
        )
    absent = missing()
    if absent:
        raise BackendError(
            f"backend='onnxruntime' needs the packages {', '.join(REQUIRES)} ({', '.join(absent)} not "
            f"installed); install them with {INSTALL}, or use --backend torch (or auto)."
        )


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$PSSR_CACHE/onnx``, else ``~/.cache/pssr/onnx``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` where it is set.
    """
    root = os.environ.get("PSSR_CACHE")
    if root:
        return Path(root).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pssr" / "onnx"


def model_digest(model: LoadedModel) -> str:
    """sha256 of what the network computes with: its configuration and every tensor of its state."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in model.net.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        flat = t.detach().cpu().reshape(-1).contiguous()  # C order whatever the memory format
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


class OnnxNetwork:
    """A model's network run by ONNX Runtime on the CPU: ``(B, C, H, W)`` -> ``(B, 1, H*s, W*s)``.

    Graphs (one per remainder of ``H, W`` modulo the model's multiple) are loaded from the cache
    or exported on first use; :meth:`prepare` does it up front for given input shapes.  Inputs
    smaller than one multiple are not covered (:meth:`covers`): the caller runs torch for them.
    ``threads``: ONNX Runtime's intra-op threads (default ``torch.get_num_threads()``).
    """

    def __init__(self, model: LoadedModel, threads: int | None = None, cache: Path | None = None) -> None:
        check_runs_here("cpu", "float32")
        self.model = model
        self.multiple = int(model.config.multiple)
        self.channels = int(model.config.input_channels)
        self.threads = int(threads or torch.get_num_threads())
        self.cache = Path(cache) if cache is not None else cache_dir()
        self.digest = model_digest(model)
        self.exports = 0  # graphs this object exported (the others came from the cache)
        self._sessions: dict[tuple[int, int], Any] = {}

    # ------------------------------------------------------------------ shapes
    def covers(self, shape: tuple[int, ...]) -> bool:
        """Whether an input of ``shape`` runs here (at least one multiple high and wide)."""
        return shape[-3] == self.channels and min(shape[-2:]) >= self.multiple

    def remainder(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Height and width modulo the model's multiple: which graph runs an input of ``shape``."""
        return int(shape[-2]) % self.multiple, int(shape[-1]) % self.multiple

    def prepare(self, shapes: Iterable[tuple[int, ...]]) -> None:
        """Load (or export) the graphs for inputs of these shapes now, not during the run."""
        for r in sorted({self.remainder(s) for s in shapes if self.covers(s)}):
            self._session(r)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Run a normalised float32 batch (covered shapes only)."""
        sess = self._session(self.remainder(x.shape))
        return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0]

    # ----------------------------------------------------------------- graphs
    def graph(self, r: tuple[int, int] = (0, 0)) -> bytes:
        """The serialised graph for remainder ``r``, freshly exported and checked against torch.

        What :func:`pssr.nn.export.export_bioimageio` packs as a package's ``onnx`` weights (the
        package's valid sizes are multiples of the model's multiple: remainder 0); never from the
        cache, so a package holds what this torch exported.
        """
        data = self._export(tuple(int(v) for v in r))  # type: ignore[arg-type]
        try:
            self._load(data, r)
        except Exception as e:
            raise BackendError(
                f"the ONNX export of this model does not reproduce its torch network ({e})."
            ) from e
        return data

    def path(self, r: tuple[int, int]) -> Path:
        """The cache file of the graph for remainder ``r``."""
        key = json.dumps(
            [_FORMAT, self.digest, self.channels, list(r), torch.__version__.split("+")[0]], sort_keys=True
        )
        return self.cache / f"pssr-{hashlib.sha256(key.encode()).hexdigest()[:32]}-r{r[0]}x{r[1]}.onnx"

    def _session(self, r: tuple[int, int]) -> Any:
        sess = self._sessions.get(r)
        if sess is not None:
            return sess
        path = self.path(r)
        if path.is_file():
            try:
                sess = self._load(path.read_bytes(), r)
            except Exception as e:  # unreadable, truncated, or not this network: never trusted
                logger.warning("the cached ONNX graph %s is not usable (%s): exporting it again", path, e)
        if sess is None:
            data = self._export(r)
            try:
                sess = self._load(data, r)
            except Exception as e:
                raise BackendError(
                    f"the ONNX export of this model does not reproduce its torch network ({e}); use "
                    "--backend torch."
                ) from e
            _atomic_write(path, data)
        self._sessions[r] = sess
        return sess

    def _device(self) -> torch.device:
        """Where the torch network's weights are (the probe and the export example go there)."""
        return next(self.model.net.parameters(), torch.empty(0)).device

    def _probe(self, r: tuple[int, int]) -> np.ndarray:
        m = self.multiple
        h, w = 3 * m + r[0] + (2 if m == 1 else 0), 3 * m + r[1] + (3 if m == 1 else 0)
        rng = np.random.default_rng(0)
        ramp = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)
        x = 0.6 * ramp + 0.4 * rng.random((1, self.channels, h, w), dtype=np.float32)
        return x.astype(np.float32)

    def _load(self, data: bytes, r: tuple[int, int]) -> Any:
        """A session for a serialised graph, after its output on a probe matched torch's."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors only
        # Without its memory pattern (one block planned per input shape) ONNX Runtime peaked at
        # 1.46 GB instead of 2.68 GB on a 628^2 em block (torch: 1.96 GB), at the same CPU time
        # (3.0 s against 3.0-3.7 s; torch 4.9-5.4 s; 2 threads).  Its arena keeps that memory
        # between blocks, which the next block needs again; it is released with the session.
        so.enable_mem_pattern = False
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        checked = (self.digest, r, hashlib.sha256(data).hexdigest())
        if checked in _CHECKED:  # these very bytes passed the probe in this process already
            return sess
        x = self._probe(r)
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            want = self.model.net(torch.from_numpy(x).to(self._device())).float().cpu().numpy()
        if got.shape != want.shape:
            raise BackendError(f"it gives shape {got.shape} where torch gives {want.shape}")
        rng = max(float(want.max() - want.min()), 1e-12)
        diff = float(np.abs(got.astype(np.float64) - want).max()) / rng
        if not diff <= PROBE_TOLERANCE:
            raise BackendError(f"on a probe input it differs from torch by {diff:.1e} of the output range")
        _CHECKED.add(checked)
        return sess

    def _export(self, r: tuple[int, int]) -> bytes:
        """The network as a serialised ONNX graph for heights/widths ``multiple * k + r``."""
        from torch.export import Dim

        m = self.multiple
        logger.info(
            "exporting the network to ONNX for ONNX Runtime (once per model and edge remainder %s; "
            "cached in %s)",
            r,
            self.cache,
        )
        batch = Dim("batch", min=1, max=4096)
        dims = []
        for axis, rem in zip("hw", r, strict=True):
            k = Dim(f"k{axis}", min=1, max=(1 << 16) // m)
            dims.append(k if m == 1 else (m * k + rem if rem else m * k))
        x = torch.from_numpy(self._probe(r)).repeat(2, 1, 2, 2)[..., : 6 * m + r[0], : 6 * m + r[1]]
        x = x.to(self._device())
        net = self.model.net.eval()
        try:
            with _quiet_exporter(), torch.no_grad():
                program = torch.onnx.export(
                    net,
                    (x.contiguous(),),
                    dynamo=True,
                    input_names=["x"],
                    output_names=["y"],
                    dynamic_shapes={"x": {0: batch, 2: dims[0], 3: dims[1]}},
                    verbose=False,
                )
                data = program.model_proto.SerializeToString()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BackendError(
                f"this model's network ({self.model.config.arch}) cannot be exported to ONNX with torch "
                f"{torch.__version__} ({type(e).__name__}: {first[:300]}); use --backend torch."
            ) from e
        self.exports += 1
        return data


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's own warnings and log lines (missing torchvision ops, deprecations) are noise here."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling and rename it onto ``path`` (a reader sees a whole file).

    The cache is an optimisation: a folder that cannot be written only costs the next run an export.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        logger.warning("cannot write the ONNX cache in %s (%s): the graph is not kept", path.parent, e)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        logger.warning("cannot write the ONNX cache file %s (%s): the graph is not kept", path, e)
