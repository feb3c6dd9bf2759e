"""What AccelerationReport measures for three compression pipelines on the digits Transformer, and what it costs.

Rows 1-3: one fit each (seed 0) with the report listed first; the ratios are the report's own (final / float baseline
of the same run; latency as speed-up = baseline ms / final ms, below 1 = slower, flagged by the report).
Rows 4-5: the same short fit without and with the report (latency measured at batch 1 and 256), interleaved, to
show the report's overhead on the fit's wall time.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks._harness import Report, Row
from lightning_accel import AccelerationReport, Quantization, ScheduledPruning, StructuredPruning
from lightning_accel.demos import DigitsDataModule, DigitsTransformer


def _fit(callbacks: list[pl.Callback], *, dim: int, epochs: int, limit: int | None, root: str) -> float:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        limit_train_batches=limit,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.fit(DigitsTransformer(dim=dim, depth=2, heads=4), DigitsDataModule(batch_size=64, drop_last=True))
    return time.perf_counter() - t0


def _row(name: str, res: dict[str, Any]) -> Row:
    b, f = res["baseline"], res["final"]
    lat = res["latency"]["eager"]
    extra: dict[str, Any] = {
        "params": f["params"] / b["params"],
        "non-zero": f["nonzero"] / b["nonzero"],
        "stored bytes": f["stored_bytes"] / b["stored_bytes"],
        "MACs": f["macs"] / b["macs"] if b.get("macs") and f.get("macs") is not None else None,
    }
    for batch, e in lat.items():
        extra[f"speed-up b={batch}"] = e["speedup"]
    extra["regressions"] = len(res["regressions"])
    m = res["metric"]
    extra["val_acc last fit"] = m["before_fit_end"]
    extra["val_acc final"] = m["final"]
    extra["train samples/s"] = res["throughput"]["samples_per_s"]
    return Row(name=name, extra=extra)


def run(quick: bool = False) -> Report:
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    dim, epochs, limit = (16, 2, 3) if quick else (64, 20, None)
    batches = [1, 8] if quick else [1, 256]
    repeats = 3 if quick else 20
    report = Report(title=f"AccelerationReport on DigitsTransformer(dim={dim}), {epochs} epochs, 2 threads", ratio_label="fit time / without report")

    def rep() -> AccelerationReport:
        return AccelerationReport(batch_sizes=batches, repeats=repeats, warmup=3, console=False, figure=False)

    end = max(1, epochs // 2)
    pipelines = {
        "StructuredPruning 50%": lambda: [StructuredPruning(amount=0.5, start=1, end=end, interval="epoch", verbose=0)],
        "Quantization int8 (fit_end)": lambda: [Quantization(mode="int8", when="fit_end")],
        "ScheduledPruning 50% + int8 (fit_end)": lambda: [
            ScheduledPruning(amount=0.5, schedule="cubic", interval="epoch", start=1, end=end),
            Quantization(mode="int8", when="fit_end"),
        ],
    }
    with tempfile.TemporaryDirectory() as root:
        for name, make in pipelines.items():
            r = rep()
            _fit([r, *make()], dim=dim, epochs=epochs, limit=limit, root=root)
            report.rows.append(_row(name, r.results))

        # overhead: the same fit without and with the report, interleaved
        short = (1, 3) if quick else (3, None)
        rounds = 1 if quick else 3
        plain, with_report = [], []
        for _ in range(rounds):
            plain.append(_fit([], dim=dim, epochs=short[0], limit=short[1], root=root))
            with_report.append(_fit([rep()], dim=dim, epochs=short[0], limit=short[1], root=root))
    ratios = [w / p for w, p in zip(with_report, plain)]
    report.rows.append(Row(name=f"fit {short[0]} epochs, no report", median_s=statistics.median(plain), ratio=1.0))
    report.rows.append(Row(name=f"fit {short[0]} epochs, with report", median_s=statistics.median(with_report), ratio=statistics.median(ratios)))
    report.notes += [
        "params / stored bytes / MACs: final / baseline of the same run (stored bytes count int8 weights at 1 byte + row scales)",
        "speed-up: baseline latency / final latency, median of the report's timed calls; < 1 is a regression (red in the table)",
        "ScheduledPruning zeros weights (same params, same MACs, dense kernels): its effect shows in non-zero params only",
    ]
    return report
