"""One replay path for checkpoints of changed models: the manifest, the 0.1.0 format, the deprecated registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_accel
from lightning_accel import (
    AccelCallback,
    Quantization,
    QuantizationAwareTraining,
    StructuredPruning,
    load_checkpoint,
    replay_checkpoint,
)
from lightning_accel._vocabulary import public_name, resolve_callback
from lightning_accel.checkpoint import _REGISTERED, register_replay, write_manifest
from lightning_accel.demos import ResidualCNN
from tests.helpers import TinyConvNet, TinyMLP
from tests.helpers.tiny import RandomDataModule, tiny_trainer

DATA = Path(__file__).parent / "data"
CALLS: list[tuple[str, object]] = []


class _Widen(AccelCallback):
    """Replaces the head (a 'structure' change) from its own state."""

    stage = "structure"
    required_on_load = True

    @staticmethod
    def replay(model, state):
        CALLS.append(("widen", state["n"]))
        model.head = nn.Linear(model.head.in_features, state["n"])


class _Mark(AccelCallback):
    stage = "teacher"
    required_on_load = True

    @staticmethod
    def replay(model, state):
        CALLS.append(("mark", state["x"]))


class _Measure(AccelCallback):  # not required on load: never replayed
    stage = "measurement"

    @staticmethod
    def replay(model, state):
        raise AssertionError("replayed a callback that is not required on load")


def test_manifest_replays_in_pipeline_order_before_weights_load(tmp_path):
    CALLS.clear()
    src = ResidualCNN(width=4, depth=1)
    src.head = nn.Linear(8, 3)
    cbs = [_Widen(), _Measure(), _Mark()]
    ckpt = {
        "state_dict": src.state_dict(),
        "hyper_parameters": {"width": 4, "depth": 1},
        "callbacks": {cb.state_key: {"n": 3, "x": 1} for cb in cbs},
    }
    write_manifest(ckpt, cbs)
    assert ckpt["lightning_accel"]["callbacks"]["_Widen"] == {"name": "tests.test_checkpoint._Widen", "stage": "structure"}
    torch.save(ckpt, tmp_path / "c.ckpt")
    model = load_checkpoint(ResidualCNN, tmp_path / "c.ckpt")
    assert CALLS == [("mark", 1), ("widen", 3)]  # teacher before structure, whatever the checkpoint's order
    assert model.head.out_features == 3 and not model.training
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(model(x), src.eval()(x))


def test_a_manifest_naming_a_missing_class_fails_clearly():
    ckpt = {"callbacks": {"Gone": {}}, "lightning_accel": {"version": 1, "callbacks": {"Gone": {"class_path": "nowhere.Gone", "stage": "structure"}}}}
    with pytest.raises(ValueError, match="'nowhere.Gone' that cannot be found"):
        replay_checkpoint(nn.Linear(2, 2), ckpt)


def test_load_checkpoint_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        load_checkpoint(object(), {"state_dict": {}})


def test_register_replay_is_deprecated_but_still_replays():
    seen = []
    with pytest.warns(DeprecationWarning, match="register_replay is deprecated"):
        register_replay("_Legacy", 10, lambda model, state: seen.append(state))
    try:
        assert replay_checkpoint(nn.Linear(2, 2), {"callbacks": {"_Legacy{'a': 1}": {"a": 1}}}) == ["_Legacy{'a': 1}"]
        assert seen == [{"a": 1}]
    finally:
        _REGISTERED.pop("_Legacy")


@pytest.mark.parametrize(
    ("name", "model_cls"),
    [("structured_int8", TinyMLP), ("nf4_adapters", TinyMLP), ("scheduled", TinyConvNet)],
)
def test_checkpoints_written_by_0_1_0_still_load(name, model_cls):
    """tests/data/v0_1_0_*.ckpt were written by lightning-accel 0.1.0 (tests/data/make_v0_1_0.py), without a
    manifest; their pruned shapes, int8/nf4 layers and adapters are rebuilt from the states 0.1.0 wrote."""
    ckpt = torch.load(DATA / f"v0_1_0_{name}.ckpt", weights_only=False)
    assert "lightning_accel" not in ckpt
    expected = ckpt.pop("_expected")
    model = lightning_accel.load_checkpoint(model_cls, ckpt)
    with torch.no_grad():
        out = model(expected["input"])
    # bitsandbytes' CPU 4-bit matmul is not the same kernel on every CPU (the file was written on an AVX-512 machine;
    # on an AVX2 one the outputs differ by 5.5e-3 of 0.48): nf4 gets a kernel tolerance, far below what a wrong
    # absmax or a re-quantized fresh weight gives
    assert torch.allclose(out, expected["output"], atol=2e-2 if name == "nf4_adapters" else 1e-5)


# ---------------------------------------------------------------------- names that outlive files
MAIN_2026_12 = [
    ("structured", TinyMLP, lambda: [StructuredPruning(amount=0.5, start=1, end=1)]),
    ("int8_ptq", TinyMLP, lambda: [Quantization(mode="int8", when="fit_end", backend="torchao", monitor=None)]),
    ("int8_conv", TinyConvNet, lambda: [Quantization(mode="int8", when="fit_end", backend="torchao", monitor=None)]),
    ("nf4_adapters", TinyMLP, lambda: [Quantization(mode="nf4", adapter_rank=4, compute_dtype="fp32")]),
    ("qat", TinyMLP, lambda: [QuantizationAwareTraining(bits=8, activations=True, convert="none")]),
]


@pytest.mark.parametrize(("name", "model_cls", "callbacks"), MAIN_2026_12, ids=[c[0] for c in MAIN_2026_12])
def test_checkpoints_written_before_the_files_moved_still_load(name, model_cls, callbacks, tmp_path):
    """tests/data/main_2026_12_*.ckpt were written by main of 2026-12-07 (tests/data/make_main_2026_12.py), whose
    manifests record module paths such as ``lightning_accel.pruning.callbacks.StructuredPruning``; the alias table
    maps them to today's public names, through ``load_checkpoint`` and ``Trainer.test(ckpt_path=...)`` alike."""
    ckpt = torch.load(DATA / f"main_2026_12_{name}.ckpt", weights_only=False)
    assert ckpt["lightning_accel"]["version"] == 1
    assert all("class_path" in e for e in ckpt["lightning_accel"]["callbacks"].values())
    expected = ckpt.pop("_expected")
    model = lightning_accel.load_checkpoint(model_cls, ckpt)
    with torch.no_grad():
        out = model(expected["input"])
    tol = 2e-2 if name == "nf4_adapters" else 1e-5  # bitsandbytes' CPU 4-bit kernel differs between ISAs
    assert torch.allclose(out, expected["output"], atol=tol)

    torch.save(ckpt, tmp_path / "c.ckpt")
    fresh = model_cls()
    data = RandomDataModule(shape=(1, 8, 8)) if model_cls is TinyConvNet else RandomDataModule()
    tiny_trainer(tmp_path, callbacks=callbacks()).test(fresh, data, ckpt_path=tmp_path / "c.ckpt", verbose=False)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(expected["input"]), expected["output"], atol=tol)


def test_manifest_records_public_names_not_module_paths(tmp_path):
    cbs = [StructuredPruning(amount=0.5), Quantization(mode="int8", when="fit_end", monitor=None)]
    ckpt: dict = {}
    write_manifest(ckpt, cbs)
    assert [e["name"] for e in ckpt["lightning_accel"]["callbacks"].values()] == [
        "lightning_accel.StructuredPruning",
        "lightning_accel.Quantization",
    ]
    assert resolve_callback("lightning_accel.StructuredPruning") is StructuredPruning
    assert resolve_callback("lightning_accel.pruning.callbacks.StructuredPruning") is StructuredPruning  # an alias


def test_a_user_subclass_declares_the_name_its_checkpoints_keep():
    class _Moved(AccelCallback):
        accel_name = "myproject.MovedPruning"
        stage = "structure"

    assert public_name(_Moved) == "myproject.MovedPruning"
    assert resolve_callback("myproject.MovedPruning") is _Moved
    with pytest.raises(TypeError, match="'myproject.MovedPruning'.*distinct `accel_name`"):

        class _Other(AccelCallback):
            accel_name = "myproject.MovedPruning"


@pytest.mark.parametrize("name", ["structured", "int8_conv", "qat"])
def test_an_evaluation_only_trainer_replays_with_replay_checkpoint(name, tmp_path):
    """A plain Trainer cannot load a compressed checkpoint (no lightning-accel code runs: torch's key/shape error);
    the one-line ReplayCheckpoint callback makes validate/test replay it."""
    model_cls = TinyConvNet if name == "int8_conv" else TinyMLP
    data = RandomDataModule(shape=(1, 8, 8)) if model_cls is TinyConvNet else RandomDataModule()
    ckpt = torch.load(DATA / f"main_2026_12_{name}.ckpt", weights_only=False)
    expected = ckpt.pop("_expected")
    torch.save(ckpt, tmp_path / "c.ckpt")
    with pytest.raises(RuntimeError, match="size mismatch|Unexpected key|Missing key"):
        tiny_trainer(tmp_path).validate(model_cls(), data, ckpt_path=tmp_path / "c.ckpt", verbose=False)
    fresh = model_cls()
    tiny_trainer(tmp_path, callbacks=[lightning_accel.ReplayCheckpoint()]).validate(
        fresh, data, ckpt_path=tmp_path / "c.ckpt", verbose=False
    )
    with torch.no_grad():
        out = fresh.eval()(expected["input"])
    assert torch.allclose(out, expected["output"], atol=1e-5)
    assert "on_load_checkpoint" not in fresh.__dict__  # the stand-in is gone after the call
