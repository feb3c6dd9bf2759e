"""The canonical pipeline order and named conflicts of lightning-accel callbacks."""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback

from lightning_accel._compose import AccelCallback, CompositionError
from tests.helpers import RandomDataModule, TinyMLP, tiny_trainer

LOG: list[tuple[str, str]] = []


class _Recorder(AccelCallback):
    def __init__(self, name: str, order: int) -> None:
        self.name = name
        self.order = order  # type: ignore[misc]

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[{self.name}]"

    def accel_setup(self, trainer, pl_module, stage):
        LOG.append(("setup", self.name))

    def on_fit_end(self, trainer, pl_module):
        LOG.append(("fit_end", self.name))


class _Other(Callback):
    def on_fit_end(self, trainer, pl_module):
        LOG.append(("fit_end", "other"))


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_any_list_order_applies_in_pipeline_order(tmp_path, order):
    LOG.clear()
    made = [_Recorder("prune", 10), _Recorder("quantize", 20), _Recorder("compile", 40)]
    other = _Other()
    callbacks = [made[order[0]], other, made[order[1]], made[order[2]]]
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(TinyMLP(), RandomDataModule())
    assert [n for h, n in LOG if h == "setup"] == ["prune", "quantize", "compile"]
    assert [n for h, n in LOG if h == "fit_end" and n != "other"] == ["prune", "quantize", "compile"]
    assert trainer.callbacks.index(other) == 1  # non-accel callbacks keep their place


class _Picky(_Recorder):
    def conflicts_with(self, other):
        return "both rewrite the same layers" if isinstance(other, _Recorder) and other.name == "quantize" else None


def test_conflict_is_named(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[_Recorder("quantize", 20), _Picky("prune", 10)])
    with pytest.raises(CompositionError, match="_Picky cannot be combined with _Recorder: both rewrite the same layers"):
        trainer.fit(TinyMLP(), RandomDataModule())
