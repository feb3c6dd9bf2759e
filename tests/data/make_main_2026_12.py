"""Writes checkpoints with lightning-accel main of 2026-12-07 (9cf505b), before the package's files moved, for the
compatibility test: their manifests record module paths (``lightning_accel.pruning.callbacks.StructuredPruning``)."""
import pathlib

import lightning.pytorch as pl
import torch

from lightning_accel import Quantization, QuantizationAwareTraining, StructuredPruning
from tests.helpers.tiny import RandomDataModule, TinyConvNet, TinyMLP, tiny_trainer

out = pathlib.Path("tests/data")


def run(name, model, cbs, data, xin, max_epochs=2):
    pl.seed_everything(0)
    tr = tiny_trainer("/tmp/main_2026_12_" + name, callbacks=cbs, max_epochs=max_epochs)
    tr.fit(model, data)
    path = out / f"main_2026_12_{name}.ckpt"
    tr.save_checkpoint(path)
    ck = torch.load(path, weights_only=False)
    ck.pop("optimizer_states", None)  # not needed to load the model; keeps the files small
    with torch.no_grad():
        ck["_expected"] = {"input": xin, "output": model.eval()(xin)}
    torch.save(ck, path)
    print(name, ck["lightning_accel"], path.stat().st_size)


x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
xc = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
pl.seed_everything(0)
run("structured", TinyMLP(), [StructuredPruning(amount=0.5, start=1, end=1)], RandomDataModule(), x)
pl.seed_everything(0)
run("int8_ptq", TinyMLP(), [Quantization(mode="int8", when="fit_end", backend="torchao", monitor=None)], RandomDataModule(), x)
pl.seed_everything(0)
run("int8_conv", TinyConvNet(), [Quantization(mode="int8", when="fit_end", backend="torchao", monitor=None, calibration_batches=2)],
    RandomDataModule(shape=(1, 8, 8)), xc)
pl.seed_everything(0)
run("nf4_adapters", TinyMLP(), [Quantization(mode="nf4", adapter_rank=4, compute_dtype="fp32")], RandomDataModule(), x)
pl.seed_everything(0)
run("qat", TinyMLP(), [QuantizationAwareTraining(bits=8, activations=True, convert="none")], RandomDataModule(), x)
