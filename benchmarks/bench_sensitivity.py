"""Sensitivity-guided per-layer pruning vs uniform pruning at the same overall sparsity, on digits.

For each demo model (``ResidualCNN`` and ``DigitsTransformer``) a dense model is trained once; then
:func:`lightning_accel.analyze_sensitivity` (every Linear/Conv layer but the head alone, 11 amounts from 30% to
98%, 3 folds of the validation set) and :func:`lightning_accel.recommend_allocation` with ``sparsity=`` give a
per-layer allocation for 80% and 90%. Three variants at the *same* overall sparsity of the selected weights (the
uniform ones use the sparsity the guided allocation reached, which is at or just above the target):

* ``guided``: ``ScheduledPruning(layer_amounts=<allocation>)``;
* ``uniform global``: ``ScheduledPruning(amount=s, scope="global")`` (one magnitude ranking over all layers);
* ``uniform per layer``: ``ScheduledPruning(amount=s, scope="layer")`` (every layer at ``s``).

Each variant prunes the trained model one-shot and is fine-tuned for a few epochs with the masks fixed; test
accuracy (359 held-out digits: one digit is 0.28 points) is reported right after pruning (no fine-tuning) and after
fine-tuning. The analysis cost is its wall time in seconds (the evaluation passes over the validation set).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from benchmarks._harness import Report, Row
from lightning_accel import ScheduledPruning, analyze_sensitivity, prune_, recommend_allocation
from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN
from lightning_accel.pruning import prunable_parameters

AMOUNTS = [0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98]
TARGETS = [0.8, 0.9]
MODELS = {
    "ResidualCNN(width=32, depth=2)": lambda: ResidualCNN(width=32, depth=2),
    "DigitsTransformer()": lambda: DigitsTransformer(),
}


def _trainer(epochs: int, root: str, limit: float | int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=callbacks or [],
        limit_train_batches=limit, limit_val_batches=0, default_root_dir=root,
    )


def _test(model: pl.LightningModule, dm: DigitsDataModule, root: str) -> float:
    return float(_trainer(1, root, 1.0).test(model, dm, verbose=False)[0]["test_acc"])


def _sparsity(model: torch.nn.Module) -> float:
    weights = prunable_parameters(model)
    return sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())


def _one_shot(model: pl.LightningModule, variant: str, s: float, amounts: dict[str, float]) -> None:
    if variant == "guided":
        for layer, a in amounts.items():
            if a > 0:
                prune_(model, a, scope="layer", modules=[layer])
    else:
        prune_(model, s, scope="global" if variant == "uniform global" else "layer")


def _bench_model(name: str, quick: bool, root: str) -> tuple[list[Row], dict[str, Any]]:
    epochs, fine_tune, limit = (1, 1, 3) if quick else (12, 3, 1.0)
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    dense = MODELS[name]()
    _trainer(epochs, root, limit).fit(dense, dm)
    dense_acc = _test(dense, dm, root)
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    assert dm.val_set is not None
    val = DataLoader(dm.val_set, batch_size=30)
    started = time.perf_counter()
    result = analyze_sensitivity(dense, val, MulticlassAccuracy(10), amounts=AMOUNTS[:3] if quick else AMOUNTS, folds=3)
    seconds = time.perf_counter() - started
    rows = []
    for target in TARGETS:
        rec = recommend_allocation(result, sparsity=target)
        amounts = rec["layer_amounts"]
        s = rec["sparsity"]
        for variant in ("guided", "uniform global", "uniform per layer"):
            pl.seed_everything(0, verbose=False)
            model = MODELS[name]()
            model.load_state_dict(state)
            _one_shot(model, variant, s, amounts)
            one_shot_acc, reached = _test(model, dm, root), _sparsity(model)
            model.load_state_dict(state)
            model.lr = 1e-3
            if variant == "guided":
                cb = ScheduledPruning(amount=max(s, 1e-3), schedule="one_shot", layer_amounts=amounts, verbose=0)
            else:
                cb = ScheduledPruning(amount=s, schedule="one_shot", scope="global" if variant == "uniform global" else "layer", verbose=0)
            _trainer(fine_tune, root, limit, [cb]).fit(model, dm)
            tuned_acc = _test(model, dm, root)
            rows.append(
                Row(
                    name=f"{name} {target:.0%}: {variant}",
                    ratio=100 * (tuned_acc - dense_acc),
                    extra={
                        "sparsity": f"{100 * reached:.2f}%",
                        "dense test acc": f"{100 * dense_acc:.2f}%",
                        "test acc, pruned": f"{100 * one_shot_acc:.2f}%",
                        "test acc, fine-tuned": f"{100 * tuned_acc:.2f}%",
                        "analysis s": f"{seconds:.1f}" if variant == "guided" else "",
                    },
                )
            )
    return rows, {"seconds": seconds, "layers": len(result["layers"]), "evaluations": len(result["layers"]) * len(result["amounts"]) * 3}


def run(quick: bool = False) -> Report:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    torch.set_num_threads(1)  # accuracy does not depend on it; one thread suffers least on a shared machine
    root = tempfile.mkdtemp(prefix="bench_sensitivity_")
    report = Report(
        title="Sensitivity-guided vs uniform pruning on digits at the same overall sparsity (seed 0)",
        ratio_label="fine-tuned acc - dense (points)",
    )
    for name in MODELS:
        rows, info = _bench_model(name, quick, root)
        report.rows += rows
        report.notes.append(
            f"{name}: analysis of {info['layers']} layers x {len(AMOUNTS[:3] if quick else AMOUNTS)} amounts x 3 folds "
            f"({info['evaluations']} evaluation passes over a third of the 180 validation digits) took {info['seconds']:.1f} s"
        )
    report.notes += [
        "sparsity: zeros among the selected weights (every Linear/Conv but the head) after one-shot pruning of the trained model",
        "fine-tuned: the pruned model trained 3 more epochs (lr 1e-3, cosine) with the masks fixed; one seed, so +-0.3 points is one digit",
    ]
    return report
