"""Accuracy of gradual pruning: the residual CNN on digits, dense vs cubic to 90% vs one-shot 90%.

All variants train the same epochs with the same recipe (AdamW, cosine decay, the seeded digits split);
only the pruning differs:

* ``dense``: no pruning.
* ``cubic 90%``: ``ScheduledPruning(amount=0.9, schedule="cubic", end=<8 epochs of steps>, frequency=10)``,
  then 7 epochs of fine-tuning with the masks fixed (as ``examples/configs/scheduled_pruning.yaml``).
* ``one-shot 90% at start``: ``ScheduledPruning(amount=0.9, schedule="one_shot", start=0)``: pruned at
  initialization, then trained with the masks fixed for all epochs.

Every conv weight but the stem's is pruned (the head, biases and BatchNorm stay dense), ``scope="global"``.
Test accuracy (359 held-out digits: one digit is 0.28 points) and test cross-entropy are averaged over
seeds; sparsity is measured on the weights after fit.
"""

from __future__ import annotations

import statistics
import tempfile
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks._harness import Report, Row
from lightning_accel import ScheduledPruning
from lightning_accel.demos import DigitsDataModule, ResidualCNN
from lightning_accel.pruning import prunable_parameters

EXCLUDE = ["stem.*"]


def _fit(variant: str, seed: int, epochs: int, fine_tune: int, limit: float | int, root: str) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model, dm = ResidualCNN(width=32, depth=2), DigitsDataModule(batch_size=64)
    dm.setup()
    steps_per_epoch = len(dm.train_dataloader()) if isinstance(limit, float) else limit
    callbacks: list[pl.Callback] = []
    if variant == "cubic 90%":
        end = (epochs - fine_tune) * steps_per_epoch
        callbacks.append(ScheduledPruning(amount=0.9, schedule="cubic", end=end, frequency=10, exclude=EXCLUDE, verbose=0))
    elif variant == "one-shot 90% at start":
        callbacks.append(ScheduledPruning(amount=0.9, schedule="one_shot", start=0, exclude=EXCLUDE, verbose=0))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=callbacks,
        limit_train_batches=limit, limit_val_batches=0, default_root_dir=root,
    )
    trainer.fit(model, dm)
    metrics = trainer.test(model, dm, verbose=False)[0]
    weights = prunable_parameters(model, exclude=EXCLUDE)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return {"acc": float(metrics["test_acc"]), "loss": float(metrics["test_loss"]), "sparsity": zeros / total, "pruned_weights": total}


def run(quick: bool = False) -> Report:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    epochs, fine_tune, limit, seeds = (2, 1, 3, [0]) if quick else (15, 7, 1.0, [0, 1, 2, 3, 4])
    torch.set_num_threads(1)  # accuracy does not depend on it; one thread suffers least on a shared machine
    root = tempfile.mkdtemp(prefix="bench_pruning_accuracy_")
    variants = ["dense", "cubic 90%", "one-shot 90% at start"]
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for seed in seeds:  # interleaved: the seeds' variants run side by side
        for v in variants:
            results[v].append(_fit(v, seed, epochs, fine_tune, limit, root))
    dense = statistics.mean(r["acc"] for r in results["dense"])
    report = Report(
        title=f"ResidualCNN(width=32, depth=2) on digits, {epochs} epochs, test accuracy over seeds {seeds}",
        ratio_label="accuracy - dense (points)",
    )
    for v in variants:
        accs = [r["acc"] for r in results[v]]
        mean = statistics.mean(accs)
        report.rows.append(
            Row(
                name=v,
                ratio=100 * (mean - dense),
                extra={
                    "test acc (mean)": f"{100 * mean:.2f}%",
                    "per seed": " / ".join(f"{100 * a:.2f}" for a in accs),
                    "test loss (mean)": f"{statistics.mean(r['loss'] for r in results[v]):.4f}",
                    "sparsity": f"{100 * statistics.mean(r['sparsity'] for r in results[v]):.2f}%",
                },
            )
        )
    report.notes += [
        f"pruned: every conv weight but the stem ({results['dense'][0]['pruned_weights']:,} weights); head, biases, "
        "BatchNorm stay dense; `scope='global'`",
        f"cubic: end of the schedule after {epochs - fine_tune} epochs, then {fine_tune} epochs of fine-tuning "
        "with fixed masks; an event every 10 steps",
        "the ratio column is the mean accuracy difference to the dense model, in percentage points",
    ]
    return report
