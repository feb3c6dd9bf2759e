"""KnowledgeDistillation under DDP on 2 CPU processes (gloo): every rank distills from rank zero's teacher, and
the feature projections, fitted on each rank's own batch, stay identical across ranks."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_python

DDP_SCRIPT = """
    import os, torch, lightning.pytorch as pl
    from lightning_accel import KnowledgeDistillation, StructuredPruning
    from lightning_accel.distillation import fingerprint
    from tests.helpers import RandomDataModule, TinyConvNet

    class Check(pl.Callback):
        fingerprints = []
        def on_train_batch_end(self, trainer, pl_module, *args):
            self.fingerprints.append(fingerprint(kd.teacher_model))

    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.manual_seed(rank)  # the ranks build different models: DDP syncs the student, the callback the teacher
    model = TinyConvNet(width=8)
    own = fingerprint(model)
    pl.seed_everything(0)
    kd = KnowledgeDistillation(features={"bn1": "bn1"}, verbose=0)
    prune = StructuredPruning(amount=0.5, schedule="one_shot", start=1, verbose=0)
    check = Check()
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, limit_train_batches=3,
                         limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[kd, prune, check])
    trainer.fit(model, RandomDataModule(shape=(1, 8, 8)))
    proj = kd.projections["bn1"]
    torch.save({"model": model.state_dict(), "own": own, "teacher": check.fingerprints, "world": trainer.world_size,
                "proj": {k: v.detach().clone() for k, v in proj.state_dict().items()}, "width": model.conv1.out_channels,
                "wrapped": "training_step" in model.__dict__}, f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
def test_ddp_ranks_distill_from_rank_zeros_teacher_and_keep_projections_in_sync(tmp_path):
    run_python(DDP_SCRIPT, tmp_path, timeout=600)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == r1["world"] == 2 and r0["own"] != r1["own"]
    assert len(r0["teacher"]) == 6 and set(r0["teacher"]) == set(r1["teacher"]) == {r0["own"]}  # rank zero's model
    assert r0["width"] == r1["width"] == 4 and not r0["wrapped"] and not r1["wrapped"]
    for k, v in r0["model"].items():  # ranks saw different batches: equal weights, DDP all-reduced the student
        if "running_" not in k and "num_batches" not in k:  # BatchNorm statistics are each rank's own (no SyncBN)
            assert torch.equal(v, r1["model"][k]), k
    for k, v in r0["proj"].items():  # fitted on rank zero's batch, then gradients averaged across ranks
        assert torch.equal(v, r1["proj"][k]), k
