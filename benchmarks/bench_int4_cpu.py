"""4-bit weights on the CPU: torchao's CPU int4 options against bitsandbytes nf4, eager, batch 1 and 256.

The measurement behind ``Quantization(backend="auto")`` keeping bitsandbytes for 4-bit: torchao 0.18's int4
weight-only CPU tensor (``Int4OpaqueTensor``, tinygemm) and its int8-activation x int4-weight layout
(``Int8DynamicActivationIntxWeightConfig``) against bitsandbytes nf4 (fp32 and bf16 compute), on an MLP of 4x1024
(the output layer stays float), 2 threads, interleaved repeats. Ratios are speed-ups vs float eager.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn

from benchmarks._harness import Report, Row
from benchmarks.bench_fast_inference import MLP

warnings.filterwarnings("ignore")


def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _bytes(model: nn.Module) -> int:
    """Stored bytes of the state dict, torchao's tensor subclasses counted by their inner (packed) tensors."""
    return sum(_tensor_bytes(t) for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def _variants(model: nn.Module) -> dict[str, nn.Module]:
    from lightning_accel.quantization import quantize_ as bnb_quantize
    from lightning_accel.quantization.torchao import require_torchao

    require_torchao()
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    out: dict[str, nn.Module] = {"float eager": model}
    a = copy.deepcopy(model)
    for layer in a.layers:
        layer.weight = nn.Parameter(Int4OpaqueTensor.from_hp(layer.weight.detach(), [1, 128]), requires_grad=False)
    out["torchao int4 weight-only (Int4OpaqueTensor, group 128)"] = a
    b = copy.deepcopy(model)
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(128))
    quantize_(b, config, filter_fn=lambda module, fqn: fqn.startswith("layers."))
    out["torchao int8 act x int4 weight (Intx, group 128)"] = b
    for compute in ("fp32", "bf16"):
        c = copy.deepcopy(model)
        bnb_quantize(c, mode="nf4", compute_dtype=compute)
        out[f"bitsandbytes nf4 ({compute} compute)"] = c
    return out


def run(quick: bool = False) -> Report:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    width = 256 if quick else 1024
    model = MLP(width).eval()
    variants = _variants(model)
    report = Report(title=f"4-bit weights on the CPU, MLP 4x{width} (2 threads): speed-up vs float eager", ratio_label="speed-up vs float eager")
    probe = torch.randn(3, width)
    with torch.no_grad():
        errors = {k: float((m(probe) - model(probe)).abs().max()) for k, m in variants.items()}
    for batch in (1, 8) if quick else (1, 256):
        x = torch.randn(batch, width)
        samples: dict[str, list[float]] = {k: [] for k in variants}
        inner = 10 if batch == 1 else 2
        with torch.no_grad():
            for m in variants.values():
                m(x)
            for _ in range(2 if quick else 10):
                for k, m in variants.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        m(x)
                    samples[k].append((time.perf_counter() - t0) / inner)
        med = {k: statistics.median(v) for k, v in samples.items()}
        for k, t in med.items():
            extra: dict[str, Any] = {"batch": batch, "stored bytes / float": round(_bytes(variants[k]) / _bytes(model), 3),
                                     "max abs error": round(errors[k], 5)}
            if med["float eager"] / t < 1.0 and k != "float eager":
                extra["note"] = "SLOWER than float eager"
            report.rows.append(Row(name=f"b{batch}: {k}", median_s=t, ratio=med["float eager"] / t, extra=extra))
    report.notes.append("the output layer stays float in every variant; compiled variants are in bench_fast_inference (int8)")
    return report
