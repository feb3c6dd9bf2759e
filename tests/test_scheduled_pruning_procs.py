"""ScheduledPruning across processes: a run killed mid-schedule and resumed, and DDP on 2 CPU processes."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_python

KILL_AND_RESUME = """
    import sys, torch, lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_accel import ScheduledPruning
    from lightning_accel.demos import ResidualCNN, DigitsDataModule
    from tests.helpers import KillAtStep
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)  # the same kernels in all three runs, and no thread contention on a shared machine
    pl.seed_everything(0)
    pruner = ScheduledPruning(amount=0.8, schedule="cubic", start=1, end=8, frequency=2, criterion="random",
                              scope="layer", regularization="l1", regularization_strength=1e-4, make_permanent=False, seed=5)
    ckpt = ModelCheckpoint(dirpath="ckpts", every_n_epochs=1, save_top_k=-1)
    cbs = [pruner, ckpt] + ([KillAtStep(6)] if mode == "kill" else [])
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=cbs)
    model = ResidualCNN(width=8, depth=1, optimizer="sgd", lr=0.05)
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path="ckpts/epoch=1-step=6.ckpt" if mode == "resume" else None)
    torch.save({"weights": model.state_dict(), "masks": pruner.masks, "sparsity": pruner.sparsity,
                "generator": pruner._generator.get_state(), "step": trainer.global_step}, out)
"""


def test_killed_mid_schedule_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    """Events at steps 1, 3, 5, 7, 8; the process dies at the start of step 7 (epoch 2), after the
    checkpoint of step 6; the resumed run must redo the random events 7 and 8 exactly."""
    run_python(KILL_AND_RESUME, tmp_path, "kill", "killed.pt", expect=17)
    assert (tmp_path / "ckpts" / "epoch=1-step=6.ckpt").exists() and not (tmp_path / "killed.pt").exists()
    saved = torch.load(tmp_path / "ckpts" / "epoch=1-step=6.ckpt", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("ScheduledPruning")]
    assert state["last_t"] == 5 and 0.3 < state["sparsity"] < 0.8  # mid-schedule
    run_python(KILL_AND_RESUME, tmp_path, "resume", "resumed.pt")
    run_python(KILL_AND_RESUME, tmp_path, "full", "full.pt")
    resumed, full = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt")
    assert resumed["step"] == full["step"] == 9
    assert resumed["sparsity"] == full["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert torch.equal(resumed["generator"], full["generator"])
    assert set(resumed["masks"]) == set(full["masks"]) and len(full["masks"]) == 6
    for k, keep in full["masks"].items():
        assert torch.equal(resumed["masks"][k], keep), k
        assert int((~keep).sum()) == round(0.8 * keep.numel())  # scope="layer": every weight exactly
    for k in full["weights"]:
        assert torch.equal(resumed["weights"][k], full["weights"][k]), k


DDP = """
    import os, sys, torch, lightning.pytorch as pl
    from lightning_accel import ScheduledPruning
    from tests.helpers import RandomDataModule, TinyConvNet
    pl.seed_everything(0)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    # a different generator seed on each rank: identical masks can only come from the broadcast of rank 0's
    pruner = ScheduledPruning(amount=0.75, schedule="cubic", frequency=2, criterion="random", seed=rank,
                              make_permanent=False, verbose=0)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=[pruner])
    model = TinyConvNet(width=16)
    trainer.fit(model, RandomDataModule(shape=(1, 8, 8), n=128, batch_size=16))
    torch.save({"weights": model.state_dict(), "masks": pruner.masks, "sparsity": pruner.sparsity,
                "world": trainer.world_size, "step": trainer.global_step}, f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
def test_ddp_masks_and_weights_are_identical_on_every_rank(tmp_path):
    run_python(DDP, tmp_path, timeout=300)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 8  # 128 samples / 2 ranks / 16 x 2 epochs
    assert set(r0["masks"]) == {"conv1.weight", "conv2.weight"}
    n = sum(m.numel() for m in r0["masks"].values())
    assert sum(int((~m).sum()) for m in r0["masks"].values()) == round(0.75 * n)
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
    params = [k for k in r0["weights"] if "running_" not in k and "num_batches" not in k]  # BN stats are per rank
    assert len(params) == 10
    for k in params:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    for k, keep in r0["masks"].items():
        assert torch.all(r0["weights"][k][~keep] == 0)
