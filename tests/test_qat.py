"""QuantizationAwareTraining: fake-quantized Linear / Conv layers (torchao), converted to real int8 / int4 layers."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning_accel
from lightning_accel import (
    CompositionError,
    MixedPrecision,
    Quantization,
    QuantizationAwareTraining,
    ScheduledPruning,
)
from lightning_accel._select import NoMatchError
from lightning_accel.qat.core import (
    QATWarning,
    convert_qat_,
    converted_layers,
    fake_quantized_layers,
    prepare_qat_,
    set_qat_flags_,
    strip_qat_,
)
from lightning_accel.quantization.pt2e import Int8Conv
from tests.helpers.tiny import RandomDataModule, TinyConvNet, TinyMLP, tiny_trainer


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).pow(2).mean()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.pow(2).mean() / noise))


def _mlp(**kw: Any) -> TinyMLP:
    return TinyMLP(d_in=64, hidden=64, **kw)  # 64 inputs: int4 groups of 32 pack for the CPU kernel


def _mlp_data() -> RandomDataModule:
    return RandomDataModule((64,), n=64)


def _conv_data() -> RandomDataModule:
    return RandomDataModule((1, 8, 8), n=64)


class _Steps(pl.Callback):
    """Records, after each training batch, whether fake quantization and the observers were on."""

    def __init__(self, layer: str) -> None:
        self.layer, self.weights, self.observers, self.ranges = layer, [], [], []

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        m = pl_module.get_submodule(self.layer)
        self.weights.append(bool(m.weight_fake_quantizer.enabled))
        act = m.activation_fake_quantizer
        self.observers.append(bool(act.observer_enabled[0]))
        self.ranges.append(act.range())


class _RaiseAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("interrupted")


# ---------------------------------------------------------------------- core
def test_fake_quantization_changes_outputs_keeps_keys_and_passes_gradients_straight_through():
    model = _mlp()
    x = torch.randn(8, 64)
    ref = model(x).detach()
    keys = set(model.state_dict())
    weight = model.fc1.weight
    names = prepare_qat_(model, bits=4, granularity="per_group", group_size=32)
    assert names == ["fc1", "fc2"] and set(fake_quantized_layers(model)) == {"fc1", "fc2"}  # not the head
    assert model.fc1.weight is weight and set(model.state_dict()) == keys  # same parameters and keys
    out = model(x)
    assert not torch.allclose(out, ref, atol=1e-4)  # weights are rounded to the int4 grid
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0  # straight-through estimator
    set_qat_flags_(model, weights=False, activations=False, observers=False)
    torch.testing.assert_close(model(x), ref)  # off: the float model
    assert strip_qat_(model) == ["fc1", "fc2"] and type(model.fc1) is nn.Linear and model.fc1.weight is weight


def test_conv_layers_are_fake_quantized_and_observe_their_input():
    model = TinyConvNet()
    prepare_qat_(model)
    assert set(fake_quantized_layers(model)) == {"conv1", "conv2"} and isinstance(model.conv1, nn.Conv2d)
    model.train()
    model(torch.randn(4, 1, 8, 8))
    low, high = model.conv1.activation_fake_quantizer.range()
    assert low < 0 < high


@pytest.mark.parametrize(
    "kind, kwargs, min_db",
    [
        ("linear", dict(bits=8), 35.0),  # torchao int8 x int8: inputs quantized per token at run time
        ("linear", dict(bits=8, activations=True), 35.0),
        ("linear", dict(bits=4, granularity="per_group", group_size=32), 80.0),  # the trained int4 values, packed exactly
        ("linear", dict(bits=4), 80.0),
        ("conv", dict(bits=8), 45.0),  # static uint8 input with the observed range
        ("conv", dict(bits=8, activations=True), 80.0),  # the fake-quantized conv trained on that very rounding
    ],
)
def test_converted_outputs_match_the_fake_quantized_model(kind, kwargs, min_db):
    """Tolerances: int4 and int8 conv with fake-quantized inputs are exact (SQNR inf); int8 Linear layers quantize
    their inputs per token at run time (what the fake-quantized model does not do): SQNR >= 35 dB."""
    model, x = (_mlp(), torch.randn(32, 64)) if kind == "linear" else (TinyConvNet(16), torch.randn(32, 1, 8, 8))
    prepare_qat_(model, **kwargs)
    model.train()
    for _ in range(3):
        model(x)  # the observers see the inputs
    model.eval()
    with torch.no_grad():
        ref = model(x)
    record = convert_qat_(model, "torchao")
    assert not fake_quantized_layers(model) and set(converted_layers(model)) == set(record["linear"]) | set(record["conv"])
    if kind == "conv":
        assert isinstance(model.conv1, Int8Conv)
    with torch.no_grad():
        assert _sqnr_db(ref, model(x)) >= min_db


def test_conversion_refuses_what_the_backends_cannot_store():
    model = TinyConvNet()
    prepare_qat_(model, bits=4)
    with pytest.raises(ValueError, match="PT2E int8"):
        convert_qat_(model)
    assert fake_quantized_layers(model)  # unchanged
    fresh = TinyConvNet()
    prepare_qat_(fresh)
    with pytest.raises(ValueError, match="never observed"):
        convert_qat_(fresh)
    conv3d = nn.Sequential(nn.Conv3d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    prepare_qat_(conv3d, modules=["0"])
    with pytest.raises(ValueError, match="'0': a Conv3d .* cannot become a PT2E int8 convolution"):
        convert_qat_(conv3d)


# ---------------------------------------------------------------------- callback: arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=2), "`bits` must be one of 8, 4; got 2"),
        (dict(bits="8"), "`bits` must be an integer"),
        (dict(granularity="per_tensor"), "`granularity` must be one of 'per_channel', 'per_group'"),
        (dict(group_size=1), "`group_size`"),
        (dict(symmetric="yes"), "`symmetric` must be a bool"),
        (dict(activations=1), "`activations` must be a bool"),
        (dict(start=-1), "`start`"),
        (dict(freeze_observers_at=-2), "`freeze_observers_at`"),
        (dict(start=10, freeze_observers_at=5), "`freeze_observers_at`=5 must be after `start`=10"),
        (dict(modules="fc1"), "`modules`"),
        (dict(exclude=[""]), "`exclude`"),
        (dict(convert="onnx"), "`convert` must be one of 'auto', 'none', 'torchao', 'bitsandbytes'"),
        (dict(convert="bitsandbytes", bits=4), "NF4/FP4"),
        (dict(granularity="per_group"), "int8 layers convert with one symmetric scale per output channel"),
        (dict(symmetric=False), "`symmetric`=False"),
        (dict(save_checkpoint="yes"), "`save_checkpoint` must be a bool"),
        (dict(checkpoint_name="out/q.ckpt"), "`checkpoint_name` must be a file name like 'quantized.ckpt'; got 'out/q.ckpt'"),
        (dict(checkpoint_name=""), "`checkpoint_name` must be a file name"),
    ],
)
def test_callback_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizationAwareTraining(**kwargs)


def test_setup_errors_name_the_problem(tmp_path):
    with pytest.raises(NoMatchError, match="nothing_here"):
        tiny_trainer(tmp_path, callbacks=[QuantizationAwareTraining(modules=["nothing_here"])]).fit(TinyMLP(), RandomDataModule())
    with pytest.raises(ValueError, match="`group_size`=24 does not divide"):
        cb = QuantizationAwareTraining(bits=4, granularity="per_group", group_size=24, convert="none")
        tiny_trainer(tmp_path, callbacks=[cb]).fit(_mlp(), _mlp_data())
    with pytest.raises(ValueError, match="convolutions .* convert to PT2E int8"):
        tiny_trainer(tmp_path, callbacks=[QuantizationAwareTraining(bits=4)]).fit(TinyConvNet(), _conv_data())


def test_conflicts_with_post_training_quantization_of_the_same_layers(tmp_path):
    for order in ([QuantizationAwareTraining(), Quantization(mode="int8", when="fit_end")],
                  [Quantization(mode="nf4"), QuantizationAwareTraining()]):
        with pytest.raises(CompositionError, match="QuantizationAwareTraining.*Quantization|Quantization.*QuantizationAwareTraining"):
            tiny_trainer(tmp_path, callbacks=order).fit(TinyMLP(), RandomDataModule())


# ---------------------------------------------------------------------- callback: training
def test_start_and_freeze_observers_at(tmp_path):
    steps = _Steps("fc1")
    cb = QuantizationAwareTraining(activations=True, start=3, freeze_observers_at=6, convert="none")
    model = TinyMLP()
    trainer = tiny_trainer(tmp_path, callbacks=[cb, steps], max_epochs=1, limit_train_batches=8)
    trainer.fit(model, RandomDataModule())
    assert steps.weights == [False] * 3 + [True] * 5  # float until step 3
    assert steps.observers == [False] * 3 + [True] * 3 + [False] * 2
    assert steps.ranges[5] == steps.ranges[6] == steps.ranges[7] != steps.ranges[4]  # frozen from step 6
    record = cb.record
    assert record["started_at"] == 3 and record["frozen_at"] == 6 and record["converted"] is None
    assert set(fake_quantized_layers(model)) == {"fc1", "fc2"}  # convert="none" keeps the fake-quantized model


def test_fit_ending_before_start_warns_and_keeps_the_model(tmp_path):
    cb = QuantizationAwareTraining(start=1000)
    with pytest.warns(QATWarning, match="before `start`=1000"):
        tiny_trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(TinyMLP(), RandomDataModule())


class _KwargsModel(TinyMLP):
    """A forward with keyword-only arguments, called with keywords (Lightning's old QAT callback broke this)."""

    def forward(self, x: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x) / temperature
        return out if mask is None else out + mask

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x=x, temperature=2.0, mask=torch.zeros(1, 4)), y)


def test_forward_with_keyword_arguments_trains_and_converts(tmp_path):
    model = _KwargsModel(d_in=64, hidden=64)
    cb = QuantizationAwareTraining()
    trainer = tiny_trainer(tmp_path, callbacks=[cb], max_epochs=1)
    trainer.fit(model, _mlp_data())
    assert set(cb.record["converted"]["linear"]) == {"fc1", "fc2"}
    out = model(x=torch.randn(2, 64), temperature=2.0, mask=torch.zeros(1, 4))
    assert out.shape == (2, 4)


def test_qat_trains_and_the_converted_model_tests_like_the_fake_quantized_one(tmp_path):
    model = _mlp()
    dm = _mlp_data()
    cb = QuantizationAwareTraining(convert="none")
    trainer = tiny_trainer(tmp_path, callbacks=[cb], max_epochs=3)
    before = copy.deepcopy(model.fc1.weight.detach())
    trainer.fit(model, dm)
    assert not torch.equal(before, model.fc1.weight)
    fq_acc = trainer.test(model, dm, verbose=False)[0]["test_acc"]
    convert_qat_(model)
    assert trainer.test(model, dm, verbose=False)[0]["test_acc"] == pytest.approx(fq_acc, abs=2 / 64)


@pytest.mark.parametrize("bits", [8, 4])
def test_fit_converts_and_test_checkpoint_reloads(tmp_path, bits):
    """A fit's checkpoint (fake-quantized) tested with ckpt_path= on a fresh model and Trainer is converted first and
    scores as the converted model of the fit; lightning_accel.load_checkpoint of a converted checkpoint rebuilds it."""
    kwargs = dict(bits=4, granularity="per_group", group_size=32) if bits == 4 else {}
    dm = _mlp_data()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    model = _mlp()
    trainer = tiny_trainer(tmp_path, callbacks=[QuantizationAwareTraining(**kwargs), ckpt], enable_checkpointing=True)
    trainer.fit(model, dm)
    assert set(converted_layers(model)) == {"fc1", "fc2"}
    expected = trainer.test(model, dm, verbose=False)[0]
    fresh_trainer = tiny_trainer(tmp_path, callbacks=[QuantizationAwareTraining(**kwargs)])
    fresh = _mlp()
    assert fresh_trainer.test(fresh, dm, ckpt_path=str(tmp_path / "ckpts" / "last.ckpt"), verbose=False)[0] == expected
    assert set(converted_layers(fresh)) == {"fc1", "fc2"}
    # the converted model's own checkpoint, without a Trainer
    trainer.save_checkpoint(tmp_path / "converted.ckpt")
    loaded = lightning_accel.load_checkpoint(_mlp(), tmp_path / "converted.ckpt")
    x = torch.randn(4, 64)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    # ... and the fake-quantized checkpoint loads as the fake-quantized model
    fq = lightning_accel.load_checkpoint(_mlp(), tmp_path / "ckpts" / "last.ckpt")
    assert set(fake_quantized_layers(fq)) == {"fc1", "fc2"}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fit_end_writes_the_converted_checkpoint_that_load_checkpoint_restores(tmp_path, kind):
    """Like Quantization's quantized.ckpt: the converted int8 model's weights and the states replay needs, without the
    float optimizer and LR-scheduler states, beside the run's checkpoints; load_checkpoint gives the same outputs."""
    model, dm, x = (_mlp(), _mlp_data(), torch.randn(4, 64)) if kind == "mlp" else (TinyConvNet(), _conv_data(), torch.randn(3, 1, 8, 8))
    cb = QuantizationAwareTraining(activations=kind == "cnn", checkpoint_name="qat_int8.ckpt")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = tiny_trainer(tmp_path, callbacks=[cb, ckpt], enable_checkpointing=True, max_epochs=1)
    trainer.fit(model, dm)
    path = tmp_path / "ckpts" / "qat_int8.ckpt"
    assert cb.quantized_checkpoint_path == str(path) and path.is_file()
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert "optimizer_states" not in saved and "lr_schedulers" not in saved
    assert saved["callbacks"][cb.state_key]["converted"]
    loaded = lightning_accel.load_checkpoint(_mlp() if kind == "mlp" else TinyConvNet(), path)
    assert set(converted_layers(loaded)) == set(converted_layers(model)) != set()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_no_converted_checkpoint_when_not_asked_or_not_converted(tmp_path):
    for i, kwargs in enumerate([dict(save_checkpoint=False), dict(convert="none")]):
        cb = QuantizationAwareTraining(**kwargs)
        folder = tmp_path / str(i)
        trainer = tiny_trainer(folder, callbacks=[cb, ModelCheckpoint(dirpath=folder / "ckpts")], enable_checkpointing=True, max_epochs=1)
        trainer.fit(_mlp(), _mlp_data())
        assert cb.quantized_checkpoint_path is None and not (folder / "ckpts" / "quantized.ckpt").exists()


def test_conv_fit_converts_to_int8_convolutions_and_export_accepts_it(tmp_path):
    model, dm = TinyConvNet(), _conv_data()
    cb = QuantizationAwareTraining(activations=True)
    trainer = tiny_trainer(tmp_path, callbacks=[cb], max_epochs=1)
    trainer.fit(model, dm)
    assert isinstance(model.conv1, Int8Conv) and isinstance(model.conv2, Int8Conv)
    assert set(cb.record["converted"]["conv"]) == {"conv1", "conv2"}
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    path = lightning_accel.export(model, x, tmp_path / "qat.pt2", compile=False)
    with torch.no_grad():
        torch.testing.assert_close(lightning_accel.load_exported(path)(x), ref, rtol=1e-4, atol=1e-4)
    # a fresh model through ckpt_path: conv layers rebuilt from the recorded input ranges, then the weights load
    trainer.save_checkpoint(tmp_path / "cnn.ckpt")
    fresh = lightning_accel.load_checkpoint(TinyConvNet(), tmp_path / "cnn.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref)


def test_aoti_compiled_qat_cnn_matches_the_in_memory_converted_model(tmp_path):
    """The file a user deploys: QAT's int8 convolutions (the same Int8Conv layers as Quantization's) lowered by
    inductor (AOTInductor) match the in-memory converted model within 1e-4."""
    torch.manual_seed(0)
    model = TinyConvNet(width=8)
    tiny_trainer(tmp_path, callbacks=[QuantizationAwareTraining(activations=True)], max_epochs=1).fit(model, _conv_data())
    assert isinstance(model.conv1, Int8Conv) and isinstance(model.conv2, Int8Conv)
    model.eval()
    path = lightning_accel.export(model, torch.randn(2, 1, 8, 8), tmp_path / "qat_cnn.pt2", compile=True)
    run = lightning_accel.load_exported(path)
    for batch in (1, 7):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(run(x), model(x), atol=1e-4)


def test_linear_export_accepts_the_converted_model(tmp_path):
    model = _mlp()
    tiny_trainer(tmp_path, callbacks=[QuantizationAwareTraining()], max_epochs=1).fit(model, _mlp_data())
    model.eval()
    x = torch.randn(3, 64)
    path = lightning_accel.export(model, x, tmp_path / "mlp.pt2", compile=False)
    with torch.no_grad():
        torch.testing.assert_close(lightning_accel.load_exported(path)(x), model(x), rtol=1e-4, atol=1e-4)


def test_fit_twice_on_the_same_trainer_and_model(tmp_path):
    model, dm = _mlp(), _mlp_data()
    cb = QuantizationAwareTraining(activations=True)
    trainer = tiny_trainer(tmp_path, callbacks=[cb], max_epochs=1)
    trainer.fit(model, dm)
    first = model.fc1.weight.qdata.clone()
    assert set(converted_layers(model)) == {"fc1", "fc2"}
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, dm)  # QAT continues from the fake-quantized layers, then converts again
    assert trainer.global_step == 2 * 4 and set(converted_layers(model)) == {"fc1", "fc2"}
    assert not torch.equal(first, model.fc1.weight.qdata)
    # the converted int8 model is what the test loop evaluates: the same accuracy as a direct forward
    tested = trainer.test(model, dm, verbose=False)[0]["test_acc"]
    with torch.no_grad():
        hits = [(model.eval()(x).argmax(-1) == y).float() for x, y in dm.test_dataloader()]
    assert tested == pytest.approx(torch.cat(hits).mean().item(), abs=1e-6)


def test_interrupted_fit_resumes_to_the_uninterrupted_result(tmp_path):
    """Interrupted by an exception at step 6 (after fake quantization started at 2 and before the observers freeze at
    9), resumed with ckpt_path= on a fresh model: weights, observer statistics and record equal an uninterrupted run."""

    def run(root, extra, ckpt_path=None):
        pl.seed_everything(0)
        model = TinyConvNet()
        cb = QuantizationAwareTraining(activations=True, start=2, freeze_observers_at=9, convert="none")
        ckpt = ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=4, save_top_k=-1)
        trainer = tiny_trainer(root, callbacks=[cb, ckpt, *extra], max_epochs=3, enable_checkpointing=True)
        trainer.fit(model, _conv_data(), ckpt_path=ckpt_path)
        return model, cb

    full, full_cb = run(tmp_path / "full", [])
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path / "cut", [_RaiseAt(6)])
    resumed, resumed_cb = run(tmp_path / "cut", [], ckpt_path=str(tmp_path / "cut" / "ckpts" / "epoch=0-step=4.ckpt"))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any("activation_post_process.min_val" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert full_cb.record == resumed_cb.record


def test_an_interrupted_fit_gives_back_float_layers(tmp_path):
    model = TinyMLP()
    weight = model.fc1.weight
    with pytest.raises(RuntimeError, match="interrupted"):
        tiny_trainer(tmp_path, callbacks=[QuantizationAwareTraining(), _RaiseAt(2)]).fit(model, RandomDataModule())
    assert not fake_quantized_layers(model) and type(model.fc1) is nn.Linear and model.fc1.weight is weight
    assert "on_load_checkpoint" not in model.__dict__


# ---------------------------------------------------------------------- composition
def test_composes_with_scheduled_pruning_pruned_zeros_stay_zero(tmp_path):
    model, dm = _mlp(), _mlp_data()
    prune = ScheduledPruning(amount=0.5, schedule="one_shot", start=0, modules=["fc1", "fc2"], verbose=0)
    qat = QuantizationAwareTraining(start=2)
    tiny_trainer(tmp_path, callbacks=[qat, prune], max_epochs=2).fit(model, dm)
    for name in ("fc1", "fc2"):
        q = model.get_submodule(name).weight.qdata
        assert 0.45 < float((q == 0).float().mean()) < 0.6  # pruned zeros are exactly zero int8 values


def test_composes_with_mixed_precision(tmp_path):
    model, dm = TinyConvNet(), _conv_data()
    cb = QuantizationAwareTraining(activations=True)
    trainer = tiny_trainer(tmp_path, callbacks=[MixedPrecision(dtype="bf16"), cb], max_epochs=1)
    trainer.fit(model, dm)
    assert isinstance(model.conv1, Int8Conv)
    assert 0 <= trainer.test(model, dm, verbose=False)[0]["test_acc"] <= 1


# ---------------------------------------------------------------------- LightningCLI
def test_yaml_config_builds_the_callback_and_converts(tmp_path):
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "examples"))
    from train import main

    config = yaml.safe_load((root / "examples" / "configs" / "qat.yaml").read_text())
    args = config["trainer"]["callbacks"][0]["init_args"]
    assert args["bits"] == 8 and args["activations"] is True and args["start"] < args["freeze_observers_at"]
    args.update(start=0, freeze_observers_at=2)  # the example's schedule, shrunk to a 3-step run
    config["model"]["init_args"].update(width=8, depth=1)
    path = tmp_path / "qat.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path), "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_checkpointing=false"])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining))
    assert cb.activations and cb.record["frozen_at"] == 2
    assert set(cb.record["converted"]["conv"]) == {n for n, m in cli.model.named_modules() if isinstance(m, Int8Conv)}
    assert cb.record["converted"]["conv"]


def test_input_fake_quantizer_flags_follow_the_checkpoint():
    """The input fake quantizer branches on Python mirrors of its buffers (no ``.item()`` per call under torch.compile):
    they follow set_qat_flags_ and a checkpoint round trip, so a fresh model fake-quantizes like the trained one."""
    torch.manual_seed(0)
    model = TinyConvNet(width=8)
    prepare_qat_(model, activations=True)
    act = model.conv1.activation_fake_quantizer
    assert not act.observed
    set_qat_flags_(model, weights=True, activations=False, observers=True)
    x = torch.randn(4, 1, 8, 8)
    model(x)
    assert act.observed and not act._fake_quant and act.fake_quant_enabled.item() == 0
    torch.testing.assert_close(act(x), x)  # observing only
    set_qat_flags_(model, weights=True, activations=True, observers=False)
    model.eval()
    assert not torch.equal(act(x), x)
    eager = model(x)
    fresh = TinyConvNet(width=8)
    prepare_qat_(fresh, activations=True)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    fact = fresh.conv1.activation_fake_quantizer
    assert fact.observed and fact._fake_quant and not fact._observe
    torch.testing.assert_close(fresh(x), eager)


def test_input_observer_matches_torchaos_moving_average_observer_exactly():
    """The branch-free observer update and qparams are torchao's arithmetic: the running range, scale and zero point
    are bit-identical to torchao's ``MovingAverageMinMaxObserver`` over a sequence of inputs (an all-positive one, a
    constant one and an empty one included)."""
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver

    torch.manual_seed(0)
    model = TinyConvNet(width=8)
    prepare_qat_(model, activations=True)
    model.train()
    act = model.conv1.activation_fake_quantizer
    ref = MovingAverageMinMaxObserver(averaging_constant=act.activation_post_process.averaging_constant,
                                      dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)
    inputs = [torch.randn(4, 1, 8, 8) * 3 + 1, torch.rand(4, 1, 8, 8) + 2, torch.full((2, 1, 8, 8), 0.5),
              torch.empty(0, 1, 8, 8), torch.randn(4, 1, 8, 8) * 1e-3, torch.randn(4, 1, 8, 8) * 50]
    for x in inputs:
        act(x)
        ref(x)
        if x.numel() == 0:
            continue
        scale, zero_point = ref.calculate_qparams()
        assert torch.equal(act.activation_post_process.min_val, ref.min_val)
        assert torch.equal(act.activation_post_process.max_val, ref.max_val)
        assert torch.equal(act.scale, scale) and torch.equal(act.zero_point, zero_point.to(act.zero_point.dtype))


def test_compiled_fake_quantized_conv_net_with_input_observation_has_no_graph_break():
    """The input fake quantizer observes without branching on tensor values, so torch.compile traces a fake-quantized
    conv net in training mode (observers on) without a graph break, and computes what eager computes."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = TinyConvNet(width=8)
    prepare_qat_(model, activations=True)
    model.train()
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    for _ in range(3):
        x = torch.randn(4, 1, 8, 8)
        torch.testing.assert_close(compiled(x), eager(x))
    assert counters["stats"]["unique_graphs"] >= 1
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    act, ref = model.conv1.activation_fake_quantizer, eager.conv1.activation_fake_quantizer
    assert torch.equal(act.scale, ref.scale) and torch.equal(act.zero_point, ref.zero_point)
    torch._dynamo.reset()


@pytest.mark.parametrize("vnni", [False, True])
def test_int8_on_a_cpu_without_vnni_warns_before_training(tmp_path, monkeypatch, vnni):
    """torch's int8 CPU matmuls need VNNI/AMX to beat float (10x slower at batch 256 on an AVX2-only CPU): both int8
    callbacks that end in torchao int8 layers say so at setup, before the fit spends its time."""
    import lightning_accel.quantization.torchao as torchao_core

    monkeypatch.setattr(torchao_core, "int8_dot_product_cpu", lambda: vnni)
    for make in (lambda: QuantizationAwareTraining(bits=8), lambda: lightning_accel.Quantization(mode="int8", when="fit_end")):
        cb = make()
        trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[cb])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(TinyMLP(), RandomDataModule())
        slow = [str(w.message) for w in caught if issubclass(w.category, lightning_accel.SlowOnCPUWarning)]
        assert len(slow) == (0 if vnni else 1), (type(cb).__name__, slow)
        if slow:
            assert "VNNI" in slow[0] and type(cb).__name__ in slow[0] and "10x" in slow[0]
    # a 4-bit QAT converts to torchao's packed int4 weight-only kernel: not the int8 matmul, no warning
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                           callbacks=[QuantizationAwareTraining(bits=4, granularity="per_group", group_size=32)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyMLP(d_in=32, hidden=64), RandomDataModule(shape=(32,)))
    assert not [w for w in caught if issubclass(w.category, lightning_accel.SlowOnCPUWarning)]
