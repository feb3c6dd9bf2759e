"""The accuracy guard killed mid-pause and resumed, and SensitivityAnalysis with the guard under DDP (2 CPU ranks)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_python

KILL_AND_RESUME = """
    import sys, torch, lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_accel import ScheduledPruning
    from tests.helpers import KillAtStep, RandomDataModule
    from tests.helpers.scripted import ScriptedMLP
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    pruner = ScheduledPruning(amount=0.8, schedule="linear", interval="epoch", start=0, end=4, monitor="val_score",
                              max_metric_drop=0.1, make_permanent=False, verbose=0)
    ckpt = ModelCheckpoint(dirpath="ckpts", every_n_epochs=1, save_top_k=-1)
    cbs = [pruner, ckpt] + ([KillAtStep(9)] if mode == "kill" else [])
    trainer = pl.Trainer(max_epochs=5, limit_train_batches=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, callbacks=cbs)
    model = ScriptedMLP([1.0, 0.5, 0.5, 1.0, 1.0])
    trainer.fit(model, RandomDataModule(), ckpt_path="ckpts/epoch=2-step=9.ckpt" if mode == "resume" else None)
    torch.save({"weights": model.state_dict(), "masks": pruner.masks, "sparsity": pruner.sparsity,
                "guard": pruner.guard, "step": trainer.global_step}, out)
"""


def test_guard_killed_while_paused_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    """Reference 1.0 at epoch 0; 0.5 at epochs 1 and 2 pauses the schedule (events 2 and 3 skipped); the process
    dies at the start of epoch 3, after the checkpoint of epoch 2; 1.0 at epoch 3 resumes it (event 4: 80%)."""
    run_python(KILL_AND_RESUME, tmp_path, "kill", "killed.pt", expect=17)
    saved = torch.load(tmp_path / "ckpts" / "epoch=2-step=9.ckpt", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("ScheduledPruning")]
    assert state["guard"]["paused"] is True and state["guard"]["events_skipped"] == 2 and state["guard"]["reference"] == 1.0
    assert state["sparsity"] == pytest.approx(0.2, abs=2e-3)
    run_python(KILL_AND_RESUME, tmp_path, "resume", "resumed.pt")
    run_python(KILL_AND_RESUME, tmp_path, "full", "full.pt")
    resumed, full = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt")
    assert resumed["step"] == full["step"] == 15
    assert resumed["guard"] == full["guard"] and full["guard"]["paused"] is False and full["guard"]["pauses"] == 1
    assert resumed["sparsity"] == full["sparsity"] == pytest.approx(0.8, abs=2e-3)
    for k in full["masks"]:
        assert torch.equal(resumed["masks"][k], full["masks"][k]), k
    for k in full["weights"]:
        assert torch.equal(resumed["weights"][k], full["weights"][k]), k


DDP = """
    import os, torch, lightning.pytorch as pl
    from lightning_accel import ScheduledPruning, SensitivityAnalysis
    from tests.helpers import RandomDataModule, TinyMLP
    pl.seed_everything(0)
    analysis = SensitivityAnalysis(amounts=[0.5, 0.9], folds=2, when="fit_end", max_metric_drop=0.05, console=False)
    pruner = ScheduledPruning(amount=0.5, interval="epoch", monitor="val_acc", max_metric_drop=0.0, verbose=0)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, logger=False, default_root_dir=".",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True, callbacks=[pruner, analysis])
    trainer.fit(TinyMLP(), RandomDataModule(n=128, batch_size=16))
    torch.save({"results": analysis.results, "figure": analysis.figure_path, "guard": pruner.guard,
                "sparsity": pruner.sparsity, "world": trainer.world_size}, f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
def test_ddp_results_are_identical_on_every_rank_and_rank_zero_writes(tmp_path):
    run_python(DDP, tmp_path, timeout=300)
    r0, r1 = torch.load(tmp_path / "rank0.pt", weights_only=False), torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    assert r0["results"] == r1["results"] and r0["results"]["batches"] == 8  # both ranks' 4 batches, gathered
    assert r0["guard"] == r1["guard"] and r0["sparsity"] == r1["sparsity"]
    assert r0["figure"] is not None and r1["figure"] is None  # rank 0 draws and writes
    saved = json.loads((tmp_path / "sensitivity.json").read_text())
    assert saved["layers"].keys() == r0["results"]["layers"].keys() == {"fc1", "fc2"}
