"""AutoCompress killed mid-fit and resumed (ends where an uninterrupted run ends, without measuring again), and under
DDP (2 CPU ranks: one plan, identical models)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_python

CLOCK = """
    class FakeClock:
        def __init__(self):
            self.calls = 0
        def __call__(self, label, fn, inputs):
            self.calls += 1
            return {"eager": 20.0, "float": 10.0, "small": 4.0, "small_int8": 2.0}[label] / 1e3
"""

KILL_AND_RESUME = CLOCK + """
    import sys, torch, lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_accel import AutoCompress
    from tests.helpers import KillAtStep, RandomDataModule, TinyConvNet
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    auto = AutoCompress(goal={"speedup": 5.0}, batch_size=8, techniques=["distillation", "pruning", "int8"],
                        export_format="onnx", amounts=[0.25, 0.5, 0.75], repeats=3, measure_batches=4,
                        output_dir="out_" + mode)
    auto.timer = clock = FakeClock()
    ckpt = ModelCheckpoint(dirpath="ckpts", every_n_epochs=1, save_top_k=-1)
    cbs = [auto, ckpt] + ([KillAtStep(9)] if mode == "kill" else [])
    trainer = pl.Trainer(max_epochs=6, limit_train_batches=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, callbacks=cbs)
    model = TinyConvNet(width=16)
    trainer.fit(model, RandomDataModule(shape=(1, 8, 8), n=96),
                ckpt_path="ckpts/epoch=2-step=9.ckpt" if mode == "resume" else None)
    pruning = auto.children["pruning"]
    torch.save({"weights": model.state_dict(), "plan": auto.plan.to_dict(), "calls": clock.calls,
                "history": pruning.history, "int8": auto.children["int8"].record["applied"],
                "met": auto.results["met"], "step": trainer.global_step}, out)
"""


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_killed_mid_schedule_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    run_python(KILL_AND_RESUME, tmp_path, "kill", "killed.pt", expect=17)
    saved = torch.load(tmp_path / "ckpts" / "epoch=2-step=9.ckpt", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("AutoCompress")]
    assert state["plan"] is not None and any(a > 0 for a in state["plan"]["amounts"].values())
    assert any(k.startswith("StructuredPruning") for k in saved["callbacks"])  # the callbacks it runs are checkpointed
    run_python(KILL_AND_RESUME, tmp_path, "resume", "resumed.pt")
    run_python(KILL_AND_RESUME, tmp_path, "full", "full.pt")
    resumed, full = torch.load(tmp_path / "resumed.pt", weights_only=False), torch.load(tmp_path / "full.pt", weights_only=False)
    assert full["calls"] > 0 and resumed["calls"] == 0  # the resumed run took the checkpoint's plan, timed nothing
    assert resumed["plan"].pop("measured_seconds") > 0  # the killed run's measuring time, carried by the checkpoint
    full["plan"].pop("measured_seconds")
    assert resumed["plan"] == full["plan"] and resumed["step"] == full["step"] == 18
    assert resumed["history"] == full["history"] and resumed["int8"] and full["int8"]
    assert resumed["weights"].keys() == full["weights"].keys()
    for k in full["weights"]:
        assert torch.equal(resumed["weights"][k], full["weights"][k]), k


DDP = CLOCK + """
    import torch, lightning.pytorch as pl
    from lightning_accel import AutoCompress
    from tests.helpers import RandomDataModule, TinyConvNet
    pl.seed_everything(0)
    auto = AutoCompress(goal={"speedup": 5.0}, batch_size=8, techniques=["pruning"], export_format="onnx",
                        amounts=[0.25, 0.5, 0.75], repeats=3, measure_batches=2, output_dir=".")
    auto.timer = FakeClock()
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=4, logger=False, default_root_dir=".",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True, callbacks=[auto])
    model = TinyConvNet(width=16)
    trainer.fit(model, RandomDataModule(shape=(1, 8, 8), n=128, batch_size=16))
    torch.save({"plan": auto.plan.to_dict(), "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
                "weights": model.state_dict(), "world": trainer.world_size}, f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_runs_one_plan_on_every_rank_and_rank_zero_writes(tmp_path):
    run_python(DDP, tmp_path, timeout=400)
    r0, r1 = torch.load(tmp_path / "rank0.pt", weights_only=False), torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    assert r0["plan"] == r1["plan"] and any(a > 0 for a in r0["plan"]["amounts"].values())
    assert r0["shapes"] == r1["shapes"]
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    saved = json.loads((tmp_path / "autocompress_plan.json").read_text())
    assert saved["amounts"] == r0["plan"]["amounts"]
