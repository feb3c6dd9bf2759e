"""Structured pruning during training with :class:`~lightning_accel.StructuredPruning` on the digits demos.

For the residual CNN and the Transformer classifier, side by side in one process:

* accuracy: the dense model and the model pruned to ``amount=0.5`` during training (linear schedule, then
  fine-tuning), trained for the same epochs with the same seeds (mean over seeds);
* MACs and parameters (one sample), and CPU inference time at batch 256 with 2 threads (interleaved
  repeats, median of per-repeat ratios);
* the training-time cost of a pruning event (seconds, and as a fraction of a dense epoch);
* the same architecture as the pruned model, dense and trained from scratch for the same epochs;
* slicing the optimizer state at every event vs restarting it (``optimizer_state="reset"``, i.e. a rebuilt
  optimizer for the pruned parameters): test accuracy after the same epochs.

    python -m benchmarks structured_pruning [--quick]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks._harness import Report, Row, compare
from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN
from lightning_accel.pruning.callbacks import StructuredPruning
from lightning_accel.pruning.structured import count_macs_params


def _fit(
    make: Callable[[], pl.LightningModule], epochs: int, seed: int, prune: dict[str, Any] | None, limit: int | None
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = make()
    dm = DigitsDataModule(batch_size=64)
    callbacks = [StructuredPruning(**prune, verbose=0)] if prune is not None else []
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
        limit_val_batches=0,
        limit_train_batches=limit,
        limit_test_batches=limit,
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    fit_s = time.perf_counter() - t0
    acc = float(trainer.test(model, dm, verbose=False)[0]["test_acc"])
    events = callbacks[0].event_seconds if callbacks else []
    return {"model": model.eval(), "acc": acc, "fit_s": fit_s, "events": list(events), "epochs": epochs}


def _infer(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    @torch.inference_mode()
    def fwd() -> None:
        model(x)

    return fwd


def _section(
    report: Report,
    name: str,
    make: Callable[[], pl.LightningModule],
    epochs: int,
    prune: dict[str, Any],
    seeds: list[int],
    batch: int,
    repeats: int,
    compare_reset: bool,
    limit: int | None,
    make_small: Callable[[], pl.LightningModule],
) -> None:
    dense = [_fit(make, epochs, s, None, limit) for s in seeds]
    small = [_fit(make_small, epochs, s, None, limit) for s in seeds]
    pruned = [_fit(make, epochs, s, prune, limit) for s in seeds]
    reset = [_fit(make, epochs, s, {**prune, "optimizer_state": "reset"}, limit) for s in seeds] if compare_reset else []
    example = torch.zeros(1, 1, 8, 8)
    d_model, p_model = dense[0]["model"], pruned[0]["model"]
    d_macs, d_params = count_macs_params(d_model, example)
    p_macs, p_params = count_macs_params(p_model, example)
    x = torch.rand(batch, 1, 8, 8)
    rows = compare(
        {f"{name} dense": _infer(d_model, x), f"{name} pruned": _infer(p_model, x)},
        repeats=repeats,
        warmup=3,
        inner=3,
        threads=2,
    )
    d_acc = statistics.mean(r["acc"] for r in dense)
    p_acc = statistics.mean(r["acc"] for r in pruned)
    epoch_s = statistics.median(r["fit_s"] / r["epochs"] for r in dense)
    event_s = [e for r in pruned for e in r["events"]]
    rows[0].extra.update(
        {"MACs": d_macs, "params": d_params, "test acc %": 100 * d_acc, "MACs ratio": 1.0, "speed-up": 1.0}
    )
    rows[1].extra.update(
        {
            "MACs": p_macs,
            "params": p_params,
            "test acc %": 100 * p_acc,
            "MACs ratio": d_macs / p_macs,
            "speed-up": 1.0 / rows[1].ratio if rows[1].ratio else None,
            "acc drop (points)": 100 * (d_acc - p_acc),
        }
    )
    report.rows += rows
    report.rows.append(
        Row(
            name=f"{name} pruning event",
            median_s=statistics.median(event_s) if event_s else None,
            extra={
                "events per fit": len(pruned[0]["events"]),
                "event / dense epoch": (statistics.median(event_s) / epoch_s) if event_s else None,
                "dense epoch (s)": epoch_s,
            },
        )
    )
    s_shapes = {n: tuple(p.shape) for n, p in small[0]["model"].named_parameters()}
    same = s_shapes == {n: tuple(p.shape) for n, p in p_model.named_parameters()}
    report.rows.append(
        Row(
            name=f"{name} dense at the pruned size, from scratch",
            extra={"test acc %": 100 * statistics.mean(r["acc"] for r in small), "same shapes as pruned": same},
        )
    )
    if reset:
        r_acc = statistics.mean(r["acc"] for r in reset)
        report.rows.append(
            Row(
                name=f"{name} pruned, optimizer state reset at events",
                extra={"test acc %": 100 * r_acc, "vs slicing (points)": 100 * (r_acc - p_acc)},
            )
        )
    per_seed = ", ".join(
        f"seed {s}: dense {100 * d['acc']:.2f} / pruned {100 * p['acc']:.2f}"
        + (f" / reset {100 * r['acc']:.2f}" if reset else "")
        for s, d, p, r in zip(seeds, dense, pruned, reset or [None] * len(seeds))
    )
    report.notes.append(f"{name}: test accuracy per seed ({per_seed}); schedule {prune}; {epochs} epochs")


#: the schedules of examples/configs/structured_pruning*.yaml
CNN_SCHEDULE = dict(amount=0.5, initial_amount=0.1, schedule="linear", start=1, end=8)
VIT_SCHEDULE = dict(amount=0.5, initial_amount=0.0, schedule="linear", start=1, end=10, frequency=1)


def run(quick: bool = False) -> Report:
    seeds = [0] if quick else [0, 1, 2]
    batch, repeats = (8, 2) if quick else (256, 15)
    report = Report(
        title=f"StructuredPruning (amount=0.5) during training on digits: dense vs pruned, inference at batch {batch} "
        "with 2 threads",
    )
    if quick:  # tiny sizes: keeps the benchmark code working, measures nothing
        cnn, vit = (lambda: ResidualCNN(width=8, depth=1)), (lambda: DigitsTransformer(dim=16, depth=1, heads=4))
        cnn_small, vit_small = (lambda: ResidualCNN(width=4, depth=1)), (lambda: DigitsTransformer(dim=8, depth=1, heads=2))
        cnn_sched, vit_sched = dict(CNN_SCHEDULE, end=1), dict(VIT_SCHEDULE, end=1)
        cnn_epochs = vit_epochs = 2
        limit: int | None = 2
    else:
        cnn, vit = (lambda: ResidualCNN(width=32, depth=2)), (lambda: DigitsTransformer(dim=64, depth=2, heads=4))
        cnn_small, vit_small = (lambda: ResidualCNN(width=16, depth=2)), (lambda: DigitsTransformer(dim=32, depth=2, heads=2))
        cnn_sched, vit_sched = CNN_SCHEDULE, VIT_SCHEDULE
        cnn_epochs, vit_epochs = 15, 40
        limit = None
    _section(report, "ResidualCNN", cnn, cnn_epochs, cnn_sched, seeds, batch, repeats, True, limit, cnn_small)
    _section(report, "DigitsTransformer", vit, vit_epochs, vit_sched, seeds, batch, repeats, not quick, limit, vit_small)
    report.notes += [
        "ratio = pruned time / dense time (median of interleaved per-repeat ratios); speed-up = 1 / ratio",
        "MACs of one 8x8 sample (torch.utils.flop_counter); accuracy: mean test accuracy over the seeds",
        "event: tracing + ranking + pruning + optimizer slicing + MACs count, median over all events of all seeds",
        "optimizer state reset = the pruned parameters' AdamW statistics restart at every event, as with an optimizer "
        "rebuilt from scratch (the LR schedule keeps its progress in both)",
    ]
    return report
