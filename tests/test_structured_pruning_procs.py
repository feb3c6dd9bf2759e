"""StructuredPruning across process boundaries: a run killed mid-schedule and resumed ends where an
uninterrupted run ends, and DDP on 2 CPU processes removes the same channels on every rank."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_python

KILL_SCRIPT = """
    import sys, torch, lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_accel.demos import DigitsTransformer, DigitsDataModule
    from lightning_accel.pruning.callbacks import StructuredPruning
    from tests.helpers import KillAtStep
    mode, out = sys.argv[1], sys.argv[2]
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath="ckpts", every_n_epochs=1, save_top_k=-1)
    # events at t=0 (0%), t=2 (25%, end of epoch 1), t=4 (50%, end of epoch 3); taylor sums gradients between events
    prune = StructuredPruning(amount=0.5, start=0, end=4, frequency=2, importance="taylor", verbose=0)
    cbs = [prune, ckpt] + ([KillAtStep(9)] if mode == "kill" else [])
    trainer = pl.Trainer(max_epochs=5, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", devices=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         callbacks=cbs)
    model = DigitsTransformer(dim=16, depth=1, heads=4)   # always built unpruned
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path="ckpts/epoch=2-step=9.ckpt" if mode == "resume" else None)
    torch.save({"model": model.state_dict(), "heads": model.blocks[0].attn.num_heads, "history": prune.history,
                "optimizer": trainer.optimizers[0].state_dict(), "step": trainer.global_step}, out)
"""


def test_killed_mid_schedule_and_resumed_matches_uninterrupted(tmp_path):
    """Killed at the start of epoch 3: one pruning event behind it (replayed into a fresh model on resume),
    one ahead, and a window of summed gradients for taylor importance in the checkpoint."""
    run_python(KILL_SCRIPT, tmp_path, "kill", "killed.pt", expect=17)
    assert (tmp_path / "ckpts" / "epoch=2-step=9.ckpt").exists() and not (tmp_path / "killed.pt").exists()
    state = torch.load(tmp_path / "ckpts" / "epoch=2-step=9.ckpt", weights_only=False)["callbacks"]["StructuredPruning"]
    assert [h["t"] for h in state["history"]] == [2] and state["grad_steps"] == 3
    run_python(KILL_SCRIPT, tmp_path, "resume", "resumed.pt")
    run_python(KILL_SCRIPT, tmp_path, "full", "full.pt")
    resumed, full = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt")
    assert resumed["step"] == full["step"] == 15
    assert resumed["heads"] == full["heads"] == 2
    assert [h["t"] for h in full["history"]] == [2, 4] and resumed["history"] == full["history"]
    assert full["model"]["embed.weight"].shape == (8, 16)
    for k, v in full["model"].items():
        assert resumed["model"][k].shape == v.shape and torch.equal(resumed["model"][k], v), k
    for i, s in full["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(resumed["optimizer"]["state"][i][k], v), (i, k)


DDP_SCRIPT = """
    import sys, torch, lightning.pytorch as pl
    from torch.nn.parallel import DistributedDataParallel
    from lightning_accel.demos import DigitsTransformer, DigitsDataModule
    from lightning_accel.pruning.callbacks import StructuredPruning

    class Check(pl.Callback):
        # after every step: the DDP wrapper wraps the pruned module and reduces exactly its parameters
        ok = True
        def on_train_batch_end(self, trainer, pl_module, *args):
            m = trainer.strategy.model
            self.ok &= isinstance(m, DistributedDataParallel) and m.module is pl_module and (
                [id(p) for p in m.parameters()] == [id(p) for p in pl_module.parameters()])

    pl.seed_everything(0)
    check = Check()
    prune = StructuredPruning(amount=0.5, start=0, end=2, verbose=0)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, limit_train_batches=3,
                         limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[prune, check])
    model = DigitsTransformer(dim=16, depth=1, heads=4)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    torch.save({"model": model.state_dict(), "heads": model.blocks[0].attn.num_heads, "history": prune.history,
                "ok": check.ok, "world": trainer.world_size}, f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
def test_ddp_ranks_remove_the_same_channels_and_stay_in_sync(tmp_path):
    run_python(DDP_SCRIPT, tmp_path, timeout=600)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == r1["world"] == 2 and r0["ok"] and r1["ok"]
    assert r0["history"] == r1["history"] and [h["t"] for h in r0["history"]] == [1, 2]
    assert r0["heads"] == r1["heads"] == 2
    # ranks saw different batches: equal weights prove the rebuilt wrapper all-reduced the new parameters
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    assert r0["model"]["blocks.0.mlp.0.weight"].shape == (16, 8)
