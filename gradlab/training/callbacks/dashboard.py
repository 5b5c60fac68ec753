"""The instruments' dashboard: a TensorBoard custom-scalars layout at the start of a run and an
overview figure of every instrument at its end (:mod:`gradlab.training.overview`).

``gradlab train`` adds it when ``--probe`` runs any probe: the layout groups the loss and
accuracy, the gradient statistics, the step quality and the other probes' scalars into one
dashboard (TensorBoard's CUSTOM SCALARS tab); at the end of the run (whatever its status, unless
it failed) ``plots/instruments.png`` is drawn from ``metrics.csv`` -- so a resumed run's figure
covers the whole run -- and logged as the TensorBoard image ``plots/instruments``.
"""

from __future__ import annotations

from gradlab.training.callbacks.base import Callback


class Dashboard(Callback):
    """The custom-scalars layout and the overview figure (see the module docstring)."""

    order = 90  # after every probe; the checkpoint (100) does not wait for the figure

    def __init__(self, name: str = "instruments"):
        self.name = name
        self.panels: list = []  # the overview's panel titles, once drawn

    def on_fit_start(self, trainer) -> None:
        if not trainer.is_main:
            return
        from gradlab.training.overview import custom_scalars_layout, probe_splits

        trainer.run.tb.add_custom_scalars(custom_scalars_layout(probe_splits(trainer.callbacks)))

    def on_fit_end(self, trainer, status: str, exact: bool) -> None:
        if not trainer.is_main or status == "failed":
            return
        import pandas as pd

        from gradlab.training.overview import overview_figure

        path = trainer.run.path / "metrics.csv"
        if not path.exists():
            return
        frame = pd.read_csv(path)
        fig, self.panels = overview_figure(frame, f"{trainer.cfg['model']} on {trainer.cfg['dataset']}, "
                                                  f"{trainer.cfg['opt']}: instruments")
        if fig is not None:
            self._save(trainer.run, fig, trainer.step)

    def _save(self, run, fig, step: int) -> None:
        """``plots/<name>.png`` and the same PNG as a TensorBoard image: the figure is drawn and
        encoded once (``RunDir.save_figure`` would draw it twice and encode it twice)."""
        from gradlab.training.overview_draw import image_summary, png_bytes

        if not run.enabled:
            return
        png, height, width = png_bytes(fig)
        path = run.path / "plots" / f"{self.name}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png)
        run.tb.file_writer.add_summary(image_summary(f"plots/{self.name}", png, height, width), step)


__all__ = ["Dashboard"]
