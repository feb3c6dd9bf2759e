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
    report = Report(title=f"MixedPrecision(auto) vs float32, DigitsTransformer({size})", ratio_label="time / fp32")
    report.notes.append(f"auto chose {choice.name}: {choice.reason}")
    for threads in (2,) if quick else (2, 1):
        for batch in (8,) if quick else (64, 256):
            model = DigitsTransformer(**size).train()
            x, y = torch.rand(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
            rows = compare(
                {
                    f"train step, batch {batch}, {threads} thread(s), fp32": _step(model, x, y, torch.float32, None),
                    f"train step, batch {batch}, {threads} thread(s), MixedPrecision(auto)": _step(model, x, y, choice.dtype, None),
                    f"train step, batch {batch}, {threads} thread(s), auto + fp32 LayerNorm islands": _step(
                        model, x, y, choice.dtype, ["LayerNorm"]
                    ),
                },
                repeats=3 if quick else 15,
                warmup=1 if quick else 3,
                inner=1 if quick else 3,
                threads=threads,
            )
            for r in rows:
                r.extra["speed-up"] = round(1.0 / r.ratio, 3) if r.ratio else None
            report.rows += rows

    epochs = 1 if quick else 30
    limit = 2 if quick else None
    seeds = (0,) if quick else (0, 1)
    fits = {name: [_fit(size, epochs, cbs(), limit, seed) for seed in seeds] for name, cbs in (("fp32", list), ("MixedPrecision(auto)", lambda: [MixedPrecision("auto")]))}
    base = statistics.median(t for t, _ in fits["fp32"])
    for name, results in fits.items():
        t = statistics.median(t for t, _ in results)
        accs = [a for _, a in results]
        report.rows.append(
            Row(
                f"Lightning fit, {name}: median epoch",
                t,
                t / base,
                {"speed-up": round(base / t, 3), "test_acc": round(statistics.mean(accs), 4), "test_acc_per_seed": [round(a, 4) for a in accs]},
            )
        )
    diffs = [100 * (m[1] - f[1]) for f, m in zip(fits["fp32"], fits["MixedPrecision(auto)"])]
    report.notes.append(
        f"digits test accuracy after {epochs} epochs (batch 64, seeds {list(seeds)}): MixedPrecision(auto) minus fp32 = "
        f"{', '.join(f'{d:+.2f}' for d in diffs)} points (mean {statistics.mean(diffs):+.2f}); one test sample is 0.28 points"
    )
    report.notes.append(
        "step rows: interleaved repeats, median of per-repeat ratios, at 2 threads (the harness default) and at 1 thread "
        "(robust to other processes on the machine); fit rows: one fit per seed and variant, median epoch after the first"
    )
    return report
