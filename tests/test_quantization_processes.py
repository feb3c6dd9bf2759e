"""Quantization and EightBitOptimizer across processes: a real kill-and-resume, and DDP on 2 CPU processes."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_python

RESUME_SCRIPT = """
    import sys, torch, lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_accel.demos import DigitsTransformer, DigitsDataModule
    from lightning_accel import EightBitOptimizer, Quantization
    from tests.helpers import KillAtStep
    mode, out = sys.argv[1], sys.argv[2]
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath="ckpts", every_n_epochs=1, save_top_k=-1)
    callbacks = [Quantization(mode="nf4", adapter_rank=4), EightBitOptimizer(min_size=256), ckpt]
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=0, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         callbacks=callbacks + ([KillAtStep(4)] if mode == "kill" else []))
    model = DigitsTransformer(dim=32, depth=1, heads=2)
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path="ckpts/epoch=0-step=4.ckpt" if mode == "resume" else None)
    opt = trainer.optimizers[0]
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "opt_type": type(opt).__name__,
                "lr": opt.param_groups[0]["lr"], "record": callbacks[0].record}, out)
"""


def _equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    """Killed at the start of epoch 1 and resumed from the epoch-0 checkpoint: the quantized layers and adapters are
    recreated before the weights load, the 8-bit optimizer state continues, and the run ends exactly where an
    uninterrupted one ends."""
    run_python(RESUME_SCRIPT, tmp_path, "kill", "killed.pt", expect=17)
    saved = torch.load(tmp_path / "ckpts" / "epoch=0-step=4.ckpt", weights_only=False)
    assert not (tmp_path / "killed.pt").exists()
    assert saved["callbacks"]["Quantization"]["applied"]
    assert any(
        s["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8
        for s in saved["optimizer_states"][0]["state"].values()
        if "__bnb_optimizer_quant_state__" in s
    )
    run_python(RESUME_SCRIPT, tmp_path, "resume", "resumed.pt")
    run_python(RESUME_SCRIPT, tmp_path, "full", "full.pt")
    resumed, full = torch.load(tmp_path / "resumed.pt", weights_only=False), torch.load(tmp_path / "full.pt", weights_only=False)
    assert full["opt_type"] == resumed["opt_type"] == "AdamW8bit"
    _equal(resumed["model"], full["model"], "model")
    _equal(resumed["opt"]["state"], full["opt"]["state"], "optimizer")
    assert resumed["lr"] == full["lr"] and resumed["record"] == full["record"]
    adapters = [k for k in full["model"] if k.endswith("lora_B")]
    assert adapters and all(full["model"][k].abs().sum() > 0 for k in adapters)


DDP_SCRIPT = """
    import os, sys, torch, lightning.pytorch as pl
    from lightning_accel.demos import DigitsTransformer, DigitsDataModule
    from lightning_accel import EightBitOptimizer, Quantization
    rank = int(os.environ.get("LOCAL_RANK", 0))
    common = dict(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, limit_train_batches=4, limit_val_batches=2,
                  logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    dm = DigitsDataModule(batch_size=32)

    # QLoRA-style: each rank starts from *different* float weights; the quantized base must still agree
    torch.manual_seed(100 + rank)
    model = DigitsTransformer(dim=32, depth=1, heads=2)
    trainer = pl.Trainer(callbacks=[Quantization(mode="nf4", adapter_rank=4), EightBitOptimizer(min_size=256)], **common)
    trainer.fit(model, dm)
    torch.save({"sd": model.state_dict(), "opt": type(trainer.optimizers[0]).__name__}, f"qlora.rank{trainer.global_rank}.pt")

    # post-training quantization, validated before and after on both ranks
    torch.manual_seed(0)
    model = DigitsTransformer(dim=32, depth=1, heads=2)
    callback = Quantization(mode="int8", when="fit_end", monitor="val_acc", max_metric_drop=0.5)
    trainer = pl.Trainer(callbacks=[callback], **common)
    trainer.fit(model, dm)
    torch.save({"sd": model.state_dict(), "record": callback.record, "fn": trainer.state.fn.value},
               f"ptq.rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
def test_ddp_two_cpu_processes(tmp_path):
    run_python(DDP_SCRIPT, tmp_path, timeout=900)
    for name in ("qlora", "ptq"):
        r0 = torch.load(tmp_path / f"{name}.rank0.pt", weights_only=False)
        r1 = torch.load(tmp_path / f"{name}.rank1.pt", weights_only=False)
        _equal(r0, r1, name)  # both ranks end with identical quantized weights, statistics, adapters and records
    qlora = torch.load(tmp_path / "qlora.rank0.pt", weights_only=False)
    assert qlora["opt"] == "AdamW8bit"
    assert "blocks.0.attn.qkv.weight.absmax" in qlora["sd"]
    assert all(v.abs().sum() > 0 for k, v in qlora["sd"].items() if k.endswith("lora_B"))
    ptq = torch.load(tmp_path / "ptq.rank0.pt", weights_only=False)
    record = ptq["record"]
    assert record["applied"] and record["mode"] == "int8" and "blocks.0.mlp.0.SCB" in ptq["sd"]
    assert record["metric_before"] is not None and record["metric_after"] is not None
    assert ptq["fn"] == "fit"
