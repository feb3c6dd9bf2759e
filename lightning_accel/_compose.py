"""How lightning-accel callbacks meet: one canonical order and named conflicts.

Whatever order a user lists them in ``Trainer(callbacks=[...])``, the techniques apply as
*prune -> quantize -> precision -> compile* (structural changes first, compilation last), because the
first accel callback to reach ``setup`` sets up all of them in that order and re-sorts them inside
``trainer.callbacks`` (other callbacks keep their places) so every later hook follows it too.
Pairs that cannot work together raise :class:`CompositionError` naming both callbacks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch import Callback

__all__ = ["AccelCallback", "CompositionError", "accel_callbacks", "notify_structure_changed"]


class CompositionError(ValueError):
    """Two callbacks of the pipeline cannot be combined; the message names both and says why."""


class AccelCallback(Callback):
    """Base of every lightning-accel callback.

    Subclasses implement :meth:`accel_setup` instead of ``setup`` and may override :meth:`conflicts_with`.

    Attributes:
        order: place in the pipeline; lower applies first (prune 10, structured 15, quantize 20,
            precision 30, compile 40).
    """

    order: ClassVar[int] = 50

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        run = (id(trainer), stage, trainer.state.fn)
        if getattr(self, "_accel_setup_done", None) == run:
            return
        group = accel_callbacks(trainer)
        for a in group:
            for b in group:
                if a is not b:
                    reason = a.conflicts_with(b)
                    if reason:
                        raise CompositionError(f"{type(a).__name__} cannot be combined with {type(b).__name__}: {reason}")
        _sort_in_place(trainer)
        for cb in group:
            cb._accel_setup_done = run
            cb.accel_setup(trainer, pl_module, stage)

    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Per-callback set-up, called in pipeline order (see module docstring)."""

    def conflicts_with(self, other: AccelCallback) -> str | None:
        """A reason why ``self`` cannot run beside ``other``, or ``None``."""
        return None

    def on_structure_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: AccelCallback) -> None:
        """Called on every accel callback after ``source`` changed the model's structure mid-fit (shapes,
        modules): e.g. compiled code is rebuilt once, bookkeeping keyed by parameters is refreshed."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._accel_setup_done = None


def accel_callbacks(trainer: pl.Trainer) -> list[AccelCallback]:
    """The trainer's lightning-accel callbacks in pipeline order (stable for equal orders)."""
    found = [cb for cb in trainer.callbacks if isinstance(cb, AccelCallback)]
    return sorted(found, key=lambda cb: cb.order)


def notify_structure_changed(trainer: pl.Trainer, pl_module: pl.LightningModule, source: AccelCallback) -> None:
    """Tell every other accel callback that ``source`` changed the model's structure."""
    for cb in accel_callbacks(trainer):
        if cb is not source:
            cb.on_structure_changed(trainer, pl_module, source)


def _sort_in_place(trainer: pl.Trainer) -> None:
    callbacks: list[Any] = trainer.callbacks
    slots = [i for i, cb in enumerate(callbacks) if isinstance(cb, AccelCallback)]
    ordered = accel_callbacks(trainer)
    for i, cb in zip(slots, ordered):
        callbacks[i] = cb
