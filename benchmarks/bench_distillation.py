"""Knowledge distillation: how much of the accuracy that compression costs the uncompressed model wins back.

For each seed a float model is trained on digits (the teacher), then compressed from its trained weights with
the same epochs and recipe, once without and once with ``KnowledgeDistillation()`` (``teacher=None``: a frozen
copy of the trained model taken at fit start, before any compression):

* ``ResidualCNN``: ``StructuredPruning(amount=0.75)`` (25% of the channels kept), linear schedule over the
  first third of the epochs, then fine-tuning of the pruned model;
* ``DigitsTransformer``: ``StructuredPruning(amount=0.5)`` likewise, then ``Quantization(mode="nf4",
  when="fit_end")`` (bitsandbytes 4-bit weights) of the pruned model.

Test accuracy (359 held-out digits: one digit is 0.28 points) is averaged over seeds; ``recovered`` is the share
of the accuracy lost without distillation that distillation wins back,
``(acc_kd - acc_plain) / (acc_teacher - acc_plain)`` on the means. The time ratio is the median over seeds of
the distilled training loop's wall time over the plain one's (the teacher's extra forward pass).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks._harness import Report, Row
from lightning_accel import KnowledgeDistillation, Quantization, StructuredPruning
from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN


class _TrainTime(pl.Callback):
    """Wall time of the training loop alone (not set-up, not the post-training quantization at fit end)."""

    seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._t0


def _trainer(epochs: int, callbacks: list[pl.Callback], limit: float | int, root: str, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=callbacks,
        limit_train_batches=limit, limit_val_batches=0, default_root_dir=root, **kwargs,
    )


def _test(model: pl.LightningModule, root: str, quick: bool) -> float:
    trainer = _trainer(1, [], 1.0, root, limit_test_batches=2 if quick else 1.0)
    return float(trainer.test(model, DigitsDataModule(batch_size=64), verbose=False)[0]["test_acc"])


def _compress(kind: str, epochs: int) -> list[pl.Callback]:
    end = max(1, epochs // 3)
    if kind == "cnn":
        return [StructuredPruning(amount=0.75, schedule="linear", start=0, end=end, verbose=0)]
    return [
        StructuredPruning(amount=0.5, schedule="linear", start=0, end=end, verbose=0),
        Quantization(mode="nf4", backend="bitsandbytes", when="fit_end", monitor=None, save_checkpoint=False),
    ]


def _case(
    kind: str, make: Callable[[], pl.LightningModule], seeds: list[int], teacher_epochs: int, epochs: int,
    limit: float | int, root: str, kd: dict[str, Any], quick: bool,
) -> dict[str, Any]:
    out: dict[str, list[float]] = {"teacher": [], "plain": [], "kd": [], "t_plain": [], "t_kd": []}
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        teacher = make()
        _trainer(teacher_epochs, [], limit, root).fit(teacher, DigitsDataModule(batch_size=64))
        out["teacher"].append(_test(teacher, root, quick))
        for variant in ("plain", "kd"):  # the same start, data order and schedule; only the loss differs
            pl.seed_everything(seed + 1000, verbose=False)
            student = copy.deepcopy(teacher)
            callbacks = _compress(kind, epochs) + ([KnowledgeDistillation(verbose=0, **kd)] if variant == "kd" else [])
            timer = _TrainTime()
            _trainer(epochs, [*callbacks, timer], limit, root).fit(student, DigitsDataModule(batch_size=64))
            out[f"t_{variant}"].append(timer.seconds)
            out[variant].append(_test(student, root, quick))
    return out


def _spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    half = (max(values) - min(values)) / 2
    return f"{100 * mean:.2f} ± {100 * half:.2f}"


def run(quick: bool = False) -> Report:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="bench_distillation_")
    kd: dict[str, Any] = dict(temperature=2.0, alpha=0.5)
    if quick:
        seeds, limit = [0], 2
        cases = {
            "cnn": ("ResidualCNN(width=8, depth=1)", lambda: ResidualCNN(width=8, depth=1), 1, 2),
            "vit": ("DigitsTransformer(dim=16, depth=1)", lambda: DigitsTransformer(dim=16, depth=1, heads=2), 1, 2),
        }
    else:
        seeds, limit = [0, 1, 2], 1.0
        cases = {
            "cnn": ("ResidualCNN(width=16, depth=2)", lambda: ResidualCNN(width=16, depth=2), 12, 12),
            "vit": ("DigitsTransformer(dim=64, depth=2)", lambda: DigitsTransformer(dim=64, depth=2, heads=4), 25, 12),
        }
    report = Report(
        title=f"KnowledgeDistillation on digits: compressed from the trained float model, with vs without, seeds {seeds}",
        ratio_label="fit time / without",
    )
    for kind, (label, make, teacher_epochs, epochs) in cases.items():
        r = _case(kind, make, seeds, teacher_epochs, epochs, limit, root, kd, quick)
        compression = "25% channels" if kind == "cnn" else "50% channels + nf4"
        teacher, plain, distilled = (statistics.mean(r[k]) for k in ("teacher", "plain", "kd"))
        lost = teacher - plain
        recovered = (distilled - plain) / lost if lost > 0 else float("nan")
        ratio = statistics.median(a / b for a, b in zip(r["t_kd"], r["t_plain"]))
        common = {"teacher acc": _spread(r["teacher"])}
        report.rows.append(
            Row(name=f"{label} {compression}, without", ratio=1.0,
                extra={**common, "test acc (mean ± half-range)": _spread(r["plain"]),
                       "per seed": " / ".join(f"{100 * a:.2f}" for a in r["plain"]),
                       "lost vs teacher (points)": f"{100 * lost:.2f}", "recovered": ""})
        )
        report.rows.append(
            Row(name=f"{label} {compression}, with KnowledgeDistillation", ratio=ratio,
                extra={**common, "test acc (mean ± half-range)": _spread(r["kd"]),
                       "per seed": " / ".join(f"{100 * a:.2f}" for a in r["kd"]),
                       "lost vs teacher (points)": f"{100 * (teacher - distilled):.2f}",
                       "recovered": f"{100 * recovered:.0f}%"})
        )
        report.notes.append(
            f"{label}: teacher {teacher_epochs} epochs; compression {epochs} epochs from its weights (pruning schedule "
            f"over the first {max(1, epochs // 3)}); training loop s without / with: "
            f"{statistics.mean(r['t_plain']):.1f} / {statistics.mean(r['t_kd']):.1f}"
        )
    report.notes += [
        f"KnowledgeDistillation({', '.join(f'{k}={v}' for k, v in kd.items())}), teacher=None (a frozen copy of the "
        "trained model at fit start)",
        "recovered = (acc with - acc without) / (teacher acc - acc without), on the means over seeds; goal >= 50% at "
        "<= 1.5x fit time",
    ]
    return report
