"""Every lightning-accel callback in one Trainer: structure, teacher, QAT, 8-bit optimizer, precision, compile and
the report, in any list order; a run killed mid-fit and resumed from its checkpoint ends where an uninterrupted run
ends; the combinations that cannot work are named before training."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

import lightning_accel
from lightning_accel import (
    AccelerationReport,
    CompositionError,
    EightBitOptimizer,
    KnowledgeDistillation,
    MixedPrecision,
    Quantization,
    QuantizationAwareTraining,
    ScheduledPruning,
    StructuredPruning,
    TorchCompile,
)
from lightning_accel._lifecycle import AccelCallback, accel_callbacks
from lightning_accel.demos import DigitsDataModule, DigitsTransformer
from tests.helpers import run_python, tiny_trainer
from tests.helpers.teacher import teacher_checkpoint

PIPELINE = [
    "KnowledgeDistillation",
    "StructuredPruning",
    "QuantizationAwareTraining",
    "EightBitOptimizer",
    "MixedPrecision",
    "TorchCompile",
    "AccelerationReport",
]


def _callbacks(teacher: str) -> list[AccelCallback]:
    return [
        KnowledgeDistillation(teacher=teacher, init_student_from_teacher=True, verbose=0),
        StructuredPruning(amount=0.5, schedule="linear", interval="step", start=1, end=4, verbose=0),
        QuantizationAwareTraining(bits=8, start=5),
        EightBitOptimizer(min_size=256),
        MixedPrecision(dtype="bf16"),
        TorchCompile(backend="eager"),
        AccelerationReport(batch_sizes=[1, 4], repeats=2, warmup=1, figure=False, console=False),
    ]


def _model() -> DigitsTransformer:
    return DigitsTransformer(dim=32, depth=1, heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    torch.manual_seed(1)
    return str(teacher_checkpoint(_model(), tmp_path_factory.mktemp("teacher") / "teacher.ckpt"))


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4, 5, 6), (6, 5, 4, 3, 2, 1, 0), (3, 6, 0, 5, 2, 4, 1)],
                         ids=["pipeline", "reversed", "shuffled"])
def test_every_callback_together_in_any_order(tmp_path, teacher, order):
    cbs = _callbacks(teacher)
    listed = [cbs[i] for i in order]
    pl.seed_everything(0)
    model = _model()
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=2, callbacks=listed)
    trainer.fit(model, DigitsDataModule(batch_size=32, drop_last=True))
    assert [type(cb).__name__ for cb in accel_callbacks(trainer)] == PIPELINE
    assert [cb for cb in trainer.callbacks if isinstance(cb, AccelCallback)] == listed  # the user's list, untouched
    # pruned, then the pruned layers trained fake-quantized and converted to int8
    assert model.blocks[0].mlp[0].out_features == 32  # 64 hidden units, half removed
    assert type(model.blocks[0].mlp[0].weight).__name__ == "Int8Tensor"
    qat = cbs[2]
    assert qat.record["converted"] and qat.record["started_at"] == 5
    # the report saw the float baseline before any change and the compressed model at the end
    res = cbs[6].results
    assert res["final"]["params"] < 0.6 * res["baseline"]["params"]
    assert res["final"]["stored_bytes"] < 0.3 * res["baseline"]["stored_bytes"]
    assert [h["phase"] for h in res["metric"]["history"]].count("fit") == 2
    assert json.loads(cbs[6].json_path.read_text())["final"]["params"] == res["final"]["params"]
    # nothing of the pipeline is left on the model; it runs as a plain module
    assert "training_step" not in model.__dict__ and "on_load_checkpoint" not in model.__dict__
    assert getattr(model, "_compiled_call_impl", None) is None
    assert not any("_orig_mod" in k for k in model.state_dict())
    with torch.no_grad():
        assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


_SCRIPT = """
import sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.test_full_pipeline import _callbacks, _model
from tests.helpers import KillAtStep, RandomDataModule, tiny_trainer

root, teacher, kill, ckpt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
pl.seed_everything(0)
model = _model()
cbs = _callbacks(teacher)[::-1]  # listed in reverse: the pipeline orders them
extra = [ModelCheckpoint(dirpath=root + "/ckpts", every_n_epochs=1, save_top_k=-1)]
if kill >= 0:
    extra.append(KillAtStep(kill))
trainer = tiny_trainer(root, max_epochs=3, limit_train_batches=4, limit_val_batches=2, callbacks=cbs + extra,
                       enable_checkpointing=True)
data = RandomDataModule(shape=(1, 8, 8), n=128, classes=10, batch_size=32)  # the order depends on the epoch alone
trainer.fit(model, data, ckpt_path=ckpt if ckpt != "-" else None)
torch.save({"state": model.state_dict(), "step": trainer.global_step,
            "report": cbs[0].results, "qat": cbs[4].record}, root + "/final.pt")
"""


def test_killed_and_resumed_pipeline_ends_where_the_uninterrupted_one_ends(tmp_path, teacher):
    """A real interruption: the process dies at step 6 (pruned, fake-quantized since step 5); the run resumed from the
    epoch-0 checkpoint (step 4) into a freshly built, unpruned model ends with the weights, QAT record and report
    baseline of the uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_python(_SCRIPT, tmp_path, str(full), teacher, "-1", "-", name="pipeline.py")
    run_python(_SCRIPT, tmp_path, str(cut), teacher, "6", "-", name="pipeline.py", expect=17)
    assert not (cut / "final.pt").exists()
    run_python(_SCRIPT, tmp_path, str(cut), teacher, "-1", str(cut / "ckpts" / "epoch=0-step=4.ckpt"), name="pipeline.py")
    a, b = torch.load(full / "final.pt", weights_only=False), torch.load(cut / "final.pt", weights_only=False)
    assert a["step"] == b["step"] == 12
    assert a["qat"] == b["qat"] and a["qat"]["converted"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        x, y = a["state"][k], b["state"][k]
        if hasattr(x, "dequantize") and type(x) is not torch.Tensor:
            x, y = x.dequantize(), y.dequantize()
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
    assert a["report"]["baseline"]["params"] == b["report"]["baseline"]["params"]  # the baseline of the first run
    assert a["report"]["final"]["params"] == b["report"]["final"]["params"]
    # the final checkpoint holds the converted model; load_checkpoint rebuilds it from the class
    last = sorted((full / "ckpts").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    loaded = lightning_accel.load_checkpoint(DigitsTransformer, str(last))
    assert loaded.blocks[0].mlp[0].out_features == 32


@pytest.mark.parametrize(
    "make, names",
    [
        (lambda: [QuantizationAwareTraining(), Quantization(mode="int8", when="fit_end")],
         ("QuantizationAwareTraining", "Quantization")),
        (lambda: [Quantization(mode="nf4", when="setup"), StructuredPruning()], ("Quantization", "StructuredPruning")),
        (lambda: [ScheduledPruning(), Quantization(mode="nf4", when="setup")], ("ScheduledPruning", "Quantization")),
        (lambda: [MixedPrecision(dtype="bf16")], ("MixedPrecision", "Trainer(precision='bf16-mixed')")),
        (lambda: [ScheduledPruning(), StructuredPruning()], ("ScheduledPruning", "StructuredPruning")),
    ],
    ids=["qat+ptq", "nf4-setup+structured", "scheduled+nf4-setup", "two-precision-owners", "two-prunings"],
)
def test_impossible_combinations_are_named_before_training(tmp_path, make, names):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cbs = [*make(), AccelerationReport(latency=False, figure=False, console=False)]
    precision = "bf16-mixed" if "Trainer(precision" in names[1] else "32-true"
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=cbs, precision=precision)
    with pytest.raises(CompositionError) as err:
        trainer.fit(model, DigitsDataModule(batch_size=32, drop_last=True))
    assert all(n in str(err.value) for n in names), str(err.value)
    assert trainer.global_step == 0
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
