"""Baseline speeds of the demo models: a training step and batch inference, float32 vs bf16 autocast.

Gives later benchmarks their reference point and shows what the CPU's bf16 support is worth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks._harness import Report, compare
from lightning_accel.demos import DigitsTransformer, ResidualCNN


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _infer(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None):
    @torch.inference_mode()
    def fwd() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            model(x)

    return fwd


def run(quick: bool = False) -> Report:
    torch.manual_seed(0)
    batch = 8 if quick else 256
    repeats = 2 if quick else 9
    report = Report(title=f"Demo models, batch {batch}, {torch.get_num_threads()} threads available (2 used)")
    for name, make in (("ResidualCNN", lambda: ResidualCNN()), ("DigitsTransformer(dim=256)", lambda: DigitsTransformer(dim=256, depth=4, heads=8))):
        model = make()
        x = torch.rand(batch, 1, 8, 8)
        y = torch.randint(0, 10, (batch,))
        rows = compare(
            {
                f"{name} train fp32": _train_step(model.train(), x, y, None),
                f"{name} train bf16": _train_step(model.train(), x, y, torch.bfloat16),
            },
            repeats=repeats,
            warmup=1,
        )
        rows += compare(
            {
                f"{name} infer fp32": _infer(model.eval(), x, None),
                f"{name} infer bf16": _infer(model.eval(), x, torch.bfloat16),
            },
            repeats=repeats,
            warmup=1,
        )
        report.rows += rows
    report.notes.append("ratio < 1 means faster than the fp32 row above it")
    return report
