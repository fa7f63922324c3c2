"""Screenshot of the plugin in use (docs/napari_plugin.png). Run under a display:

    xvfb-run -a python scripts/screenshot.py

Opens napari, loads the EM sample, restores the low-resolution layer with the Restore widget
(built-in `em` model, fidelity map on), shows input and restoration side by side (grid mode),
and saves the whole window.
"""

from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_pssr._widgets import RestoreWidget

OUT = Path(__file__).resolve().parents[1] / "docs" / "napari_plugin.png"


def main() -> None:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 800)
    viewer.open_sample("pssr-toolkit", "em")
    w = RestoreWidget(viewer)
    viewer.window.add_dock_widget(w, name="pssr: Restore")
    w.reset_choices()
    w.layer.value = viewer.layers["EM 16 nm (low-res)"]
    w.model.value = "em"
    w.fidelity.value = True
    w.run_btn.clicked.emit()
    app = QApplication.instance()
    import time

    t0 = time.time()
    while "done" not in w.status.value and time.time() - t0 < 300:
        app.processEvents()
        time.sleep(0.05)
    for name in ("EM 16 nm (low-res) fidelity (z)",):
        if name in viewer.layers:
            viewer.layers[name].visible = False
    viewer.grid.enabled = True
    viewer.grid.shape = (1, 2)
    viewer.layers.selection.active = viewer.layers["EM 16 nm (low-res) restored (4x)"]
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    viewer.screenshot(str(OUT), canvas_only=False)
    print("saved", OUT, "|", w.status.value)
    viewer.close()


if __name__ == "__main__":
    main()
