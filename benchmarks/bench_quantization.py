"""Quantization with bitsandbytes on this machine: stored bits per weight, output fidelity, post-training accuracy
of the digits Transformer, and the speed of quantized layers vs float (informational: on a CPU, 4-bit and int8
layers buy memory, not speed).

    python -m benchmarks quantization [--quick]

* Bits per weight = (weight bytes + quantization-state bytes) x 8 / quantized weights, counted from the tensors the
  layers store (absmax / nested absmax / offset, or int8 row scales). The fixed code tables of the 4-bit formats
  (a 16-entry map and, with double quantization, a 256-entry map: 1.1 KB per layer) are reported separately.
* SNR: signal-to-quantization-noise ratio of a quantized layer's output vs the float layer's, on the trained model's
  own activations (the input of ``blocks.0.mlp.0`` on the test set).
* Post-training quantization: the Transformer of ``digits_transformer.yaml`` (dim 64) and a wider one (dim 256),
  trained in float32, then quantized with ``quantize_``; test accuracy on the 359 held-out digits.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks._harness import Report, Row, compare
from lightning_accel.demos import DigitsDataModule, DigitsTransformer
from lightning_accel.quantization import quantize_, quantized_footprint, state_dict_bytes

VARIANTS = {
    "nf4 + double quant": dict(mode="nf4", double_quant=True),
    "nf4": dict(mode="nf4", double_quant=False),
    "fp4 + double quant": dict(mode="fp4", double_quant=True),
    "fp4": dict(mode="fp4", double_quant=False),
    "int8": dict(mode="int8"),
}


def _trainer(epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        **kwargs,
    )


def _snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def _layer_input(model: DigitsTransformer, x: torch.Tensor) -> torch.Tensor:
    captured = {}

    def keep_input(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured["x"] = inputs[0].detach()

    handle = model.blocks[0].mlp[0].register_forward_hook(keep_input)
    with torch.no_grad():
        model(x)
    handle.remove()
    return captured["x"]


def _accuracy_rows(
    report: Report, dim: int, heads: int, epochs: int, limit: int | None, dm: DigitsDataModule, quick: bool = False
) -> None:
    pl.seed_everything(0)
    model = DigitsTransformer(dim=dim, depth=2, heads=heads)
    kwargs = {"limit_train_batches": limit} if limit else {}
    trainer = _trainer(epochs, **kwargs)
    trainer.fit(model, dm)
    model.eval()
    base = trainer.test(model, dm, verbose=False)[0]["test_acc"]
    x_test = dm.test_set.tensors[0]
    acts = _layer_input(model, x_test)
    with torch.no_grad():
        ref = model.blocks[0].mlp[0](acts)
    float_bytes = state_dict_bytes(model)
    name = f"DigitsTransformer(dim={dim})"
    report.rows.append(Row(f"{name} float32, {epochs} epochs", extra={"test_acc": round(base * 100, 2), "model KiB": round(float_bytes / 1024, 1)}))
    for label, cfg in VARIANTS.items():
        for compute in ("auto", "fp32"):
            if compute == "fp32" and (quick or label not in ("nf4 + double quant", "int8")):
                continue
            q = copy.deepcopy(model)
            quantize_(q, compute_dtype=compute, **cfg)
            q.eval()
            acc = trainer.test(q, dm, verbose=False)[0]["test_acc"]
            foot = quantized_footprint(q)
            with torch.no_grad():
                snr = _snr_db(ref, q.blocks[0].mlp[0](acts))
            report.rows.append(
                Row(
                    f"{name} {label} (compute {compute})",
                    extra={
                        "test_acc": round(acc * 100, 2),
                        "drop (points)": round((base - acc) * 100, 2),
                        "bits/weight": round(foot["bits_per_weight"], 3),
                        "bits/weight incl. code tables": round(foot["bits_per_weight_with_tables"], 3),
                        "SNR mlp.0 (dB)": round(snr, 1),
                        "model KiB": round(state_dict_bytes(q) / 1024, 1),
                    },
                )
            )


def _speed_rows(report: Report, quick: bool) -> None:
    torch.manual_seed(0)
    width, batch = (256, 64) if quick else (1024, 512)
    repeats = 2 if quick else 15
    base = nn.Linear(width, width)
    x = torch.randn(batch, width)
    frozen = copy.deepcopy(base).requires_grad_(False)  # a frozen float base, as the quantized layers are
    layers = {"float32": frozen}
    configs = {
        "nf4 (compute bf16)": dict(mode="nf4", compute_dtype="bf16"),
        "nf4 (compute fp32)": dict(mode="nf4", compute_dtype="fp32"),
        "int8 (compute bf16)": dict(mode="int8", compute_dtype="bf16"),
        "int8 (compute fp32)": dict(mode="int8", compute_dtype="fp32"),
    }
    for label, cfg in configs.items():
        holder = nn.Sequential(copy.deepcopy(base))
        quantize_(holder, modules=["0"], **cfg)
        layers[label] = holder[0]

    def infer(layer: nn.Module, autocast: bool = False):
        @torch.inference_mode()
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                layer.eval()(x)

        return run

    def train_step(layer: nn.Module):
        xg = x.clone().requires_grad_(True)

        def run() -> None:
            layer.train()(xg).sum().backward()
            xg.grad = None

        return run

    variants = {f"Linear({width},{width}) infer {k}": infer(v) for k, v in layers.items()}
    variants[f"Linear({width},{width}) infer float32 + bf16 autocast"] = infer(frozen, autocast=True)
    inner = 2 if quick else 10
    rows = compare(variants, repeats=repeats, warmup=1, inner=inner)
    training = {f"Linear({width},{width}) fwd+bwd (input grad) {k}": train_step(v) for k, v in layers.items()}
    training[f"Linear({width},{width}) fwd+bwd float32, trainable weight"] = train_step(base)
    rows += compare(training, repeats=repeats, warmup=1, inner=inner)
    for r in rows:
        r.extra["batch"] = batch
    report.rows += rows


def run(quick: bool = False) -> Report:
    report = Report(title="Quantization with bitsandbytes: stored bits, fidelity, post-training accuracy, CPU speed")
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    if quick:
        _accuracy_rows(report, dim=32, heads=2, epochs=1, limit=3, dm=dm, quick=True)
    else:
        _accuracy_rows(report, dim=64, heads=4, epochs=40, limit=None, dm=dm)
        _accuracy_rows(report, dim=256, heads=8, epochs=40, limit=None, dm=dm)
    _speed_rows(report, quick)
    report.notes += [
        "bits/weight = (packed weight bytes + absmax / nested absmax / offset or int8 row-scale bytes) x 8 / weights",
        "compute auto = bf16 on this CPU (AVX512-BF16); accuracy on the 359-digit test split, 1 digit = 0.28 points",
        "speed rows: ratio < 1 means faster than the frozen float32 row of the same table (informational); "
        "fwd+bwd = forward and gradient to the input, the work of a frozen base layer under adapters",
    ]
    return report
