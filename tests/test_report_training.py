"""AccelerationReport's training cost (lightning_accel/report/training.py) on a fake clock: the float eager baseline step
timed on a copy at the first batch (training untouched), the steady-state step and the whole fit against it, compile
time on its own row, a slower training flagged."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_accel import AccelerationReport, TorchCompile
from lightning_accel.report.training import (
    TrainingCost,
    training_metrics,
    training_regressions,
    training_rows,
)
from tests.helpers import RandomDataModule, TinyMLP, tiny_trainer


class Clock:
    """A fake ``perf_counter``: time moves only when a ``CostlyMLP`` runs forward."""

    t = 0.0

    def __call__(self) -> float:
        return self.t


CLOCK = Clock()


class CostlyMLP(TinyMLP):
    """Every training forward costs ``cost`` fake seconds, an eval forward nothing (so only steps move the clock)."""

    def __init__(self, cost: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cost = cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            CLOCK.t += self.cost
        return super().forward(x)


class CostAtSetup(pl.Callback):
    """What a compression callback does to the step: the fit's model costs ``cost`` from setup on (the copy the
    report took before setup keeps the original cost)."""

    def __init__(self, cost: float, first: float = 0.0) -> None:
        self.cost, self.first = cost, first

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.cost = self.cost

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 0 and self.first:
            CLOCK.t += self.first  # a first step that compiles


def _fit(tmp_path: Any, cost: float, first: float = 0.0, **kwargs: Any) -> tuple[AccelerationReport, pl.Trainer, CostlyMLP]:
    CLOCK.t = 0.0
    pl.seed_everything(0)
    rep = AccelerationReport(latency=False, console=False, figure=False, regression_tolerance=0.05)
    rep.timer = CLOCK
    callbacks = [rep, CostAtSetup(cost, first), *kwargs.pop("callbacks", [])]
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=5, limit_val_batches=1, callbacks=callbacks, **kwargs)
    model = CostlyMLP(cost=1.0)
    trainer.fit(model, RandomDataModule(batch_size=8))
    return rep, trainer, model


def test_faster_training_against_the_float_baseline_step(tmp_path):
    rep, trainer, _ = _fit(tmp_path, cost=0.5)
    t = rep.results["training"]
    # the copy taken before setup costs 1 fake second a step, the fit's model 0.5
    assert t["baseline_step_s"] == pytest.approx(1.0) and "AdamW step" in t["baseline"]
    assert t["steady_step_s"] == pytest.approx(0.5) and t["step_ratio"] == pytest.approx(0.5)
    # 10 steps of 0.5 s (validation is free here): the fit took 5 s, float eager steps would have taken 10 s
    assert t["steps"] == 10 and t["fit_s"] == pytest.approx(5.0) and t["fit_eager_estimate_s"] == pytest.approx(10.0)
    assert not t["step_regression"] and not t["fit_regression"] and not training_regressions(t)
    rows = {r[0].split(" (")[0]: r for r in training_rows(t)}
    assert rows["training step"][1:4] == ("1000.00 ms", "500.00 ms", "2.00x faster") and rows["training step"][4] is False
    assert rows["whole fit"][1:4] == ("10.0 s", "5.0 s", "2.00x faster")
    assert training_metrics(t)["report/train_step_ratio"] == pytest.approx(0.5)


def test_slower_training_and_a_costly_first_step_are_flagged(tmp_path):
    rep, _, _ = _fit(tmp_path, cost=1.0, first=20.0)
    t = rep.results["training"]
    # the steady state is the median of the last steps: the 20 s first step does not move it, but the whole fit is slower
    assert t["steady_step_s"] == pytest.approx(1.0) and not t["step_regression"]
    assert t["fit_s"] == pytest.approx(30.0) and t["fit_ratio"] == pytest.approx(3.0) and t["fit_regression"]
    assert [r for r in rep.results["regressions"] if r.startswith("whole fit")]

    rep, _, _ = _fit(tmp_path / "slow", cost=2.0)
    t = rep.results["training"]
    assert t["step_ratio"] == pytest.approx(2.0) and t["step_regression"]
    assert any(r.startswith("training step: 2000.00 ms vs 1000.00 ms") for r in rep.results["regressions"])
    row = next(r for r in training_rows(t) if r[0].startswith("training step"))
    assert row[3] == "2.00x SLOWER" and row[4] is True


def test_the_baseline_measurement_leaves_training_untouched(tmp_path):
    """Weights after a fit with the report equal those without it: the timed steps ran on a copy, and the random
    generators were restored."""
    _, _, with_report = _fit(tmp_path / "a", cost=1.0)
    CLOCK.t = 0.0
    pl.seed_everything(0)
    trainer = tiny_trainer(tmp_path / "b", max_epochs=2, limit_train_batches=5, limit_val_batches=1, callbacks=[CostAtSetup(1.0)])
    plain = CostlyMLP(cost=1.0)
    trainer.fit(plain, RandomDataModule(batch_size=8))
    for (name, a), (_, b) in zip(with_report.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_compile_time_has_its_own_row(tmp_path):
    rep, _, _ = _fit(tmp_path, cost=0.5, callbacks=[TorchCompile(backend="eager", when="start")])
    t = rep.results["training"]
    assert t["compile_s"] is not None and t["compiled_at_step"] == 0
    row = next(r for r in training_rows(t) if r[0] == "compile time")
    assert "at step 0" in row[3] and row[4] is False


def test_resumed_fit_keeps_the_baseline_step(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    rep, trainer, _ = _fit(tmp_path, cost=0.5, callbacks=[ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if "AccelerationReport" in k)
    assert state["training"]["baseline_step_s"] == pytest.approx(1.0)
    cost = TrainingCost(CLOCK)
    cost.load_state_dict(state["training"])
    assert cost.baseline_step_s == pytest.approx(1.0) and cost.n_steps == 10
