"""The napari widgets: Restore, Crappify, Train.  Thin: layers in, core calls, layers out.

Long work runs in napari's ``thread_worker`` (the viewer stays responsive) with a
progress bar and a Cancel button; errors are shown as viewer notifications, never
raised into the Qt event loop.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
    create_widget,
)
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from superqt.utils import ensure_main_thread

from napari_pssr import _logic
from pssr.degrade.crappify import PRESETS

logger = logging.getLogger(__name__)

#: Models trained in this session (Train widget) offered to the Restore widget.
SESSION_MODELS: dict[str, str] = {}
_RESTORE_WIDGETS: weakref.WeakSet = weakref.WeakSet()
FROM_FILE = "from file..."
START_NONE = "none (from scratch)"
START_FILE = "file..."
# model files and bioimage.io packages written by `pssr export` (as `pssr predict --model` takes)
MODEL_FILTER = "pssr models (*.safetensors *.zip)"


def _model_choices(*_: Any) -> list[str]:
    from pssr.nn.modelfile import builtin_models

    return [*builtin_models(), *SESSION_MODELS, FROM_FILE]


def _start_choices(*_: Any) -> list[str]:
    """Train widget "start from": scratch, a built-in, a model trained this session, or a file."""
    from pssr.nn.modelfile import builtin_models

    return [START_NONE, *builtin_models(), *SESSION_MODELS, START_FILE]


def _report(exc: BaseException) -> None:
    show_error(f"pssr: {exc}")


class _Runner(Container):
    """A container with Run / Cancel buttons, a progress bar and a status line."""

    def __init__(self, viewer, run_text: str, **kw) -> None:
        super().__init__(**kw)
        self.viewer = viewer
        self.run_btn = PushButton(text=run_text)
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, visible=False)
        self.status = Label(value="")
        self.worker = None
        self._cancel = False
        self.run_btn.changed.connect(self._start)
        self.cancel_btn.changed.connect(self.cancel)

    def _controls(self) -> list:
        return [self.run_btn, self.cancel_btn, self.progress, self.status]

    def cancel(self) -> None:
        """Ask the running job to stop at the next block / step."""
        self._cancel = True
        self.status.value = "cancelling..."

    def _busy(self, busy: bool) -> None:
        self.run_btn.enabled = not busy
        self.cancel_btn.enabled = busy
        self.progress.visible = busy

    def _start(self) -> None:
        try:
            fn = self.prepare()
        except Exception as e:  # invalid input: tell the user, do not raise into Qt
            _report(e)
            self.status.value = f"error: {e}"
            return
        self._cancel = False
        self._busy(True)
        self.status.value = "running..."
        worker = create_worker(
            fn,
            _connect={
                "returned": [lambda _r: self._busy(False), self._on_done],
                "errored": [lambda _e: self._busy(False), self._on_error],
                "finished": lambda: self._busy(False),
            },
            _start_thread=False,
        )
        self.worker = worker
        worker.start()

    @ensure_main_thread
    def _progress_from_thread(self, value) -> None:
        """Called from the worker thread; runs on the GUI thread."""
        self._on_progress(value)

    def _on_progress(self, value) -> None:
        if not self.cancel_btn.enabled:  # a late update after the job ended
            return
        done, total, text = value
        self.progress.max = max(int(total), 1)
        self.progress.value = min(int(done), self.progress.max)
        if text:
            self.status.value = text

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, InterruptedError):
            self.status.value = "cancelled: nothing was added"
            show_info("pssr: cancelled")
        else:
            self.status.value = f"error: {exc}"
            _report(exc)

    # subclasses
    def prepare(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _on_done(self, result) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class RestoreWidget(_Runner):
    """Restore (super-resolve) an image layer with a built-in or trained model."""

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, "Restore")
        self.layer = create_widget(annotation=Image, label="image")
        self.leading = ComboBox(label="3D axis", choices=["auto", "Z", "T"], value="auto")
        self.model = ComboBox(label="model", choices=_model_choices)
        self.model_file = FileEdit(label="model file", filter=MODEL_FILTER, visible=False)
        self.tta = CheckBox(text="test-time augmentation (+ uncertainty)", value=False)
        self.fidelity = CheckBox(text="fidelity map", value=False)
        self.tile = SpinBox(label="tile (0: auto)", value=0, min=0, max=4096, step=32)
        self.device = ComboBox(label="device", choices=_logic.device_choices(), value="auto")
        self.model.changed.connect(lambda v: setattr(self.model_file, "visible", v == FROM_FILE))
        self.extend(
            [
                self.layer,
                self.leading,
                self.model,
                self.model_file,
                self.tta,
                self.fidelity,
                self.tile,
                self.device,
                *self._controls(),
            ]
        )
        napari_viewer.layers.events.inserted.connect(lambda e: self.layer.reset_choices())
        napari_viewer.layers.events.removed.connect(lambda e: self.layer.reset_choices())
        _RESTORE_WIDGETS.add(self)

    def refresh_models(self) -> None:
        """Re-read built-in and session models (after training)."""
        self.model.reset_choices()

    def model_ref(self) -> str:
        """The chosen model as a name or path."""
        v = self.model.value
        if v == FROM_FILE:
            p = Path(self.model_file.value)
            if not p.is_file():
                raise _logic.WidgetInputError(
                    "choose a .safetensors model file or a bioimage.io package (.zip from `pssr export`)."
                )
            return str(p)
        return SESSION_MODELS.get(v, v)

    def prepare(self):
        """Validate now (on the GUI thread); return the work for the thread."""
        from pssr.nn.modelfile import load_model

        if self.model.value is None:
            raise _logic.WidgetInputError("no model available; train one or choose a file.")
        model = load_model(self.model_ref())
        inp = _logic.layer_input(self.layer.value, self.leading.value, model.frames)
        tile = self.tile.value or None
        tta, fid = self.tta.value, self.fidelity.value
        from pssr.nn.devices import resolve_device

        device = resolve_device(self.device.value)  # checked here, on the GUI thread

        def work():
            def cb(done, total):
                self._progress_from_thread((done, total, f"block {done}/{total}"))
                return not self._cancel

            return _logic.run_restore(
                inp, model, tta=tta, tile=tile, fidelity=fid, callback=cb, device=device
            )

        return work

    def _on_done(self, result) -> None:
        for data, kw, _kind in result["layers"]:
            self.viewer.add_image(data, **kw)
        s = result["summary"]
        msg = f"done: {s['blocks']} blocks in {s['seconds']} s on {s.get('device', '?')}"
        if "fidelity" in s:
            msg += f"; {100 * s['fidelity']['frac_beyond_3sigma']:.2f}% of pixels beyond 3 sigma"
        self.status.value = msg


class CrappifyWidget(_Runner):
    """Make a low-resolution version of a layer to preview what a model expects."""

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, "Crappify")
        self.layer = create_widget(annotation=Image, label="image")
        self.preset = ComboBox(label="preset", choices=list(PRESETS), value="em")
        self.scale = ComboBox(label="scale", choices=[2, 3, 4, 8], value=4)
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.extend([self.layer, self.preset, self.scale, self.seed, *self._controls()])
        napari_viewer.layers.events.inserted.connect(lambda e: self.layer.reset_choices())
        napari_viewer.layers.events.removed.connect(lambda e: self.layer.reset_choices())

    def prepare(self):
        """Validate, then crappify in the thread."""
        inp = _logic.layer_input(self.layer.value)
        preset, scale, seed = self.preset.value, int(self.scale.value), int(self.seed.value)
        return lambda: _logic.run_crappify(inp, preset, scale, seed)

    def _on_done(self, result) -> None:
        data, kw = result
        self.viewer.add_image(data, **kw)
        self.status.value = f"done: {data.shape}"


class TrainWidget(_Runner):
    """Train a model from image layers (or a folder), live loss and validation PSNR.

    "start from" fine-tunes a built-in, session or file model (as ``pssr train --init``):
    its scale, frames and size are shown and fixed, and preset "as start model" reuses the
    degradation it was trained with.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, "Train")
        self.layers = Select(
            label="HR layers",
            choices=lambda _w: [(lyr.name, lyr) for lyr in napari_viewer.layers if isinstance(lyr, Image)],
        )
        self.folder = FileEdit(label="or folder", mode="d", value="")
        self.start = ComboBox(label="start from", choices=_start_choices, value=START_NONE)
        self.start_file = FileEdit(label="start model file", filter=MODEL_FILTER, visible=False)
        self.preset = ComboBox(label="preset", choices=[*PRESETS, _logic.AS_START], value="em")
        self.scale = ComboBox(label="scale", choices=[2, 3, 4, 8], value=4)
        self.frames = ComboBox(label="frames", choices=[1, 3, 5, 7], value=1)
        self.minutes = FloatSpinBox(label="minutes", value=5.0, min=0.05, max=24 * 60, step=1)
        self.size = ComboBox(label="size", choices=["small", "base", "large"], value="small")
        self.patch = SpinBox(label="patch (LR px)", value=32, min=8, max=256, step=8)
        self.device = ComboBox(label="device", choices=_logic.device_choices(), value="auto")
        self.out = FileEdit(
            label="save as",
            mode="w",
            filter="*.safetensors",
            value=str(Path.home() / "pssr-model.safetensors"),
        )
        self.extend(
            [
                self.layers,
                self.folder,
                self.start,
                self.start_file,
                self.preset,
                self.scale,
                self.frames,
                self.minutes,
                self.size,
                self.patch,
                self.out,
                self.device,
                *self._controls(),
            ]
        )
        napari_viewer.layers.events.inserted.connect(lambda e: self.layers.reset_choices())
        napari_viewer.layers.events.removed.connect(lambda e: self.layers.reset_choices())
        self.start.changed.connect(self._start_changed)
        self.start_file.changed.connect(self._start_changed)

    def start_ref(self) -> str | None:
        """The start model as a built-in name or path (None: from scratch)."""
        v = self.start.value
        if v in (None, START_NONE):
            return None
        if v == START_FILE:
            p = Path(self.start_file.value)
            if not p.is_file():
                raise _logic.WidgetInputError(
                    "choose the model file (.safetensors) or bioimage.io package (.zip) to start from."
                )
            return str(p)
        return SESSION_MODELS.get(v, v)

    def _start_changed(self, *_: Any) -> None:
        """Show the start model's architecture (it cannot change when fine-tuning)."""
        choosing_file = self.start.value == START_FILE and not Path(self.start_file.value).is_file()
        self.start_file.visible = self.start.value == START_FILE
        settings = None
        if not choosing_file:
            try:
                ref = self.start_ref()
                settings = _logic.start_settings(ref) if ref else None
            except Exception as e:  # an unreadable model file: say so, leave the controls free
                _report(e)
                self.status.value = f"error: {e}"
        for name in ("scale", "frames", "size"):
            w = getattr(self, name)
            if settings is not None:
                if settings[name] not in w.choices:
                    w.choices = (*w.choices, settings[name])
                w.value = settings[name]
            w.enabled = settings is None
        if settings is not None:
            self.preset.value = _logic.AS_START
        elif self.preset.value == _logic.AS_START:
            self.preset.value = "em"

    def prepare(self):
        """Build the sampler on the GUI thread (fast, validates), train in the thread."""
        from pssr.training.data import PairSampler, Source, load_sources
        from pssr.training.train import TrainConfig, train

        plan = _logic.train_plan(
            start=self.start_ref(),
            preset=self.preset.value,
            scale=int(self.scale.value),
            frames=int(self.frames.value),
            size=self.size.value,
        )
        frames = plan.model_config.in_channels
        sources = []
        for layer in self.layers.value or []:
            inp = _logic.layer_input(layer, "T" if frames > 1 else "Z", frames)
            sources.append(Source(np.asarray(inp.data), inp.name))
        folder = str(self.folder.value or "")
        if folder and folder != "." and Path(folder).is_dir():
            sources += load_sources(folder)
        if not sources:
            raise _logic.WidgetInputError("select at least one HR image layer or a folder of images.")
        out = Path(self.out.value)
        if out.suffix != ".safetensors":
            out = out.with_suffix(".safetensors")
        sampler = PairSampler(
            sources,
            plan.model_config.scale,
            crappifier=plan.crappifier,
            patch=int(self.patch.value),
            frames=frames,
            norm=plan.norm,
            rng=0,
        )
        mcfg = plan.model_config
        minutes = float(self.minutes.value)
        from pssr.nn.devices import resolve_device

        device = resolve_device(self.device.value)  # checked here, on the GUI thread
        tcfg = TrainConfig(steps=None, minutes=minutes, val_every=50, ckpt_every=200, device=device)

        def work():
            import time

            t0 = time.monotonic()

            def cb(step, info):
                el = time.monotonic() - t0
                txt = f"step {step}  loss {info['loss']:.4f}"
                if "psnr" in info:
                    txt += f"  val PSNR {info['psnr']:.2f} dB (bilinear {info['psnr_bilinear']:.2f})"
                self._progress_from_thread((int(el), int(minutes * 60), txt))
                return not self._cancel

            return train(
                sampler,
                mcfg,
                out,
                tcfg,
                progress=False,
                callback=cb,
                init=plan.init,
                description=plan.description,
                keep_better=True,  # as pssr train --init: never leave the user with a worse model
            )

        return work

    def _on_done(self, path) -> None:
        name = f"session: {Path(path).stem}"
        SESSION_MODELS[name] = str(path)
        self.start.reset_choices()  # a session model can be the next start model
        self.status.value = f"saved {path}; offered in Restore as {name!r}"
        check = _logic.parent_check_note(path)
        if check:
            self.status.value += f"; {check}"
        for w in list(_RESTORE_WIDGETS):
            try:
                w.refresh_models()
            except RuntimeError:  # its Qt widget was closed
                _RESTORE_WIDGETS.discard(w)
        show_info(f"pssr: model saved to {path}")
