"""Writes checkpoints with lightning-accel 0.1.0 (main at 9a33e40) for the compatibility test."""
import pathlib

import lightning.pytorch as pl
import torch

from lightning_accel import Quantization, ScheduledPruning, StructuredPruning
from tests.helpers.tiny import RandomDataModule, TinyConvNet, TinyMLP, tiny_trainer

out = pathlib.Path("tests/data")
out.mkdir(exist_ok=True)
torch.manual_seed(0)
x = torch.randn(3, 16)
def run(name, model, cbs, data, xin):
    pl.seed_everything(0)
    tr = tiny_trainer("/tmp/legacy_" + name, callbacks=cbs, max_epochs=2)
    tr.fit(model, data)
    tr.save_checkpoint(out / f"v0_1_0_{name}.ckpt")
    ck = torch.load(out / f"v0_1_0_{name}.ckpt", weights_only=False)
    with torch.no_grad():
        ck["_expected"] = {"input": xin, "output": model.eval()(xin)}
    torch.save(ck, out / f"v0_1_0_{name}.ckpt")
    print(name, list(ck["callbacks"]), (out / f"v0_1_0_{name}.ckpt").stat().st_size)
pl.seed_everything(0)
run("structured_int8", TinyMLP(), [StructuredPruning(amount=0.5, start=1, end=1), Quantization(mode="int8", when="fit_end", monitor=None)], RandomDataModule(), x)
pl.seed_everything(0)
run("nf4_adapters", TinyMLP(), [Quantization(mode="nf4", adapter_rank=4, compute_dtype="fp32")], RandomDataModule(), x)
pl.seed_everything(0)
run("scheduled", TinyConvNet(), [ScheduledPruning(amount=0.5, end=4)], RandomDataModule(shape=(1, 8, 8)), torch.randn(3, 1, 8, 8))
