"""Quantization-aware training vs post-training quantization with the same quantizer, on digits.

For the digits Transformer and the residual CNN, at int8 per channel, int4 per group of 32 and int4 per channel:

* ``float``: trained in float32 for all epochs (AdamW, cosine decay, the seeded digits split).
* ``PTQ``: that float model, quantized after training with the *same* quantizer QAT uses
  (:func:`~lightning_accel.qat.core.prepare_qat_`: torchao's ``IntxFakeQuantizer``, symmetric), input
  ranges calibrated on the training set, then converted to the real layers (:func:`convert_qat_`).
* ``QAT``: the same recipe and total epochs, float first, ``QuantizationAwareTraining(start=...)`` for the last
  part, converted at fit end.

Converted layers: int8 Linear -> torchao dynamic int8; int4 Linear -> torchao packed int4 (CPU kernel); int8 Conv
-> PT2E static int8 convolutions (inputs fake-quantized during QAT: ``activations=True``). int4 convolutions have
no real kernel: those rows are measured on the fake-quantized model, which computes what int4 weights compute.
Test accuracy on the 359 held-out digits (one digit is 0.28 points).

    python -m benchmarks qat [--quick]
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks._harness import Report, Row
from lightning_accel import QuantizationAwareTraining
from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN
from lightning_accel.qat.core import convert_qat_, fake_quantized_layers, prepare_qat_, set_qat_flags_

FORMATS: dict[str, dict[str, Any]] = {
    "int8 per-channel": {"bits": 8},
    "int4 per-group 32": {"bits": 4, "granularity": "per_group", "group_size": 32},
    "int4 per-channel": {"bits": 4},
}


def _models(quick: bool) -> dict[str, dict[str, Any]]:
    dim, depth = (32, 1) if quick else (64, 2)
    return {
        f"DigitsTransformer(dim={dim}, depth={depth})": {
            "build": lambda: DigitsTransformer(dim=dim, depth=depth, heads=4),
            "epochs": 2 if quick else 15,
            "qat_epochs": 1 if quick else 5,
            "conv": False,
            "quick_formats": ["int4 per-group 32"],
            # 16 inputs: torchao's CPU int4 kernel packs groups of 32, 64 or 128 inputs
            "exclude": {"int4 per-group 32": ["embed"], "int4 per-channel": ["embed"]},
        },
        f"ResidualCNN(width=32, depth={depth})": {
            "build": lambda: ResidualCNN(width=32, depth=depth),
            "epochs": 2 if quick else 10,
            "qat_epochs": 1 if quick else 4,
            "conv": True,
            "quick_formats": ["int8 per-channel"],
            "exclude": {"int4 per-group 32": ["stem.*"]},  # 9 inputs per output channel: no group of 32
        },
    }


def _trainer(epochs: int, limit: int | None, root: str, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=callbacks or [],
        limit_val_batches=0, default_root_dir=root, **({"limit_train_batches": limit} if limit else {}),
    )


def _settings(spec: dict[str, Any], fmt: str) -> dict[str, Any]:
    s = dict(FORMATS[fmt])
    s["activations"] = spec["conv"] and s["bits"] == 8  # int8 convolutions run on uint8 inputs: train on them too
    s["exclude"] = spec["exclude"].get(fmt)
    s["convert"] = "none" if spec["conv"] and s["bits"] == 4 else "torchao"
    return s


@torch.no_grad()
def _ptq(model: pl.LightningModule, dm: DigitsDataModule, s: dict[str, Any], batches: int | None) -> pl.LightningModule:
    """Post-training quantization with QAT's quantizer: fake-quantize, calibrate the input ranges, convert."""
    q = copy.deepcopy(model).eval()
    prepare_qat_(q, exclude=s["exclude"], **{k: s[k] for k in ("bits", "granularity", "group_size", "activations") if k in s})
    set_qat_flags_(q, weights=True, activations=True, observers=True)
    for layer in fake_quantized_layers(q).values():  # observers update in training mode; BatchNorm stays in eval
        if layer.activation_fake_quantizer is not None:
            layer.activation_fake_quantizer.train()
    for i, (x, _) in enumerate(dm.train_dataloader()):
        if batches is not None and i >= batches:
            break
        q(x)
    q.eval()
    if s["convert"] != "none":
        convert_qat_(q, s["convert"])
    return q


def _test(model: pl.LightningModule, dm: DigitsDataModule, root: str, limit: int | None) -> float:
    trainer = _trainer(1, None, root)
    trainer.limit_test_batches = limit or 1.0
    return float(trainer.test(model, dm, verbose=False)[0]["test_acc"])


def run(quick: bool = False) -> Report:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    torch.set_num_threads(2)
    limit = 3 if quick else None
    root = tempfile.mkdtemp(prefix="bench_qat_")
    report = Report(title="QAT vs post-training quantization (same quantizer, same total epochs), digits test accuracy",
                    ratio_label="accuracy - float (points)")
    summary = []
    for model_name, spec in _models(quick).items():
        dm = DigitsDataModule(batch_size=64)
        dm.setup()
        steps = limit or len(dm.train_dataloader())
        epochs, qat_epochs = spec["epochs"], spec["qat_epochs"]
        pl.seed_everything(0, verbose=False)
        float_model = spec["build"]()
        _trainer(epochs, limit, root).fit(float_model, dm)
        float_acc = _test(float_model, dm, root, limit)
        report.rows.append(Row(f"{model_name}: float ({epochs} epochs)", ratio=0.0, extra={"test acc": f"{100 * float_acc:.2f}%"}))
        for fmt in spec["quick_formats"] if quick else FORMATS:
            s = _settings(spec, fmt)
            ptq_acc = _test(_ptq(float_model, dm, s, limit), dm, root, limit)
            pl.seed_everything(0, verbose=False)
            model = spec["build"]()
            qat = QuantizationAwareTraining(
                start=(epochs - qat_epochs) * steps, modules=None,
                **{k: s[k] for k in ("bits", "granularity", "group_size", "activations", "exclude", "convert") if k in s},
            )
            _trainer(epochs, limit, root, [qat]).fit(model, dm)
            qat_acc = _test(model, dm, root, limit)
            drop = float_acc - ptq_acc
            recovered = (qat_acc - ptq_acc) / drop if drop > 0 else None
            layers = "fake-quantized (no int4 conv kernel)" if s["convert"] == "none" else "converted (torchao / PT2E)"
            report.rows.append(Row(f"{model_name}: {fmt} PTQ", ratio=100 * (ptq_acc - float_acc),
                                   extra={"test acc": f"{100 * ptq_acc:.2f}%", "layers": layers}))
            report.rows.append(Row(
                f"{model_name}: {fmt} QAT (last {qat_epochs} of {epochs} epochs)", ratio=100 * (qat_acc - float_acc),
                extra={"test acc": f"{100 * qat_acc:.2f}%", "layers": layers,
                       "recovered of the PTQ drop": "n/a (no drop)" if recovered is None else f"{100 * recovered:.0f}%"},
            ))
            summary.append((model_name, fmt, 100 * drop, recovered))
    report.notes += [
        "PTQ and QAT use the same fake quantizer (torchao IntxFakeQuantizer, symmetric) and the same converted layers; "
        "PTQ calibrates input ranges on the training set",
        "the ratio column is the accuracy difference to the float model in percentage points; 'recovered' is "
        "(QAT - PTQ) / (float - PTQ)",
        "one seed (0); one digit of the test set is 0.28 points",
    ]
    return report
