"""Fine-tuning a quantized base (QLoRA-style) vs full float fine-tuning.

A digits Transformer (dim 256) is pre-trained on digits 0-4, then fine-tuned to all ten digits with a new output
layer, (a) in full float32 (every parameter trains), (b) on an NF4 + double-quantization base with rank-8 LoRA
adapters on every quantized layer (``Quantization(mode="nf4", adapter_rank=8)``): the adapters, the new head, the
norms and the position embeddings train. Same data, epochs, schedule and seed.

    python -m benchmarks quantization_finetune [--quick]
"""

from __future__ import annotations

import copy
import time

import lightning.pytorch as pl
from torch import nn

from benchmarks._harness import Report, Row
from lightning_accel.demos import DigitsDataModule, DigitsTransformer
from lightning_accel.optimizers import EightBitOptimizer
from lightning_accel.quantization import Quantization, count_parameters, state_dict_bytes


def _trainer(epochs: int, limit: int | None, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        callbacks=list(callbacks),
        **({"limit_train_batches": limit} if limit else {}),
    )


def run(quick: bool = False) -> Report:
    dim, heads = (32, 2) if quick else (256, 8)
    pre_epochs, ft_epochs = (1, 1) if quick else (30, 15)
    limit = 3 if quick else None
    report = Report(title=f"Fine-tuning digits 0-4 -> 0-9, DigitsTransformer(dim={dim}): full float vs NF4 base + rank-8 adapters")

    pl.seed_everything(0)
    pretrained = DigitsTransformer(dim=dim, depth=2, heads=heads)
    first = DigitsDataModule(classes=[0, 1, 2, 3, 4])
    _trainer(pre_epochs, limit).fit(pretrained, first)
    every = DigitsDataModule()
    trainer = _trainer(1, None)
    pre_acc = trainer.test(pretrained, every, verbose=False)[0]["test_acc"]
    pre_acc_04 = trainer.test(pretrained, first, verbose=False)[0]["test_acc"]
    report.rows.append(
        Row(
            f"pre-trained on 0-4 ({pre_epochs} epochs)",
            extra={"test_acc 0-9": round(pre_acc * 100, 2), "test_acc 0-4": round(pre_acc_04 * 100, 2)},
        )
    )

    variants = {
        "(a) full float32 fine-tuning, lr 1e-3": (dict(lr=1e-3), []),
        "(a') full float32 fine-tuning, lr 3e-3": (dict(lr=3e-3), []),
        "(b) nf4 base + rank-8 adapters + new head": (dict(lr=3e-3), [Quantization(mode="nf4", adapter_rank=8)]),
        "(c) = (b) + EightBitOptimizer": (dict(lr=3e-3), [Quantization(mode="nf4", adapter_rank=8), EightBitOptimizer()]),
    }
    for name, (hparams, callbacks) in variants.items():
        pl.seed_everything(1)
        model = DigitsTransformer(dim=dim, depth=2, heads=heads, **hparams)
        model.load_state_dict(copy.deepcopy(pretrained.state_dict()))
        model.head = nn.Linear(dim, 10)  # a new output layer for the new task
        trainer = _trainer(ft_epochs, limit, callbacks)
        start = time.perf_counter()
        trainer.fit(model, every)
        seconds = time.perf_counter() - start
        acc = trainer.test(model, every, verbose=False)[0]["test_acc"]
        counts = count_parameters(model)
        report.rows.append(
            Row(
                name,
                extra={
                    "test_acc 0-9": round(acc * 100, 2),
                    "trainable params": counts["trainable"],
                    "trainable %": round(100 * counts["trainable"] / counts["total"], 2),
                    "model KiB": round(state_dict_bytes(model) / 1024, 1),
                    "fit s": round(seconds, 1),
                },
            )
        )
    report.notes += [
        "model KiB: bytes of every tensor in the model's state_dict (what its checkpoint stores)",
        "trainable %: of all parameters, a quantized weight counted as in x out values",
        "lr 3e-3 for adapters; full fine-tuning at 1e-3 and 3e-3 (the demo's per-step cosine schedule in every run)",
    ]
    return report
