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
    limit: float | int, root: str, variants: dict[str, dict[str, Any] | None], quick: bool,
) -> dict[str, Any]:
    out: dict[str, list[float]] = {"teacher": [], **{v: [] for v in variants}, **{f"t_{v}": [] for v in variants}}
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        teacher = make()
        _trainer(teacher_epochs, [], limit, root).fit(teacher, DigitsDataModule(batch_size=64))
        out["teacher"].append(_test(teacher, root, quick))
        for variant, kd in variants.items():  # the same start, data order and schedule; only the loss differs
            pl.seed_everything(seed + 1000, verbose=False)
            student = copy.deepcopy(teacher)
            callbacks = _compress(kind, epochs) + ([KnowledgeDistillation(verbose=0, **kd)] if kd is not None else [])
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
    if quick:
        seeds, limit = [0], 2
        cases = {
            "cnn": ("ResidualCNN(width=8, depth=1)", lambda: ResidualCNN(width=8, depth=1), 1, 2),
            "vit": ("DigitsTransformer(dim=16, depth=1)", lambda: DigitsTransformer(dim=16, depth=1, heads=2), 1, 2),
        }
    else:
        seeds, limit = [0, 1, 2], 1.0
        cases = {
            "cnn": ("ResidualCNN(width=32, depth=2)", lambda: ResidualCNN(width=32, depth=2), 15, 12),
            "vit": ("DigitsTransformer(dim=64, depth=2)", lambda: DigitsTransformer(dim=64, depth=2, heads=4), 40, 12),
        }
    variants: dict[str, dict[str, Any] | None] = {
        "without": None,
        "KnowledgeDistillation()": {},  # temperature 2, alpha 0.5
        "KnowledgeDistillation(temperature=1)": dict(temperature=1.0),
    }
    if quick:
        del variants["KnowledgeDistillation(temperature=1)"]
    report = Report(
        title=f"KnowledgeDistillation on digits: compressed from the trained float model, with vs without, seeds {seeds}",
        ratio_label="training time / without",
    )
    for kind, (label, make, teacher_epochs, epochs) in cases.items():
        r = _case(kind, make, seeds, teacher_epochs, epochs, limit, root, variants, quick)
        compression = "25% channels" if kind == "cnn" else "50% channels + nf4"
        teacher, plain = statistics.mean(r["teacher"]), statistics.mean(r["without"])
        lost = teacher - plain
        for variant in variants:
            acc = statistics.mean(r[variant])
            recovered = "" if variant == "without" else (f"{100 * (acc - plain) / lost:.0f}%" if lost > 0 else "n/a")
            report.rows.append(
                Row(name=f"{label} {compression}, {variant}",
                    ratio=statistics.median(a / b for a, b in zip(r[f"t_{variant}"], r["t_without"])),
                    extra={"teacher acc": _spread(r["teacher"]), "test acc (mean ± half-range)": _spread(r[variant]),
                           "per seed": " / ".join(f"{100 * x:.2f}" for x in r[variant]),
                           "lost vs teacher (points)": f"{100 * (teacher - acc):.2f}", "recovered": recovered})
            )
        times = " / ".join(f"{statistics.mean(r[f't_{v}']):.1f}" for v in variants)
        report.notes.append(
            f"{label}: teacher {teacher_epochs} epochs; compression {epochs} epochs from its weights (pruning schedule "
            f"over the first {max(1, epochs // 3)}); training loop seconds (mean) {times}"
        )
    report.notes += [
        "teacher=None: a frozen copy of the trained model at fit start; the ratio column is the median over seeds of "
        "the training loop's time over the run without distillation",
        "recovered = (acc with - acc without) / (teacher acc - acc without), on the means over seeds; goal >= 50% at "
        "<= 1.5x training time",
    ]
    return report
