"""The deployable artifact: torch.export (+ AOTInductor) of the compressed model, outputs within a stated tolerance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_accel
from lightning_accel import ExportError, Quantization, StructuredPruning
from lightning_accel.quantization.torchao import int8_layers, quantize_int8_
from tests.helpers import RandomDataModule, TinyMLP, tiny_trainer

#: exported vs in-memory model: the same graph (program) or inductor's fused int8 kernels (AOTI)
PROGRAM_ATOL = 1e-5
AOTI_RTOL = 2e-2  # of the output's largest magnitude


def _int8_mlp() -> TinyMLP:
    torch.manual_seed(0)
    model = TinyMLP().eval()
    quantize_int8_(model, {"fc1": model.fc1, "fc2": model.fc2})
    return model


def test_exported_program_matches_the_in_memory_model_at_any_batch(tmp_path):
    model = _int8_mlp()
    path = lightning_accel.export(model, torch.zeros(1, 16), tmp_path / "m.pt2", compile=False)
    run = lightning_accel.load_exported(path)
    for batch in (1, 7):
        x = torch.randn(batch, 16)
        with torch.no_grad():
            assert torch.allclose(run(x), model(x), atol=PROGRAM_ATOL)


def test_aoti_package_runs_without_the_training_code_and_matches(tmp_path):
    model = _int8_mlp()
    path = lightning_accel.export(model, torch.zeros(1, 16), tmp_path / "m_aoti.pt2")  # compile=True: AOTInductor
    code = (
        "import sys, torch; run = torch._inductor.aoti_load_package(sys.argv[1]); "
        "x = torch.load(sys.argv[2]); torch.save(run(x), sys.argv[3])"
    )
    x = torch.randn(33, 16)
    torch.save(x, tmp_path / "x.pt")
    import subprocess
    import sys

    # a fresh interpreter that imports neither lightning_accel nor the model's class
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True, timeout=300)
    y = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        ref = model(x)
    assert (y - ref).abs().max() <= AOTI_RTOL * ref.abs().max()
    assert torch.allclose(lightning_accel.load_exported(path)(x), y)


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: torch.export cannot capture it
            return x * 2
        return x


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = _DataDependent()

    def forward(self, x):
        return self.gate(self.fc(x))


def test_an_unexportable_model_names_the_failing_module(tmp_path):
    with pytest.raises(ExportError, match=r"failed in 'gate' \(_DataDependent\)"):
        lightning_accel.export(_Wrapper(), torch.randn(2, 4), tmp_path / "x.pt2", compile=False)
    with pytest.raises(FileNotFoundError):
        lightning_accel.load_exported(tmp_path / "missing.pt2")


def test_quantization_exports_the_pruned_int8_model_at_fit_end(tmp_path):
    model = TinyMLP()
    quant = Quantization(mode="int8", when="fit_end", monitor=None, export_path="model.pt2", export_compile=False)
    prune = StructuredPruning(amount=0.5, interval="step", start=1, end=2, verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[quant, prune])
    trainer.fit(model, RandomDataModule())
    assert set(int8_layers(model)) == {"fc1", "fc2"} and model.fc1.out_features == 16
    run = lightning_accel.load_exported(quant.exported_path)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(run(x), model.eval()(x), atol=PROGRAM_ATOL)
    with pytest.raises(ValueError, match="`export_path` must be None or a file path"):
        Quantization(when="fit_end", export_path="")
    with pytest.raises(ValueError, match="`backend`='torchao' runs int8 post-training quantization"):
        Quantization(mode="nf4", backend="torchao")
