"""The callbacks together: any list order gives the same pipeline, conflicts are named."""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import pytest
import torch

from lightning_accel import (
    CompositionError,
    MixedPrecision,
    Quantization,
    ScheduledPruning,
    StructuredPruning,
    TorchCompile,
)
from lightning_accel._lifecycle import AccelCallback, accel_callbacks, find_conflict
from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN
from tests.helpers import tiny_trainer


def _fit(tmp_path, model, callbacks, **kwargs):
    pl.seed_everything(0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=2, callbacks=callbacks, **kwargs)
    trainer.fit(model, DigitsDataModule(batch_size=32, drop_last=True))
    return trainer


def _pipeline():
    return [
        ScheduledPruning(amount=0.5, schedule="linear", interval="step", end=6, verbose=0),
        Quantization(mode="int8", when="fit_end", monitor=None),
        MixedPrecision(dtype="bf16"),
        TorchCompile(backend="eager"),
    ]


@pytest.mark.parametrize("perm", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)], ids=["canonical", "reversed", "shuffled"])
def test_prune_quantize_precision_compile_in_any_order(tmp_path, perm):
    cbs = _pipeline()
    model = DigitsTransformer(dim=32, depth=1, heads=2)
    trainer = _fit(tmp_path, model, [cbs[i] for i in perm])
    assert [type(cb).__name__ for cb in accel_callbacks(trainer)] == ["ScheduledPruning", "Quantization", "MixedPrecision", "TorchCompile"]
    assert [cb for cb in trainer.callbacks if isinstance(cb, AccelCallback)] == [cbs[i] for i in perm]  # untouched
    # pruned before quantized: half of the pruned layers' int8 weights are exact zeros
    q = model.blocks[0].mlp[0]
    assert type(q.weight).__name__ == "Int8Tensor", type(q.weight)  # backend "auto": torchao int8 on a CPU
    zeros = (q.weight.qdata == 0).float().mean().item()
    assert zeros >= 0.45, zeros
    assert not any(k.startswith("_orig_mod") or "._orig_mod." in k for k in model.state_dict())
    out = model(torch.rand(3, 1, 8, 8))
    assert out.shape == (3, 10) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("order", list(itertools.permutations(range(3)))[::2])
def test_structured_pruning_precision_compile_any_order(tmp_path, order):
    cbs = [
        StructuredPruning(amount=0.5, schedule="one_shot", interval="epoch", start=1, verbose=0),
        MixedPrecision(dtype="bf16"),
        TorchCompile(backend="eager"),
    ]
    model = ResidualCNN(width=8, depth=1)
    _fit(tmp_path, model, [cbs[i] for i in order])
    assert model.stem[0].out_channels == 4
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    "callbacks, match",
    [
        (lambda: [Quantization(when="setup"), ScheduledPruning()], "cannot be combined with"),
        (lambda: [StructuredPruning(), ScheduledPruning()], "StructuredPruning cannot be combined with ScheduledPruning|ScheduledPruning cannot be combined with StructuredPruning"),
        (lambda: [StructuredPruning(), Quantization(when="setup")], "cannot be combined with"),
    ],
    ids=["quantize-setup+prune", "structured+scheduled", "structured+quantize-setup"],
)
def test_conflicts_are_named_before_anything_changes(tmp_path, callbacks, match):
    model = ResidualCNN(width=8, depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompositionError, match=match):
        _fit(tmp_path, model, callbacks())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("make", [lambda: TorchCompile(backend="eager"), lambda: MixedPrecision()], ids=["compile", "precision"])
def test_duplicates_are_refused(tmp_path, make):
    """Lightning refuses two stateful callbacks with one state key before setup; ours would name the pair too."""
    a, b = make(), make()
    assert find_conflict(a, b)
    with pytest.raises((CompositionError, RuntimeError), match=type(a).__name__):
        _fit(tmp_path, ResidualCNN(width=8, depth=1), [a, b])
