"""Quantized inference on the CPU, measured on what a user deploys: float vs int8 (torchao and bitsandbytes),
each eager, ``torch.compile``-d and exported (``lightning_accel.export``, AOTInductor), batch 1 and 256, on an MLP,
the demo Transformer and the demo ResidualCNN (static int8 convolutions, torchao's PT2E x86 recipe).

Ratios are speed-ups (float eager time / variant time: higher is faster) against float eager and against float
compiled, interleaved in one run with 2 threads. Also: stored weight bytes vs float, the export file's size, and
digits test accuracy of the demo Transformer and ResidualCNN (trained here) before and after int8.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks._harness import Report, Row
from lightning_accel.deploy import export, load_exported
from lightning_accel.quantization.pt2e import calibrate_, int8_convs, quantize_convs_int8_, select_int8_layers
from lightning_accel.quantization.torchao import int8_layers, quantize_int8_

warnings.filterwarnings("ignore")


class MLP(nn.Module):
    def __init__(self, width: int = 1024, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def _int8(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """A torchao int8 copy of ``model``, as ``Quantization(mode="int8", when="fit_end")`` makes it on a CPU."""
    q = copy.deepcopy(model).eval()
    linears, convs = select_int8_layers(q)
    if convs:
        quantize_convs_int8_(q, convs, calibrate_(q, convs, calibration, q))
    if linears:
        quantize_int8_(q, linears)
    return q


def _time(fns: dict[str, Any], x: torch.Tensor, repeats: int, inner: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():  # warm-up (compilation of torch.compile variants)
            fn(x)
            fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn(x)
                samples[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def _accuracy(fn: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((fn(x).argmax(-1) == y).float().mean())


def _train_digits(model: nn.Module, epochs: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    import lightning.pytorch as pl

    from lightning_accel.demos import DigitsDataModule

    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=64, drop_last=True)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    data.setup("test")
    xs, ys = zip(*data.test_dataloader())
    calibration = [b[0] for _, b in zip(range(32), data.train_dataloader())]
    return model.eval(), torch.cat(xs), torch.cat(ys), calibration


def run(quick: bool = False) -> Report:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    batches = (1, 8) if quick else (1, 256)
    repeats = 2 if quick else 15
    report = Report(title="Quantized inference on the CPU (2 threads): speed-up vs float eager (higher is faster)",
                    ratio_label="speed-up vs float eager")
    models: list[tuple[str, nn.Module, torch.Tensor]] = []
    if quick:
        models.append(("MLP 2x64", MLP(64, 2).eval(), torch.randn(1, 64)))
    else:
        models.append(("MLP 4x1024", MLP().eval(), torch.randn(1, 1024)))
        from lightning_accel.demos import DigitsTransformer, ResidualCNN

        models.append(("DigitsTransformer d256x4", DigitsTransformer(dim=256, depth=4, heads=8).eval(), torch.rand(1, 1, 8, 8)))
        models.append(("ResidualCNN w32x2", ResidualCNN(width=32, depth=2).eval(), torch.rand(1, 1, 8, 8)))
    tmp = Path(tempfile.mkdtemp(prefix="bench_fast_inference_"))
    for name, model, example in models:
        int8 = _int8(model, [torch.rand(64, *example.shape[1:]) if example.dim() > 2 else torch.randn(64, *example.shape[1:]) for _ in range(4)])
        variants: dict[str, Any] = {"float eager": model, "torchao int8 eager": int8}
        sizes = {"float eager": _bytes(model), "torchao int8 eager": _bytes(int8)}
        try:
            from lightning_accel.quantization import quantize_

            bnb = copy.deepcopy(model)
            quantize_(bnb, mode="int8", compute_dtype="fp32")
            variants["bitsandbytes int8 eager"] = bnb
            sizes["bitsandbytes int8 eager"] = _bytes(bnb)
        except (ImportError, ValueError):  # not installed, or no Linear layer to quantize (a CNN)
            pass
        files: dict[str, int] = {}
        if not quick:
            variants["float compiled"] = torch.compile(copy.deepcopy(model))
            variants["torchao int8 compiled"] = torch.compile(copy.deepcopy(int8))
        for label, m in (("float exported", model), ("torchao int8 exported", int8)):
            path = export(m, example, tmp / f"{name.split()[0]}_{label.split()[0]}.pt2", compile=not quick)
            variants[label] = load_exported(path)
            files[label] = path.stat().st_size
        for batch in batches:
            x = example.expand(batch, *example.shape[1:]).clone().normal_() if example.dim() == 2 else torch.rand(batch, *example.shape[1:])
            times = _time(variants, x, repeats, inner=20 if batch == 1 else 2)
            base, comp = times["float eager"], times.get("float compiled")
            for label, t in times.items():
                extra: dict[str, Any] = {"model": name, "batch": batch}
                if comp is not None:
                    extra["speed-up vs float compiled"] = round(comp / t, 3)
                kind = label.rsplit(" ", 1)[0]
                weights = sizes.get(f"{kind} eager")
                if weights is not None:
                    extra["stored bytes / float"] = round(weights / sizes["float eager"], 3)
                if label in files:
                    extra["export file (KiB)"] = round(files[label] / 1024)
                if base / t < 1.0 and label != "float eager":
                    extra["note"] = "SLOWER than float eager"
                report.rows.append(Row(name=f"{name} b{batch}: {label}", median_s=t, ratio=base / t, extra=extra))
    if not quick:
        from lightning_accel.demos import DigitsTransformer, ResidualCNN

        for label, net, epochs in (
            ("DigitsTransformer(dim=64, depth=2)", DigitsTransformer(dim=64, depth=2, heads=4), 40),
            ("ResidualCNN(width=32, depth=2)", ResidualCNN(width=32, depth=2), 15),
        ):
            model, x, y, calibration = _train_digits(net, epochs)
            q = _int8(model, calibration)
            exported = load_exported(export(q, x[:1], tmp / f"digits_{label[:8]}_int8.pt2"))
            accs = {"float": _accuracy(model, x, y), "torchao int8 eager": _accuracy(q, x, y), "torchao int8 exported": _accuracy(exported, x, y)}
            report.notes.append(
                f"digits test accuracy, {label} trained {epochs} epochs: "
                + ", ".join(f"{k} {v:.2%}" for k, v in accs.items())
                + f" ({len(int8_layers(q))} Linear layers and {len(int8_convs(q))} convolutions int8 (calibrated on 32 "
                "training batches), output layer float)"
            )
    report.notes.append(
        "torchao int8 = Linear: dynamic int8 activations x int8 weights (one fp32 scale per output row); convolutions: "
        "static uint8 inputs (calibrated) x int8 weights per output channel (torchao PT2E X86InductorQuantizer recipe)"
    )
    return report
