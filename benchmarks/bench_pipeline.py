"""The results table: every technique alone and the whole pipeline, against the float baseline of the same run.

For each digits model a float model is trained for ``T`` epochs (the teacher); then, from its weights, every variant
trains ``P`` more epochs with the same recipe, the float **baseline** included (fp32, eager, no callback), so every row
has seen ``T + P`` epochs. Measured per row, as ratios to the baseline of the same run:

* test accuracy (359 held-out digits; one digit is 0.28 points) and its change in points;
* stored weight bytes (quantized layers at their real size) and the size of the exported file;
* latency of the **deployed** model: each model exported with ``lightning_accel.export`` (AOTInductor, dynamic batch)
  and loaded back, timed interleaved with the exported baseline at batch 1 and 256 (median of per-repeat ratios,
  2 threads), shown as speed-up (> 1 is faster);
* training step time: the median step (``on_train_batch_start`` -> ``on_train_batch_end``) over the baseline's, and
  the whole training loop's wall time over the baseline's (compilation and pruning events included).

The pipeline rows list every callback in one Trainer; lightning-accel orders them (teacher, structure, quantization,
optimizer, precision, compile, measurement). ``python -m benchmarks all`` runs this and writes
``benchmarks/results/RESULTS.md`` (the table of docs/results.md) with the machine it ran on.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks._harness import Report, Row, compare
from lightning_accel import (
    EightBitOptimizer,
    KnowledgeDistillation,
    MixedPrecision,
    Quantization,
    QuantizationAwareTraining,
    StructuredPruning,
    TorchCompile,
    export,
    load_exported,
)
from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN
from lightning_accel.report.measure import stored_bytes

STEPS_PER_EPOCH = 20  # 1,258 training digits, batch 64, last batch dropped


class _StepTimer(pl.Callback):
    """Wall time of each training step and of the whole training loop."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.loop_s = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_loop = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps.append(time.perf_counter() - self._t)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.loop_s = time.perf_counter() - self._t_loop


def _trainer(epochs: int, callbacks: list[pl.Callback], root: str, limit: int | None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=False, callbacks=callbacks,
        limit_train_batches=limit, limit_val_batches=limit or 1.0, limit_test_batches=1.0, default_root_dir=root,
    )


def _data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, drop_last=True)


def _fit(model: pl.LightningModule, callbacks: list[pl.Callback], epochs: int, root: str, limit: int | None) -> dict[str, Any]:
    timer = _StepTimer()
    pl.seed_everything(0, verbose=False)
    trainer = _trainer(epochs, [*callbacks, timer], root, limit)
    trainer.fit(model, _data())
    acc = trainer.test(model, _data(), verbose=False)[0]["test_acc"]
    steady = timer.steps[3:] or timer.steps
    return {"acc": acc, "step_s": statistics.median(steady), "loop_s": timer.loop_s, "steps": len(timer.steps)}


def _cases(kind: str, teacher: torch.nn.Module, p: int, quick: bool) -> dict[str, Callable[[], list[pl.Callback]]]:
    """Variant name -> the callbacks it trains with (a fresh list per call)."""
    spe = 2 if quick else STEPS_PER_EPOCH
    prune_end = max(1, p // 3)
    qat_start = max(1, (p * 2 // 3) * spe - 10)
    amount = 0.8 if kind == "cnn" else 0.5

    def sp() -> StructuredPruning:
        return StructuredPruning(amount=amount, schedule="linear", interval="epoch", start=0, end=prune_end, verbose=0)

    def kd() -> KnowledgeDistillation:
        return KnowledgeDistillation(teacher=teacher, verbose=0)

    def qat() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(bits=8, activations=kind == "cnn", start=qat_start)

    compile_ = (lambda: TorchCompile(backend="eager")) if quick else (lambda: TorchCompile())
    cases: dict[str, Callable[[], list[pl.Callback]]] = {
        "float baseline (fp32 eager)": lambda: [],
        "StructuredPruning": lambda: [sp()],
        "StructuredPruning + KnowledgeDistillation": lambda: [sp(), kd()],
        "Quantization int8 (post-training)": lambda: [Quantization(mode="int8", when="fit_end", monitor=None)],
        "QuantizationAwareTraining int8": lambda: [qat()],
        "MixedPrecision (bf16)": lambda: [MixedPrecision(dtype="bf16")],
        "TorchCompile": lambda: [compile_()],
        "EightBitOptimizer": lambda: [EightBitOptimizer(min_size=1024)],
    }
    # the pipeline: distillation, pruning, QAT, precision, compile (the 8-bit optimizer saves memory, and costs
    # time on a CPU: its own row shows it); MixedPrecision "auto" as a user would write it
    full = lambda: [kd(), sp(), qat(), MixedPrecision(dtype="auto"), compile_()]  # noqa: E731
    cases["pipeline: KD + pruning + QAT int8 + precision auto + compile"] = full
    if kind == "cnn":  # int8 convolutions of 6-13 channels are slower than float ones: the float-deployed pipeline too
        cases["pipeline, float deploy: KD + pruning + precision auto + compile"] = lambda: [
            kd(), sp(), MixedPrecision(dtype="auto"), compile_(),
        ]
    if quick:
        cases = {k: v for k, v in cases.items() if k.startswith(("float baseline", "pipeline: "))}
    return cases


def _model(kind: str) -> pl.LightningModule:
    return ResidualCNN(width=32, depth=2) if kind == "cnn" else DigitsTransformer(dim=64, depth=2, heads=4)


def _case(kind: str, t_epochs: int, p: int, quick: bool, root: str) -> list[Row]:
    limit = 2 if quick else None
    torch.set_num_threads(2)
    teacher = _model(kind)
    _fit(teacher, [], t_epochs, root, limit)
    trained = copy.deepcopy(teacher.state_dict())
    teacher.eval()
    results: dict[str, dict[str, Any]] = {}
    models: dict[str, pl.LightningModule] = {}
    for name, make in _cases(kind, teacher, p, quick).items():
        model = _model(kind)
        model.load_state_dict(trained)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[name] = _fit(model, make(), p, root, limit)
        model.eval()
        results[name]["bytes"] = stored_bytes(model)
        models[name] = model
    # the deployed models: exported (AOTInductor), loaded back, timed interleaved against the exported baseline
    example = torch.zeros(2, 1, 8, 8)
    runners: dict[str, Any] = {}
    for name, model in models.items():
        path = Path(root) / f"{kind}-{len(runners)}.pt2"
        export(model, example, path, compile=not quick)
        results[name]["file_bytes"] = os.path.getsize(path)
        runners[name] = load_exported(path)
    speed: dict[str, dict[int, float]] = {name: {} for name in models}
    for b in (1, 256):
        x = torch.rand(b, 1, 8, 8)
        variants = {name: (lambda r=r, x=x: r(x)) for name, r in runners.items()}
        with torch.no_grad():
            rows = compare(variants, repeats=5 if quick else 30, warmup=2 if quick else 5, inner=1 if b > 1 else 20)
        for r in rows:
            speed[r.name][b] = 1.0 / r.ratio  # ratio = time / baseline time
    base = results["float baseline (fp32 eager)"]
    out = []
    for name, r in results.items():
        out.append(Row(
            name=f"{kind}: {name}",
            ratio=r["step_s"] / base["step_s"],
            extra={
                "test acc %": 100 * r["acc"],
                "vs baseline (points)": 100 * (r["acc"] - base["acc"]),
                "smaller (bytes)": base["bytes"] / r["bytes"],
                "smaller (file)": base["file_bytes"] / r["file_bytes"],
                "faster b=1 (exported)": speed[name][1],
                "faster b=256 (exported)": speed[name][256],
                "train loop time / baseline": r["loop_s"] / base["loop_s"],
            },
        ))
    return out


def run(quick: bool = False) -> Report:
    t_epochs, p = (1, 1) if quick else (25, 12)
    report = Report(
        title=f"Compression on digits: every technique alone and the pipeline, vs the float baseline trained "
              f"{t_epochs}+{p} epochs (same run)",
        ratio_label="median train step / baseline",
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as root:
        for kind in ("cnn",) if quick else ("cnn", "transformer"):
            report.rows += _case(kind, t_epochs, p, quick, root)
    report.notes += [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 2 threads; "
        f"{time.perf_counter() - started:.0f} s in all",
        "cnn = ResidualCNN(width=32, depth=2), pruning to 20% of the channels; transformer = DigitsTransformer(dim=64, "
        "depth=2, heads=4), pruning half the heads and MLP neurons; pruning over the first third of the epochs, QAT "
        "over the last third",
        "latency: exported AOTInductor files vs the exported baseline, interleaved; train ratios: fp32 eager baseline",
        "reproduce: python -m benchmarks all",
    ]
    return report
