"""AccelerationReport under DDP on 2 CPU processes: every rank measures sizes, rank zero times and writes the files."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_python

DDP_SCRIPT = """
    import sys, torch, lightning.pytorch as pl
    from lightning_accel import AccelerationReport, StructuredPruning
    from lightning_accel.demos import DigitsDataModule, DigitsTransformer
    out = sys.argv[1]
    pl.seed_everything(0)
    rep = AccelerationReport(batch_sizes=[1, 4], repeats=3, warmup=1, output_dir=out, console=False, throughput_skip=1)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, limit_train_batches=3,
                         limit_val_batches=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False,
                         callbacks=[rep, StructuredPruning(amount=0.5, start=0, end=1, interval="epoch", verbose=0)])
    model = DigitsTransformer(dim=16, depth=1, heads=4)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    torch.save({"results": rep.results, "json": rep.json_path, "world": trainer.world_size,
                "hooks": len(model._forward_pre_hooks)}, f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
def test_ddp_two_processes_rank_zero_writes(tmp_path):
    out = tmp_path / "reports"
    run_python(DDP_SCRIPT, tmp_path, str(out), timeout=300)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2 and r0["hooks"] == r1["hooks"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.png"]
    assert r0["json"] == out / "report.json" and r1["json"] is None
    assert json.loads((out / "report.json").read_text())["world_size"] == 2
    a, b = r0["results"], r1["results"]
    # the same pruned model on both ranks; latency timed on rank zero only
    assert a["final"]["params"] == b["final"]["params"] < a["baseline"]["params"] == b["baseline"]["params"]
    assert a["final"]["macs"] == b["final"]["macs"] and a["latency"]["eager"]["4"]["final_ms"] > 0
    assert b["latency"]["eager"] == {} and "latency is measured on rank zero only" in b["notes"]
    # throughput is the sum over ranks: per-device samples/s times the world size
    assert a["throughput"]["samples_per_s"] == pytest.approx(2 * a["throughput"]["samples_per_s_per_device"])
