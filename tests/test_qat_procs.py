"""QuantizationAwareTraining under DDP on 2 CPU processes (gloo)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_python

DDP_SCRIPT = """
    import os, torch, lightning.pytorch as pl
    from lightning_accel import QuantizationAwareTraining
    from tests.helpers.tiny import RandomDataModule, TinyConvNet, TinyMLP
    rank = int(os.environ.get("LOCAL_RANK", 0))
    common = dict(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, limit_train_batches=4, logger=False,
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    results = {}
    for name, build, shape, kwargs in [
        ("cnn", TinyConvNet, (1, 8, 8), dict(activations=True, start=2)),
        ("mlp", lambda: TinyMLP(d_in=64, hidden=64), (64,), dict(bits=4, granularity="per_group", group_size=32)),
    ]:
        torch.manual_seed(100 + rank)  # different weights per rank: DDP's broadcast at wrap time reconciles them
        model = build()
        callback = QuantizationAwareTraining(**kwargs)
        trainer = pl.Trainer(callbacks=[callback], **common)
        trainer.fit(model, RandomDataModule(shape, n=64))
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model.eval()(x)
        results[name] = {"record": callback.record, "out": out, "keys": sorted(model.state_dict())}
    torch.save(results, f"qat.rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
def test_ddp_two_cpu_processes(tmp_path):
    run_python(DDP_SCRIPT, tmp_path, timeout=900)
    r0 = torch.load(tmp_path / "qat.rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "qat.rank1.pt", weights_only=False)
    for name in ("cnn", "mlp"):
        assert r0[name]["record"] == r1[name]["record"]  # the same observed input ranges and converted layers
        torch.testing.assert_close(r0[name]["out"], r1[name]["out"], rtol=0, atol=0)
        assert r0[name]["keys"] == r1[name]["keys"]
    assert set(r0["cnn"]["record"]["converted"]["conv"]) == {"conv1", "conv2"} and r0["cnn"]["record"]["started_at"] == 2
    assert r0["mlp"]["record"]["converted"]["linear"] == ["fc1", "fc2"] and r0["mlp"]["record"]["converted"]["bits"] == 4
