"""MixedPrecision(auto) vs float32: training throughput on a Linear-heavy Transformer, and digits accuracy.

* Throughput, side by side (interleaved repeats, median of ratios): one AdamW training step of
  ``DigitsTransformer(dim=256, depth=4, heads=8)`` in float32 and under what ``MixedPrecision("auto")``
  installs (``choose_precision`` -> autocast dtype), with and without float32 LayerNorm islands.
* End to end through Lightning: the same model trained on the digits with and without the
  ``MixedPrecision`` callback (same seed): median epoch time after the first epoch, and test accuracy.

    python -m benchmarks precision           # ~5 minutes on 2 cores
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from benchmarks._harness import Report, Row, compare
from lightning_accel.demos import DigitsDataModule, DigitsTransformer
from lightning_accel.precision import MixedPrecision, choose_precision, fp32_islands_, remove_fp32_islands_


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, islands: list[str] | None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        if islands:
            fp32_islands_(model, islands)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if islands:
            remove_fp32_islands_(model)

    return step


class _EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._t0)


def _fit(model_kwargs: dict[str, Any], epochs: int, callbacks: list[pl.Callback], limit: int | None, seed: int) -> tuple[float, float]:
    pl.seed_everything(seed)
    model = DigitsTransformer(**model_kwargs)
    dm = DigitsDataModule(batch_size=64)
    timer = _EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        limit_train_batches=limit,
        limit_val_batches=0,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(model, dm)
    acc = trainer.test(model, dm, verbose=False)[0]["test_acc"]
    later = sorted(timer.times[1:] or timer.times)
    return later[len(later) // 2], acc


def run(quick: bool = False) -> Report:
    torch.manual_seed(0)
    choice = choose_precision("cpu")
    size = dict(dim=32, depth=1, heads=2) if quick else dict(dim=256, depth=4, heads=8)
    report = Report(title=f"MixedPrecision(auto) vs float32, DigitsTransformer({size}, mlp_ratio=...)", ratio_label="time / fp32")
    report.notes.append(f"auto chose {choice.name}: {choice.reason}")

    # 1. training-step throughput, interleaved
    grid = [(2.0, 8, 2)] if quick else [(r, b, t) for t in (2, 1) for r in (2.0, 4.0) for b in (64, 256)]
    for mlp_ratio, batch, threads in grid:
        model = DigitsTransformer(**size, mlp_ratio=mlp_ratio).train()
        x, y = torch.rand(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
        tag = f"mlp_ratio {mlp_ratio:g}, batch {batch}, {threads} thread(s)"
        variants = {
            f"train step, {tag}, fp32": _step(model, x, y, torch.float32, None),
            f"train step, {tag}, MixedPrecision(auto)": _step(model, x, y, choice.dtype, None),
        }
        if mlp_ratio == 2.0:
            variants[f"train step, {tag}, auto + fp32 LayerNorm islands"] = _step(model, x, y, choice.dtype, ["LayerNorm"])
        rows = compare(variants, repeats=3 if quick else 15, warmup=1 if quick else 3, inner=1 if quick else 3, threads=threads)
        for r in rows:
            r.extra["speed-up"] = round(1.0 / r.ratio, 3) if r.ratio else None
        report.rows += rows

    # 2. Lightning fits: epoch time (short fits, alternating) and accuracy (seeds, alternating)
    variants = (("fp32", list), ("MixedPrecision(auto)", lambda: [MixedPrecision("auto")]))
    timing: dict[str, list[float]] = {name: [] for name, _ in variants}
    ratios = []
    for _ in range(1 if quick else 3):
        for name, cbs in variants:
            timing[name].append(_fit(size, 2 if quick else 3, cbs(), 2 if quick else None, 0)[0])
        ratios.append(timing["MixedPrecision(auto)"][-1] / timing["fp32"][-1])
    epochs = 1 if quick else 30
    seeds = (0,) if quick else (0, 1)
    accs: dict[str, list[float]] = {name: [] for name, _ in variants}
    for seed in seeds:
        for name, cbs in variants:
            accs[name].append(_fit(size, epochs, cbs(), 2 if quick else None, seed)[1])
    for name, _ in variants:
        t = statistics.median(timing[name])
        ratio = 1.0 if name == "fp32" else statistics.median(ratios)
        report.rows.append(
            Row(
                f"Lightning fit, digits, {name}: median epoch",
                t,
                ratio,
                {
                    "speed-up": round(1.0 / ratio, 3),
                    "test_acc": round(statistics.mean(accs[name]), 4),
                    "test_acc_per_seed": [round(a, 4) for a in accs[name]],
                },
            )
        )
    diffs = [100 * (m - f) for f, m in zip(accs["fp32"], accs["MixedPrecision(auto)"])]
    report.notes.append(
        f"digits test accuracy after {epochs} epochs (batch 64, mlp_ratio 2, seeds {list(seeds)}): MixedPrecision(auto) "
        f"minus fp32 = {', '.join(f'{d:+.2f}' for d in diffs)} points (mean {statistics.mean(diffs):+.2f}); "
        "one test sample is 0.28 points"
    )
    report.notes.append(
        "step rows: interleaved repeats, median of per-repeat ratios, at 2 threads (the harness default) and 1 thread "
        "(less sensitive to other processes on the machine); fit rows: 3-epoch fits alternating fp32/auto, median epoch "
        "after the first, ratio = median over rounds; accuracy from separate 30-epoch fits"
    )
    return report
