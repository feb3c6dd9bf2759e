"""TorchCompile: training throughput vs eager, compile + bf16, cold first-step compile time, regional vs
whole-model compilation, and recompilations with ScheduledPruning active.

* Throughput, side by side (interleaved repeats after warm-up, median of ratios): one AdamW training step of
  the digits ``DigitsTransformer(dim=64, depth=2, heads=4)`` at batch 64, eager vs compiled in place by
  ``compile_`` (what ``TorchCompile`` does), and compile + bf16 autocast (what ``MixedPrecision("auto")``
  adds on this CPU) vs eager float32.
* End to end through Lightning: digits epochs with and without the ``TorchCompile`` callback (median epoch
  after the first, alternating fits).
* Cold compile: a fresh process with a fresh ``TORCHINDUCTOR_CACHE_DIR`` runs one Lightning training step
  under ``TorchCompile``; its ``compile/first_step_s`` is the first-step time, compilation included.
* Regional vs whole model on ``DigitsTransformer(depth=8)`` (8 identical blocks): cold first-step time of
  each, and their speed-ups over eager.
* Recompilations per epoch over 3 epochs of ``TorchCompile`` + ``ScheduledPruning`` (when present).

    python -m benchmarks compile            # ~10 minutes on 2 cores (cold compiles dominate)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from benchmarks._harness import Report, Row, compare
from lightning_accel.compile.callbacks import TorchCompile
from lightning_accel.compile.core import compile_, compile_optimizer_, uncompile_
from lightning_accel.demos import DigitsDataModule, DigitsTransformer
from lightning_accel.precision import choose_precision

ROOT = Path(__file__).resolve().parents[1]


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, backend: str | None = None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if backend is not None:  # what TorchCompile(compile_optimizer=True) adds
        compile_optimizer_(opt, backend=backend)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _twin(size: dict[str, Any]) -> DigitsTransformer:
    torch.manual_seed(0)
    return DigitsTransformer(**size).train()


# ------------------------------------------------------------------ cold compile in a fresh process
_COLD = """
import json, sys, torch, lightning.pytorch as pl
from lightning_accel import TorchCompile
from lightning_accel.demos import DigitsTransformer, DigitsDataModule
size, modules, backend = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
pl.seed_everything(0)
tc = TorchCompile(backend=backend, modules=modules)
trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, callbacks=[tc])
trainer.fit(DigitsTransformer(**size), DigitsDataModule(batch_size=64, drop_last=True))
print("RESULT" + json.dumps(tc.stats))
"""


def _cold_first_step(size: dict[str, Any], modules: list[str] | None, backend: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_COLD), json.dumps(size), json.dumps(modules), backend],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT") :])
    raise RuntimeError(f"cold-compile run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# ------------------------------------------------------------------ Lightning epochs
class _EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.recompiles: list[int] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._t0)
        tc = next((c for c in trainer.callbacks if isinstance(c, TorchCompile)), None)
        if tc is not None:
            tc._poll()
            self.recompiles.append(tc.stats["recompiles"])


def _fit(size: dict[str, Any], epochs: int, callbacks: list[pl.Callback], limit: int | None, drop_last: bool) -> _EpochTimer:
    pl.seed_everything(0)
    timer = _EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=limit,
        limit_val_batches=0,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(DigitsTransformer(**size), DigitsDataModule(batch_size=64, drop_last=drop_last))
    return timer


def _median(v: list[float]) -> float:
    s = sorted(v)
    return s[len(s) // 2]


def run(quick: bool = False) -> Report:
    torch.manual_seed(0)
    backend = "eager" if quick else "inductor"
    digits = dict(dim=16, depth=1, heads=2) if quick else dict(dim=64, depth=2, heads=4)
    deep = dict(dim=16, depth=8, heads=2) if quick else dict(dim=64, depth=8, heads=4)
    repeats, warmup, inner = (2, 1, 1) if quick else (15, 3, 10)
    bf16 = choose_precision("cpu").dtype
    report = Report(title=f"TorchCompile (backend={backend!r}) vs eager, 2 threads", ratio_label="time / eager fp32")

    # 1. throughput of a training step, digits Transformer
    batch = 8 if quick else 64
    x, y = torch.rand(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    eager, whole, whole_opt, regional, whole_bf16, eager_bf16 = (_twin(digits) for _ in range(6))
    compile_(whole, backend=backend)
    compile_(whole_opt, backend=backend)
    compile_(regional, ["blocks.*"], backend=backend)
    compile_(whole_bf16, backend=backend)
    for threads in (2,) if quick else (2, 1):
        rows = compare(
            {
                f"digits {digits}, {threads} thread(s), eager fp32": _step(eager, x, y, torch.float32),
                f"{threads} thread(s), TorchCompile() fp32": _step(whole, x, y, torch.float32),
                f"{threads} thread(s), TorchCompile(compile_optimizer=True) fp32": _step(whole_opt, x, y, torch.float32, backend),
                f"{threads} thread(s), TorchCompile(modules=['blocks.*']) fp32": _step(regional, x, y, torch.float32),
                f"{threads} thread(s), eager {bf16}": _step(eager_bf16, x, y, bf16),
                f"{threads} thread(s), TorchCompile(compile_optimizer=True) + MixedPrecision(auto) ({bf16})": _step(
                    whole_bf16, x, y, bf16, backend
                ),
            },
            repeats=repeats,
            warmup=warmup,
            inner=inner,
            threads=threads,
        )
        for r in rows:
            r.extra["speed-up"] = round(1.0 / r.ratio, 3) if r.ratio else None
        report.rows += rows
    for m in (whole, whole_opt, regional, whole_bf16):
        uncompile_(m)

    # 2. end to end through Lightning (alternating fits; median epoch after the first)
    epochs, limit = (2, 2) if quick else (6, None)
    fits = {
        "eager": list,
        "TorchCompile()": lambda: [TorchCompile(backend=backend)],
        "TorchCompile(compile_optimizer=True)": lambda: [TorchCompile(backend=backend, compile_optimizer=True)],
    }
    times: dict[str, list[float]] = {k: [] for k in fits}
    ratios: dict[str, list[float]] = {k: [] for k in fits}
    for _ in range(1 if quick else 3):  # alternating fits; each round gives one ratio per variant
        for name, cbs in fits.items():
            times[name].append(_median(_fit(digits, epochs, cbs(), limit, True).times[1:]))
            ratios[name].append(times[name][-1] / times["eager"][-1])
    for name in fits:
        ratio = _median(ratios[name])
        report.rows.append(Row(f"Lightning fit, {name}: median epoch", _median(times[name]), ratio, {"speed-up": round(1 / ratio, 3)}))

    # 3. cold first step and 4. regional vs whole on 8 identical blocks
    cold_digits = _cold_first_step(digits, None, backend)
    cold_whole = _cold_first_step(deep, None, backend)
    cold_regional = _cold_first_step(deep, ["blocks.*"], backend)
    report.rows.append(
        Row(
            f"cold first step, TorchCompile(), digits {digits}",
            cold_digits["first_step_s"],
            None,
            {"compile_s": round(cold_digits["compile_time_s"], 2), "graphs": cold_digits["graphs"]},
        )
    )
    x8, y8 = torch.rand(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    e8, w8, r8 = (_twin(deep) for _ in range(3))
    compile_(w8, backend=backend)
    compile_(r8, ["blocks.*"], backend=backend)
    rows8 = compare(
        {
            f"8 blocks {deep}, eager": _step(e8, x8, y8, torch.float32),
            "8 blocks, whole-model compile": _step(w8, x8, y8, torch.float32),
            "8 blocks, regional compile (blocks.*)": _step(r8, x8, y8, torch.float32),
        },
        repeats=repeats,
        warmup=warmup,
        inner=max(1, inner // 2),
    )
    uncompile_(w8), uncompile_(r8)
    cold = {1: cold_whole, 2: cold_regional}
    for i, r in enumerate(rows8):
        r.extra["speed-up"] = round(1.0 / r.ratio, 3) if r.ratio else None
        if i in cold:
            r.extra["cold_first_step_s"] = round(cold[i]["first_step_s"], 2)
            r.extra["compile_s"] = round(cold[i]["compile_time_s"], 2)
            r.extra["graphs"] = cold[i]["graphs"]
    report.rows += rows8
    whole_gain, regional_gain = 1.0 / rows8[1].ratio - 1.0, 1.0 / rows8[2].ratio - 1.0
    report.notes.append(
        f"regional vs whole-model: cold first step {cold_whole['first_step_s'] / cold_regional['first_step_s']:.2f}x shorter "
        f"({cold_whole['first_step_s']:.1f} s -> {cold_regional['first_step_s']:.1f} s; compile time "
        f"{cold_whole['compile_time_s']:.1f} s -> {cold_regional['compile_time_s']:.1f} s), keeping "
        f"{(regional_gain / whole_gain if whole_gain > 0 else float('nan')):.0%} of the whole-model speed-up "
        f"({1 + whole_gain:.3f}x vs {1 + regional_gain:.3f}x)"
    )

    # 5. recompilations across 3 epochs with ScheduledPruning active
    try:
        from lightning_accel.pruning.callbacks import ScheduledPruning
    except ImportError:
        report.notes.append("ScheduledPruning is not available in this build: recompilations with pruning not measured")
    else:
        sp = ScheduledPruning(amount=0.8, schedule="cubic", interval="step", frequency=5, end=2 * (2 if quick else 20))
        timer = _fit(digits, 3, [TorchCompile(backend=backend), sp], 2 if quick else None, False)
        per_epoch = [b - a for a, b in zip([0, *timer.recompiles[:-1]], timer.recompiles)]
        report.notes.append(
            f"TorchCompile + ScheduledPruning(0.8, every 5 steps), full digits epochs (last batch short): "
            f"recompilations per epoch {per_epoch} -> {sum(per_epoch[1:])} after the first (warm-up) epoch"
        )
        report.rows.append(Row("recompilations after warm-up, with ScheduledPruning", None, None, {"recompiles": sum(per_epoch[1:])}))
    report.notes.append(
        "step rows: interleaved repeats after warm-up, median of per-repeat ratios; cold rows: a fresh process and a fresh "
        "TORCHINDUCTOR_CACHE_DIR, one Lightning step"
    )
    return report
