"""The one lifecycle owner: pipeline order without touching the user's list, reverse teardown, conflicts from
capabilities, one replay path, and nothing left on the model after a Trainer call."""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_accel
from lightning_accel import (
    AccelCallback,
    CompositionError,
    EightBitOptimizer,
    MixedPrecision,
    Quantization,
    ScheduledPruning,
    StructuredPruning,
    TorchCompile,
)
from lightning_accel._lifecycle import STAGES, find_conflict
from tests.helpers import RandomDataModule, TinyMLP, tiny_trainer

LOG: list[tuple[str, str]] = []


class _Recorder(AccelCallback):
    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[{self.name}]"

    def accel_before_setup(self, trainer, pl_module, stage):
        LOG.append(("before_setup", self.name))

    def accel_setup(self, trainer, pl_module, stage):
        LOG.append(("setup", self.name))

    def accel_fit_start(self, trainer, pl_module):
        LOG.append(("fit_start", self.name))

    def accel_train_start(self, trainer, pl_module):
        LOG.append(("train_start", self.name))

    def accel_fit_end(self, trainer, pl_module):
        LOG.append(("fit_end", self.name))

    def accel_teardown(self, trainer, pl_module, stage):
        LOG.append(("teardown", self.name))


class _Prune(_Recorder):
    stage = "structure"


class _Quantize(_Recorder):
    stage = "quantization"


class _Compile(_Recorder):
    stage = "compile"


class _Other(Callback):
    def on_fit_end(self, trainer, pl_module):
        LOG.append(("fit_end", "other"))


def _events(hook: str) -> list[str]:
    return [n for h, n in LOG if h == hook and n != "other"]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_any_list_order_runs_in_pipeline_order_and_tears_down_in_reverse(tmp_path, order):
    LOG.clear()
    made = [_Prune("prune"), _Quantize("quantize"), _Compile("compile")]
    other = _Other()
    callbacks = [made[order[0]], other, made[order[1]], made[order[2]]]
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=callbacks)
    given = list(trainer.callbacks)
    trainer.fit(TinyMLP(), RandomDataModule())
    pipeline = ["prune", "quantize", "compile"]
    for hook in ("before_setup", "setup", "fit_start", "train_start", "fit_end"):
        assert _events(hook) == pipeline, hook
    assert _events("teardown") == pipeline[::-1]
    assert LOG.index(("setup", "prune")) > LOG.index(("before_setup", "compile"))  # every before_setup first
    assert trainer.callbacks == given and all(a is b for a, b in zip(trainer.callbacks, given))  # untouched


def test_hooks_the_pipeline_dispatches_cannot_be_overridden():
    with pytest.raises(TypeError, match="overrides `on_fit_start`.*implement `accel_fit_start` instead"):

        class _Bad(AccelCallback):
            def on_fit_start(self, trainer, pl_module):
                pass

    with pytest.raises(TypeError, match="stage must be one of"):

        class _Lost(AccelCallback):
            stage = "nowhere"

    with pytest.raises(TypeError, match="no static `replay"):

        class _NoReplay(AccelCallback):
            required_on_load = True


@pytest.mark.parametrize(
    ("a", "b", "why"),
    [
        (ScheduledPruning(), StructuredPruning(), "changes the weight shapes that unstructured masks are kept for"),
        (ScheduledPruning(), Quantization(when="setup"), "frozen 8/4-bit integers that cannot be pruned"),
        (StructuredPruning(), Quantization(when="setup"), "torch-pruning cannot shrink"),
        (StructuredPruning(), StructuredPruning(amount=0.3), "both remove channels"),
        (Quantization(), Quantization(mode="int8", when="fit_end"), "both replace layers by quantized ones"),
        (MixedPrecision(), MixedPrecision("fp32"), "both choose the training precision"),
        (EightBitOptimizer(), EightBitOptimizer(), "both replace the optimizers"),
        (TorchCompile(), TorchCompile(), "both compile the model"),
    ],
)
def test_conflicts_come_from_capabilities_and_name_both(tmp_path, a, b, why):
    assert why in (find_conflict(a, b) or "") and why in (find_conflict(b, a) or "")
    if type(a) is type(b):
        with pytest.raises(CompositionError, match=rf"callbacks\[0\] and callbacks\[1\] are both {type(a).__name__}"):
            tiny_trainer(tmp_path, max_epochs=1, callbacks=[b, a])  # refused by Trainer(): one checkpoint key
        return
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[b, a])
    names = (type(a).__name__, type(b).__name__)
    with pytest.raises(CompositionError, match=rf"({names[0]}|{names[1]}) cannot be combined with ({names[0]}|{names[1]}): .*{why}"):
        trainer.fit(TinyMLP(), RandomDataModule())


@pytest.mark.parametrize(
    "make",
    [
        lambda: StructuredPruning(amount=0.5),
        lambda: ScheduledPruning(amount=0.5),
        lambda: Quantization(mode="int8", when="fit_end"),
        lambda: MixedPrecision("bf16"),
        lambda: TorchCompile(backend="eager"),
        lambda: lightning_accel.AccelerationReport(),
    ],
)
def test_two_of_the_same_callback_are_a_composition_error_naming_both(tmp_path, make):
    """Lightning's generic "more than one stateful callback" RuntimeError came first; now Trainer() raises ours,
    naming the two callbacks (their places in `callbacks`) and what to do."""
    first, second = make(), make()
    name = type(first).__name__
    with pytest.raises(CompositionError) as err:
        tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[first, ModelCheckpoint(dirpath=tmp_path), second])
    message = str(err.value)
    assert f"callbacks[0] and callbacks[2] are both {name}" in message, message
    assert f"keep one {name}" in message and repr(first.state_key) in message, message


def test_a_single_callback_keeps_its_checkpoint_key(tmp_path):
    """The state keys a resumed fit looks its state up under are the ones earlier versions wrote."""
    assert StructuredPruning(amount=0.5).state_key == "StructuredPruning"
    assert TorchCompile().state_key == "TorchCompile"
    assert ScheduledPruning().state_key == "ScheduledPruning{'modules': None, 'exclude': None, 'prune_head': False}"
    # several ScheduledPruning differing in their layers still share a Trainer (their keys differ)
    a, b = ScheduledPruning(modules=["fc1"], amount=0.5), ScheduledPruning(modules=["fc2"], amount=0.5)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[a, b])
    trainer.fit(TinyMLP(), RandomDataModule())
    assert a.state_key != b.state_key and a.sparsity > 0 and b.sparsity > 0


def test_compatible_callbacks_have_no_conflict():
    assert find_conflict(ScheduledPruning(), Quantization(mode="int8", when="fit_end")) is None
    assert find_conflict(StructuredPruning(), Quantization(mode="int8", when="fit_end")) is None
    assert find_conflict(ScheduledPruning(modules=["fc1"]), ScheduledPruning(modules=["fc2"])) is None
    assert [cb.stage in STAGES for cb in (ScheduledPruning(), Quantization(), EightBitOptimizer(), MixedPrecision(), TorchCompile())]


# ---------------------------------------------------------------------- nothing left on the model
def _instance_state(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "attrs": set(model.__dict__),
        "forwards": [n for n, m in model.named_modules() if "forward" in m.__dict__],
        "compiled": [n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _lightning_adds(tmp_path) -> set[str]:
    """Attributes Lightning itself adds to a module's instance during a plain fit (e.g. ``_hparams``)."""
    model = TinyMLP()
    before = set(model.__dict__)
    tiny_trainer(tmp_path / "plain", max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(model, RandomDataModule())
    return set(model.__dict__) - before


def _assert_clean(model: torch.nn.Module, before: dict[str, Any], lightning_adds: set[str]) -> None:
    after = _instance_state(model)
    assert after["attrs"] - before["attrs"] - lightning_adds == set(), "the package left attributes on the model"
    assert after["forwards"] == [] and after["compiled"] == [] and after["hooks"] == before["hooks"]


def test_regression_no_closure_left_on_the_model_after_fit(tmp_path):
    """0.1.0 left a closure on ``model.on_load_checkpoint`` after ``fit`` with these two callbacks."""
    adds = _lightning_adds(tmp_path)
    model = TinyMLP()
    before = _instance_state(model)
    callbacks = [Quantization(mode="int8", when="fit_end", monitor=None), StructuredPruning(amount=0.5, start=1, end=1)]
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, RandomDataModule())
    assert "on_load_checkpoint" not in model.__dict__
    _assert_clean(model, before, adds)
    assert [type(cb) for cb in trainer.callbacks[:2]] == [Quantization, StructuredPruning]


class _Boom(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            raise RuntimeError("boom")


def test_nothing_is_left_on_the_model_when_fit_fails(tmp_path):
    adds = _lightning_adds(tmp_path)
    model = TinyMLP()
    before = _instance_state(model)
    callbacks = [_Boom(), TorchCompile(backend="eager"), MixedPrecision("bf16", fp32_modules=["head"]), StructuredPruning(amount=0.5, start=1, end=1)]
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=callbacks)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, RandomDataModule())
    _assert_clean(model, before, adds)


# ---------------------------------------------------------------------- every ordered pair of the callbacks
def _make(name: str) -> AccelCallback:
    return {
        "scheduled": lambda: ScheduledPruning(amount=0.5, end=6, frequency=2, verbose=0),
        "structured": lambda: StructuredPruning(amount=0.5, interval="step", start=2, end=6, verbose=0),
        "quantization": lambda: Quantization(mode="int8", when="fit_end", monitor=None),
        "eight_bit": lambda: EightBitOptimizer(min_size=256),
        "precision": lambda: MixedPrecision("bf16"),
        "compile": lambda: TorchCompile(backend="eager"),
    }[name]()


NAMES = ["scheduled", "structured", "quantization", "eight_bit", "precision", "compile"]
X = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X).float()


def _trainer(root, names, **kw) -> pl.Trainer:
    kw.setdefault("max_epochs", 2)
    return tiny_trainer(root, limit_val_batches=0, callbacks=[_make(n) for n in names] + kw.pop("extra", []), **kw)


def _assert_changed(model: TinyMLP, names: set[str]) -> None:
    """The run did what its callbacks promise (so the comparisons below compare changed models)."""
    from lightning_accel.quantization.torchao import int8_layers

    if "structured" in names:
        assert model.fc1.weight.shape[0] < 32
    if "scheduled" in names:
        w = model.fc2.weight
        assert (getattr(w, "qdata", w) == 0).float().mean() > 0.3  # still zero once int8
    if "quantization" in names:
        assert set(int8_layers(model)) == {"fc1", "fc2"}  # backend "auto": torchao int8 on this CPU


@pytest.mark.parametrize(("first", "second"), list(itertools.permutations(NAMES, 2)))
def test_every_ordered_pair_fits_resumes_tests_and_loads_the_same(tmp_path, first, second):
    if {first, second} == {"scheduled", "structured"}:
        with pytest.raises(CompositionError, match="cannot be combined with"):
            _trainer(tmp_path, [first, second]).fit(TinyMLP(), RandomDataModule(n=64))
        return
    adds = _lightning_adds(tmp_path)
    data = RandomDataModule(n=64)  # 4 steps an epoch
    # (a) uninterrupted, with a checkpoint after epoch 0
    pl.seed_everything(0)
    model = TinyMLP()
    before = _instance_state(model)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    a = _trainer(tmp_path / "a", [first, second], enable_checkpointing=True, extra=[every_epoch])
    given = list(a.callbacks)
    a.fit(model, data)
    a.save_checkpoint(tmp_path / "final.ckpt")
    expected = _out(model)
    _assert_changed(model, {first, second})
    _assert_clean(model, before, adds)
    assert a.callbacks == given
    # (b) a fresh model resumed from the epoch-0 checkpoint ends where (a) ended
    pl.seed_everything(0)
    resumed = TinyMLP()
    _trainer(tmp_path / "b", [first, second]).fit(resumed, data, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert torch.allclose(_out(resumed), expected, atol=1e-5)
    _assert_clean(resumed, before, adds)
    # (c) Trainer.test(ckpt_path=...) on a fresh model rebuilds what the run changed before the weights load
    tested = TinyMLP()
    _trainer(tmp_path / "c", [first, second]).test(tested, data, ckpt_path=tmp_path / "final.ckpt", verbose=False)
    assert torch.allclose(_out(tested), expected, atol=1e-5)
    _assert_clean(tested, before, adds)
    # (d) without a Trainer
    loaded = lightning_accel.load_checkpoint(TinyMLP, tmp_path / "final.ckpt")
    assert torch.allclose(_out(loaded), expected, atol=1e-5)
