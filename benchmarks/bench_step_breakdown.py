"""Where the pipeline's training step time goes: each callback alone, then the pipeline, on the digits Transformer.

Each variant trains ``DigitsTransformer(dim=64, depth=2, heads=4)`` (batch 64) from the same initial weights for
``EPOCHS`` epochs in its own ``Trainer``; the rounds interleave the variants (every variant once per round), and a
variant's ratio is the median over rounds of its median step over the baseline's median step of the same round
(``on_train_batch_start`` -> ``on_train_batch_end``, the first 5 steps left out, so compilation and the
pruning event's recompilation are not in it). Also reported: the median step's thread CPU time ratio, steadier than
wall time on a loaded machine (it misses work in other threads, e.g. inductor's OpenMP kernels). The teacher is an
untrained model of the same shape (its accuracy does not matter here).

    python -m benchmarks step_breakdown
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks._harness import Report, Row
from lightning_accel import (
    EightBitOptimizer,
    KnowledgeDistillation,
    MixedPrecision,
    QuantizationAwareTraining,
    StructuredPruning,
    TorchCompile,
)
from lightning_accel.demos import DigitsDataModule, DigitsTransformer

EPOCHS = 2
SKIP = 5


class _Steps(pl.Callback):
    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._t, self._c = time.perf_counter(), time.thread_time()

    def on_train_batch_end(self, *args: Any) -> None:
        self.wall.append(time.perf_counter() - self._t)
        self.cpu.append(time.thread_time() - self._c)


def _variants(teacher: torch.nn.Module, quick: bool) -> dict[str, Callable[[], list[pl.Callback]]]:
    compile_ = (lambda: TorchCompile(backend="eager")) if quick else (lambda: TorchCompile())

    def sp() -> StructuredPruning:
        return StructuredPruning(amount=0.5, schedule="linear", interval="epoch", start=0, end=1, verbose=0)

    def kd() -> KnowledgeDistillation:
        return KnowledgeDistillation(teacher=teacher, verbose=0)

    def qat() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(bits=8, start=0)

    def pipeline(dtype: str, eight_bit: bool = True) -> Callable[[], list[pl.Callback]]:
        return lambda: [kd(), sp(), qat(), *([EightBitOptimizer(min_size=1024)] if eight_bit else []), MixedPrecision(dtype=dtype), compile_()]

    return {
        "float baseline (fp32 eager)": lambda: [],
        "KnowledgeDistillation": lambda: [kd()],
        "StructuredPruning 50%": lambda: [sp()],
        "QuantizationAwareTraining int8": lambda: [qat()],
        "EightBitOptimizer": lambda: [EightBitOptimizer(min_size=1024)],
        "MixedPrecision(bf16)": lambda: [MixedPrecision(dtype="bf16")],
        "MixedPrecision(auto)": lambda: [MixedPrecision(dtype="auto")],
        "TorchCompile": lambda: [compile_()],
        "pipeline, bf16": pipeline("bf16"),
        "pipeline, auto precision": pipeline("auto"),
        "pipeline, auto precision, no EightBitOptimizer": pipeline("auto", eight_bit=False),
    }


def run(quick: bool = False) -> Report:
    torch.set_num_threads(1 if not quick else 2)
    rounds, limit = (1, 3) if quick else (3, None)
    teacher = DigitsTransformer(dim=64, depth=2, heads=4).eval()
    variants = _variants(teacher, quick)
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, make in variants.items():
            pl.seed_everything(0, verbose=False)
            steps = _Steps()
            trainer = pl.Trainer(
                max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, callbacks=[*make(), steps],
                limit_train_batches=limit, limit_val_batches=0, num_sanity_val_steps=0,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(DigitsTransformer(dim=64, depth=2, heads=4), DigitsDataModule(batch_size=64, drop_last=True))
            skip = 0 if quick else SKIP
            wall[name].append(statistics.median(steps.wall[skip:]))
            cpu[name].append(statistics.median(steps.cpu[skip:]))
    base = "float baseline (fp32 eager)"
    report = Report(
        title="Training step time per callback on the digits Transformer (d=64, batch 64), vs the fp32 eager baseline",
        ratio_label="median train step / baseline (wall)",
        notes=[f"{rounds} interleaved round(s) of {EPOCHS} epochs per variant, {torch.get_num_threads()} thread(s)"],
    )
    for name in variants:
        w = [a / b for a, b in zip(wall[name], wall[base])]
        c = [a / b for a, b in zip(cpu[name], cpu[base])]
        report.rows.append(Row(
            name=name, median_s=statistics.median(wall[name]), ratio=statistics.median(w),
            extra={"cpu-time ratio": statistics.median(c), "per-round wall ratios": ", ".join(f"{x:.2f}" for x in w)},
        ))
    return report
