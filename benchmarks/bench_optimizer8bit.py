"""EightBitOptimizer(AdamW) vs torch AdamW: optimizer-state bytes, accuracy after the same training, step time.

    python -m benchmarks optimizer8bit [--quick]

State bytes are the bytes of every tensor in ``optimizer.state`` after one step (shared code tables counted once);
the ideal 8-bit ratio is (2 x 1 byte + 2 x 4 bytes / 256) / (2 x 4 bytes) = 0.254 for tensors of at least
``min_size`` (4096) elements; smaller tensors keep 32-bit state.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from benchmarks._harness import Report, Row, compare
from lightning_accel.demos import DigitsDataModule, DigitsTransformer
from lightning_accel.optimizers import EightBitOptimizer, optimizer_state_bytes, to_8bit_optimizer


def _one_step_state(dim: int, heads: int, eight: bool) -> int:
    torch.manual_seed(0)
    model = DigitsTransformer(dim=dim, depth=2, heads=heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    if eight:
        opt = to_8bit_optimizer(opt)
    F.cross_entropy(model(torch.rand(8, 1, 8, 8)), torch.randint(0, 10, (8,))).backward()
    opt.step()
    return optimizer_state_bytes(opt)


def _step_timer(dim: int, heads: int, eight: bool):
    torch.manual_seed(0)
    model = DigitsTransformer(dim=dim, depth=2, heads=heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if eight:
        opt = to_8bit_optimizer(opt)
    F.cross_entropy(model(torch.rand(8, 1, 8, 8)), torch.randint(0, 10, (8,))).backward()
    return opt.step


def run(quick: bool = False) -> Report:
    report = Report(title="EightBitOptimizer(AdamW) vs torch AdamW on the digits Transformer", ratio_label="time / AdamW")
    sizes = [(32, 2)] if quick else [(64, 4), (256, 8)]
    for dim, heads in sizes:
        full, eight = _one_step_state(dim, heads, False), _one_step_state(dim, heads, True)
        report.rows.append(
            Row(
                f"state bytes, dim={dim}",
                extra={"AdamW KiB": round(full / 1024, 1), "AdamW8bit KiB": round(eight / 1024, 1), "state ratio": round(eight / full, 3)},
            )
        )
    epochs, limit = (1, 3) if quick else (40, None)
    dm = DigitsDataModule(batch_size=64)
    for label, callbacks in (("AdamW", []), ("AdamW8bit (EightBitOptimizer)", [EightBitOptimizer()])):
        pl.seed_everything(0)
        model = DigitsTransformer(dim=64, depth=2, heads=4)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            deterministic=True,
            callbacks=callbacks,
            **({"limit_train_batches": limit} if limit else {}),
        )
        trainer.fit(model, dm)
        acc = trainer.test(model, dm, verbose=False)[0]["test_acc"]
        report.rows.append(Row(f"{label}: dim=64, {epochs} epochs", extra={"test_acc": round(acc * 100, 2)}))
    dim, heads = sizes[-1]
    rows = compare(
        {f"optimizer.step AdamW, dim={dim}": _step_timer(dim, heads, False), f"optimizer.step AdamW8bit, dim={dim}": _step_timer(dim, heads, True)},
        repeats=2 if quick else 9,
        warmup=1,
        inner=2 if quick else 10,
    )
    report.rows += rows
    report.notes += [
        "state ratio = AdamW8bit state bytes / AdamW state bytes after one step (ideal 0.254 above min_size)",
        "test_acc on the 359-digit test split with the demo's AdamW + per-step cosine schedule, seed 0",
    ]
    return report
