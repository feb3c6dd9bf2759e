"""Training-step cost of pruning: ScheduledPruning vs no pruning vs Lightning's ``ModelPruning``.

Same model, same data, same Trainer settings per comparison; each variant trains one epoch per sample in its
own fresh Trainer, interleaved with the others. Models: an MLP with six 512-wide hidden Linear layers (as in
issue #3; weight-heavy, the worst case for any masking) with SGD and with AdamW, and the demo ``ResidualCNN``.

* ``ScheduledPruning, event every step``: ``frequency=1``, cubic schedule active during the whole measurement.
* ``ScheduledPruning, event every 100 steps``: a Zhu & Gupta-like frequency.
* ``ScheduledPruning, between events``: masks only enforced (no event during the epoch): the per-step cost.
* ``ModelPruning``: Lightning's callback after its first pruning (its ``weight_orig * weight_mask`` forward
  pre-hooks are active), 50% global L1 of the same weights, masks kept (``make_pruning_permanent=False``).

Two ratios per variant: whole ``fit`` wall time (``compare``'s median of per-repeat ratios, includes Trainer
start-up) and the time of the training steps alone (measured by a callback inside the same interleaved runs).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._harness import Report, Row, compare
from lightning_accel import ScheduledPruning
from lightning_accel.demos import ResidualCNN
from lightning_accel.pruning import prunable_parameters

#: torch threads while timing. One: on the shared 2-core machine, two OpenMP threads competing with other
#: processes spin-wait and time noise instead of work.
THREADS = 1


class _MLP(pl.LightningModule):
    def __init__(self, optimizer: str, d_in: int = 64, width: int = 512, depth: int = 6, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class _StepTimer(pl.Callback):
    """Time of the training steps after the first two (from the end of batch 1 to the end of the last
    batch): what every step costs, without the one-off work at the start and the end of an epoch."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        if trainer.fit_loop.epoch_loop.batch_progress.current.completed <= 1 or not hasattr(self, "_t0"):
            self._t0, self._n = now, 0
        else:
            self._n += 1
            self._last = now

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.samples.append((self._last - self._t0) / self._n)
        del self._t0


def _variant(
    make_model: Callable[[], pl.LightningModule],
    make_callbacks: Callable[[nn.Module], list[pl.Callback]],
    loader: DataLoader,
    root: str,
) -> tuple[Callable[[], None], _StepTimer]:
    torch.manual_seed(0)
    model = make_model()
    timer = _StepTimer()
    callbacks = make_callbacks(model)

    def fit_one_epoch() -> None:
        trainer = pl.Trainer(
            max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer], default_root_dir=root,
        )
        trainer.fit(model, loader)

    return fit_one_epoch, timer


class _Once:
    """ModelPruning's ``amount``: 50% at the end of the first (warm-up) epoch, nothing later, so every
    measured epoch runs at 50% sparsity with Lightning's pruning hooks in place."""

    def __init__(self) -> None:
        self.done = False

    def __call__(self, epoch: int) -> float:
        amount, self.done = (0.0 if self.done else 0.5), True
        return amount


def _makers() -> dict[str, Callable[[nn.Module], list[pl.Callback]]]:
    def scheduled(**kw: Any) -> Callable[[nn.Module], list[pl.Callback]]:
        # 50% at step 0 (the first event, outside the timed steps), then the cubic schedule towards 90%
        return lambda model: [ScheduledPruning(amount=0.9, initial_amount=0.5, start=0, end=10_000, verbose=0, **kw)]

    def model_pruning(model: nn.Module) -> list[pl.Callback]:
        modules = dict(model.named_modules())  # the same weights as ScheduledPruning's default selection
        params = [(modules[name.rsplit(".", 1)[0]], "weight") for name in prunable_parameters(model)]
        return [
            ModelPruning(
                "l1_unstructured", parameters_to_prune=params, amount=_Once(), use_global_unstructured=True,
                make_pruning_permanent=False, use_lottery_ticket_hypothesis=False, verbose=0,
            )
        ]

    return {
        "no pruning": lambda model: [],
        "ScheduledPruning, event every step": scheduled(frequency=1),
        "ScheduledPruning, event every 100 steps": scheduled(frequency=100),
        "ScheduledPruning, between events": scheduled(frequency=10_000),
        "Lightning ModelPruning": model_pruning,
    }


def _loader(shape: tuple[int, ...], batches: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batches * batch, *shape, generator=g), torch.randint(0, 10, (batches * batch,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def run(quick: bool = False) -> Report:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    batches, batch = (4, 16) if quick else (80, 64)
    repeats = 1 if quick else 9
    root = tempfile.mkdtemp(prefix="bench_scheduled_pruning_")
    report = Report(
        title=f"Training-step cost of pruning, batch {batch}, {batches} steps per epoch, {THREADS} thread(s)",
        ratio_label="fit time / no pruning",
    )
    mlp_data, cnn_data = _loader((64,), batches, batch), _loader((1, 8, 8), batches, batch)
    configs: list[tuple[str, Callable[[], pl.LightningModule], DataLoader]] = [
        ("MLP 6x512, SGD", lambda: _MLP("sgd"), mlp_data),
        ("MLP 6x512, AdamW", lambda: _MLP("adamw"), mlp_data),
        ("ResidualCNN, AdamW", lambda: ResidualCNN(scheduler="none"), cnn_data),
    ]
    makers = _makers()
    if quick:  # a smoke run of the three kinds
        configs = configs[:1]
        makers = {k: makers[k] for k in ("no pruning", "ScheduledPruning, event every step", "Lightning ModelPruning")}
    for label, make_model, loader in configs:
        variants, timers = {}, {}
        for name, make in makers.items():
            variants[name], timers[name] = _variant(make_model, make, loader, root)
        rows = compare(variants, repeats=repeats, warmup=1, threads=THREADS)
        base = timers["no pruning"].samples[1:]  # the warm-up epoch is excluded
        for row in rows:
            steps = timers[row.name].samples[1:]
            row.extra["ms / step"] = statistics.median(steps) * 1e3
            row.extra["step / no pruning"] = statistics.median(s / b for s, b in zip(steps, base))
            row.name = f"{label}: {row.name}"
        report.rows += rows
    report.notes += [
        "`step / no pruning`: mean time of steps 3..N of each epoch (median of interleaved per-repeat ratios); "
        "`fit time` also counts the Trainer start-up and the one-off work of the first step and the epoch end "
        "(ScheduledPruning's first event, from 0% to 50%, is there)",
        "all pruned variants train at ~50% sparsity of the same weights (every Linear/Conv but the head): "
        "ModelPruning prunes 50% (global L1) once, after the warm-up epoch; ScheduledPruning starts at 50% and "
        "follows a cubic schedule towards 90% over 10,000 steps (events recompute masks once the target moved "
        "by 0.1% of the weights)",
        "ModelPruning recomputes `weight_orig * weight_mask` in forward pre-hooks at every step; ScheduledPruning "
        "multiplies masks into gradients and weights in place, and computes new masks only at events",
        "Adam on sparse weights takes sqrt of exact zeros (zero gradients, zero second moments), which this CPU "
        "computes ~4.7x slower than sqrt of nonzeros; that cost is the same for any pruning method (SGD rows are "
        "free of it)",
    ]
    _sanity(report.rows)
    return report


def _sanity(rows: list[Row]) -> None:
    for r in rows:
        if r.ratio is None or r.ratio <= 0:
            raise RuntimeError(f"bad measurement for {r.name}: {r}")
