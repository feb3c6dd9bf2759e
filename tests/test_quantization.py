"""Quantization: the pure core (quantize_, adapters, merge), its numerics and storage, and the callback in a Trainer."""

from __future__ import annotations

import copy
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from torch import nn

import lightning_accel
from lightning_accel import AccelCallback, CompositionError, NoMatchError
from lightning_accel._lifecycle import find_conflict
from lightning_accel.demos import DigitsDataModule, DigitsTransformer
from lightning_accel.optimizers import EightBitOptimizer
from lightning_accel.quantization import (
    LoRALinear,
    MetricDropWarning,
    Quantization,
    QuantizationNoEffectWarning,
    add_adapters_,
    count_parameters,
    dequantize_,
    merge_adapters_,
    quantize_,
    quantized_footprint,
    quantized_layers,
    replay_quantization,
    resolve_compute_dtype,
    state_dict_bytes,
)
from lightning_accel.quantization.bnb import (
    bf16_supported,
    dequantize_weight,
    layer_config,
    require_bitsandbytes,
)
from tests.helpers import RandomDataModule, TinyMLP, tiny_trainer

MODES = ["nf4", "fp4", "int8"]


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB."""
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def two_layers(width: int = 256) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8))


def small_transformer() -> DigitsTransformer:
    torch.manual_seed(0)
    return DigitsTransformer(dim=32, depth=1, heads=2)


# ---------------------------------------------------------------------- numerics and storage
@pytest.mark.parametrize(
    "mode, double_quant, min_db",
    [("nf4", True, 19.5), ("nf4", False, 19.5), ("fp4", True, 18.0), ("fp4", False, 18.0), ("int8", True, 39.0)],
)
@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_quantized_layer_snr(mode, double_quant, min_db, compute_dtype):
    """Output of a quantized layer vs the float layer on Gaussian inputs: 4-bit ~20 dB (6 dB per bit), int8 > 40 dB."""
    model = two_layers()
    x = torch.randn(128, 256)
    with torch.no_grad():
        ref = model[0](x)
    quantize_(model, mode=mode, double_quant=double_quant, compute_dtype=compute_dtype)
    model.eval()
    with torch.no_grad():
        out = model[0](x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert snr_db(ref, out) >= min_db
    # training mode (int8: dequantized weight x float input) is at least as accurate, and differentiable to the input
    model.train()
    xg = x.clone().requires_grad_(True)
    out_train = model[0](xg)
    out_train.sum().backward()
    assert snr_db(ref, out_train.detach()) >= min_db
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_nf4_beats_fp4_on_normal_weights():
    model = two_layers()
    x = torch.randn(128, 256)
    with torch.no_grad():
        ref = model[0](x)
    scores = {}
    for mode in ("nf4", "fp4"):
        m = copy.deepcopy(model)
        quantize_(m, mode=mode, compute_dtype="fp32")
        with torch.no_grad():
            scores[mode] = snr_db(ref, m[0](x))
    assert scores["nf4"] > scores["fp4"] + 0.5, scores


@pytest.mark.parametrize(
    "mode, double_quant, low, high",
    [("nf4", True, 4.0, 4.2), ("nf4", False, 4.4, 4.6), ("fp4", True, 4.0, 4.2), ("int8", True, 8.0, 8.3)],
)
def test_stored_bits_per_weight(mode, double_quant, low, high):
    """(weight bytes + quantization-state bytes) x 8 / weights, counted from the tensors the checkpoint stores."""
    model = two_layers(256)
    quantize_(model, mode=mode, double_quant=double_quant, modules=["0"])
    foot = quantized_footprint(model)
    assert foot["layers"] == 1 and foot["weights"] == 256 * 256
    assert low <= foot["bits_per_weight"] <= high, foot
    layer_sd = {k: v for k, v in model.state_dict().items() if k.startswith("0.") and k != "0.bias"}
    stored = sum(v.nbytes for v in layer_sd.values())
    # everything the footprint counts is really in the state dict (plus a few bytes of bitsandbytes metadata)
    counted = foot["weight_bytes"] + foot["state_bytes"] + foot["table_bytes"]
    assert counted <= stored <= counted + 256
    saved = state_dict_bytes(two_layers(256)) - state_dict_bytes(model)
    assert saved == 256 * 256 * 4 - stored  # the float weight's bytes, less what the quantized weight stores


# ---------------------------------------------------------------------- selection and errors
def test_default_selection_skips_output_layer_and_keeps_keys():
    model = small_transformer()
    float_keys = set(model.state_dict())
    originals = quantize_(model, mode="nf4")
    assert list(originals) == ["embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.3"]
    assert type(model.head) is nn.Linear and "head" not in quantized_layers(model)
    keys = set(model.state_dict())
    assert float_keys <= keys  # the model's own keys are all still there ...
    extra = keys - float_keys  # ... plus bitsandbytes' quantization state next to each quantized weight
    assert extra and all(any(k.startswith(f"{n}.weight.") for n in originals) for k in extra)
    assert all(not p.requires_grad for n in originals for p in model.get_submodule(n).parameters())
    assert quantize_(model, mode="nf4") == {}  # idempotent


def test_patterns_and_exclude():
    model = small_transformer()
    originals = quantize_(model, mode="int8", modules=["blocks.*"], exclude=["*.proj"])
    assert list(originals) == ["blocks.0.attn.qkv", "blocks.0.mlp.0", "blocks.0.mlp.3"]
    assert set(model.state_dict()) >= {"blocks.0.attn.qkv.SCB", "blocks.0.attn.qkv.weight"}


def test_multihead_attention_out_proj_is_guarded():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.fc(self.attn(x, x, x)[0]))

    model = WithMHA()
    x = torch.randn(2, 3, 16)
    assert list(quantize_(copy.deepcopy(model), mode="nf4")) == ["fc"]  # out_proj stays float by default
    with pytest.raises(ValueError, match="output projection of an nn.MultiheadAttention"):
        quantize_(model, mode="nf4", modules=["attn.out_proj"])
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear  # untouched
    assert model(x).shape == (2, 3, 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="int4"), ValueError, "`mode` must be one of 'int8', 'nf4', 'fp4'; got 'int4'"),
        (dict(block_size=100), ValueError, "`block_size` must be one of 64, 128"),
        (dict(modules="blocks.*"), ValueError, "`modules` must be None or a non-empty list"),
        (dict(modules=["decoder.*"]), NoMatchError, "`modules` pattern 'decoder.\\*' matches no Linear"),
        (dict(exclude=["nope"]), NoMatchError, "`exclude` pattern 'nope'"),
        (dict(compute_dtype="fp16"), ValueError, "`compute_dtype`='fp16' is not supported on CPU"),
        (dict(compute_dtype="fp64"), ValueError, "`compute_dtype` must be one of"),
    ],
)
def test_quantize_rejects_bad_arguments_without_touching_the_model(kwargs, error, match):
    model = small_transformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        quantize_(model, **kwargs)
    assert not quantized_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_without_linear_layer():
    with pytest.raises(NoMatchError, match="Sequential has no nn.Linear layer to quantize"):
        quantize_(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'lightning-accel\[quantization\]'"):
        require_bitsandbytes()


def test_compute_dtype_resolution():
    assert resolve_compute_dtype("fp32", "cpu") == torch.float32
    assert resolve_compute_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_compute_dtype("auto", "cpu") == (torch.bfloat16 if bf16_supported("cpu") else torch.float32)
    with pytest.raises(ValueError, match="`compute_dtype`='fp16' is not supported on CPU"):
        resolve_compute_dtype("fp16", "cpu")


# ---------------------------------------------------------------------- checkpoints of quantized layers
@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_is_exact(mode):
    """A quantized model's state dict loads back bit-exactly into a replayed fresh model (bitsandbytes' own
    Linear4bit would silently keep the fresh model's absmax here)."""
    model = small_transformer()
    originals = quantize_(model, mode=mode)
    add_adapters_(model, rank=2)
    with torch.no_grad():
        for layer in quantized_layers(model).values():
            layer.adapter.lora_B.normal_()
    model.eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    state = {
        "applied": True,
        "modules": list(originals),
        "mode": mode,
        "double_quant": True,
        "block_size": 64,
        # "auto" resolved by this machine: bf16 where the CPU runs it natively, else fp32
        "compute_dtype": layer_config(next(iter(quantized_layers(model).values())))["compute_dtype"],
        "adapters": list(originals),
        "adapter_rank": 2,
        "adapter_alpha": 16.0,
        "adapter_dropout": 0.0,
    }
    torch.manual_seed(123)
    fresh = DigitsTransformer(dim=32, depth=1, heads=2)  # different float weights
    replay_quantization(fresh, state)
    result = fresh.load_state_dict(model.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    for name, layer in quantized_layers(fresh).items():
        assert torch.equal(dequantize_weight(layer), dequantize_weight(quantized_layers(model)[name]))


def test_float_checkpoint_is_quantized_on_load_and_bad_weights_are_refused():
    source = small_transformer()
    target = DigitsTransformer(dim=32, depth=1, heads=2)
    quantize_(target, mode="nf4", compute_dtype="fp32")
    target.load_state_dict(source.state_dict())  # float weights into quantized layers: quantized on load
    reference = copy.deepcopy(source)
    quantize_(reference, mode="nf4", compute_dtype="fp32")
    assert torch.equal(dequantize_weight(target.embed), dequantize_weight(reference.embed))

    int8 = DigitsTransformer(dim=32, depth=1, heads=2)
    quantize_(int8, mode="int8")
    before = dequantize_weight(target.embed).clone()
    with pytest.raises(RuntimeError, match="cannot load 'embed.weight' of dtype torch.int8"):
        target.load_state_dict(int8.state_dict())
    bad = {k: v for k, v in int8.state_dict().items() if not k.endswith("SCB")}
    with pytest.raises(RuntimeError, match="expected an int8 weight with its 'embed.SCB' row scales"):
        int8.load_state_dict(bad)
    assert torch.equal(dequantize_weight(target.embed), before)


def test_device_moves_deepcopy_and_dtype_casts_keep_quantized_layers_working():
    model = small_transformer()
    quantize_(model, mode="int8", modules=["blocks.0.mlp.0"])
    quantize_(model, mode="nf4", modules=["blocks.0.attn.qkv"])
    model.eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        moved = copy.deepcopy(model).to("cpu").to(torch.float32)
        assert torch.equal(moved(x), expected)
        model.to(torch.float64)  # float parameters change dtype; packed weights and scales must not
        assert model.blocks[0].mlp[0].weight.dtype == torch.int8
        assert model.blocks[0].attn.qkv.weight.dtype == torch.uint8
        assert model.blocks[0].mlp[0].SCB.dtype == torch.float64
        assert torch.allclose(model(x.double()).float(), expected, atol=0.05)


# ---------------------------------------------------------------------- adapters
def test_adapters_start_neutral_train_alone_and_merge_exactly():
    model = small_transformer()
    quantize_(model, mode="nf4", compute_dtype="fp32")
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    names = add_adapters_(model, rank=4, alpha=8.0)
    assert names == list(quantized_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".adapter." in n} == {f"{n}.adapter.lora_{ab}" for n in names for ab in "AB"}
    assert not any(n.startswith(tuple(f"{q}." for q in names)) and ".adapter." not in n for n in trainable)
    counts = count_parameters(model)
    assert counts["trainable"] < counts["total"]
    # a few optimizer steps move only adapters (and the float layers)
    frozen = {n: dequantize_weight(m).clone() for n, m in quantized_layers(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    y = torch.randint(0, 10, (8,))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(dequantize_weight(m), frozen[n]) for n, m in quantized_layers(model).items())
    assert model.embed.adapter.lora_B.abs().sum() > 0
    with torch.no_grad():
        adapted = model(x)
    assert merge_adapters_(model) == names
    assert not quantized_layers(model) and all(type(model.get_submodule(n)) is nn.Linear for n in names)
    with torch.no_grad():
        assert torch.allclose(model(x), adapted, atol=1e-4)


def test_adapters_on_float_layers_keep_keys():
    model = small_transformer()
    keys = set(model.state_dict())
    add_adapters_(model, rank=2, modules=["blocks.0.attn.*"])
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert set(model.state_dict()) - keys == {
        f"blocks.0.attn.{n}.adapter.lora_{ab}" for n in ("qkv", "proj") for ab in "AB"
    }
    with pytest.raises(NoMatchError, match="has no quantized layer to adapt"):
        add_adapters_(small_transformer(), rank=2)
    with pytest.raises(ValueError, match="`rank` must be an integer >= 1; got 0"):
        add_adapters_(model, rank=0)


def test_dequantize_restores_float_layers():
    model = small_transformer()
    originals = quantize_(model, mode="int8", compute_dtype="fp32")
    names = dequantize_(model)
    assert names == list(originals) and not quantized_layers(model)
    for n in names:
        err = (model.get_submodule(n).weight - originals[n].weight).abs().max()
        assert err <= originals[n].weight.abs().max() / 127 + 1e-6


# ---------------------------------------------------------------------- the callback
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="nf8"), "`mode` must be one of 'int8', 'nf4', 'fp4'; got 'nf8'"),
        (dict(double_quant="yes"), "`double_quant` must be a bool"),
        (dict(block_size=32), "`block_size` must be one of 64, 128, 256"),
        (dict(compute_dtype="float16"), "`compute_dtype` must be one of 'auto', 'fp32', 'bf16', 'fp16'"),
        (dict(modules=[]), "`modules` must be None or a non-empty list"),
        (dict(exclude=[""]), "`exclude` must contain non-empty strings"),
        (dict(when="epoch_end"), "`when` must be one of 'setup', 'fit_end'; got 'epoch_end'"),
        (dict(adapter_rank=-1), "`adapter_rank` must be an integer >= 0; got -1"),
        (dict(adapter_rank=4, adapter_alpha=0), "`adapter_alpha` must be a number > 0"),
        (dict(adapter_rank=4, adapter_dropout=1.0), "`adapter_dropout` must be a number in \\[0.0, 1.0\\)"),
        (dict(when="fit_end", adapter_rank=8), "`adapter_rank`=8 needs `when`='setup'"),
        (dict(when="fit_end", monitor=""), "`monitor` must be None or a logged metric name"),
        (dict(when="fit_end", monitor_mode="up"), "`monitor_mode` must be one of 'max', 'min'"),
        (dict(when="fit_end", max_metric_drop=-0.1), "`max_metric_drop` must be a number >= 0.0; got -0.1"),
        (dict(when="fit_end", monitor=None, max_metric_drop=0.01), "needs a `monitor` metric"),
        (dict(max_metric_drop=0.01), "`max_metric_drop`=0.01 only applies with `when`='fit_end'"),
    ],
)
def test_callback_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Quantization(**kwargs)


def test_callback_warns_about_options_without_effect():
    with pytest.warns(QuantizationNoEffectWarning, match="`block_size` and `double_quant` have no effect"):
        Quantization(mode="int8", block_size=128)
    with pytest.warns(QuantizationNoEffectWarning, match="`adapter_alpha` and `adapter_dropout` have no effect"):
        Quantization(adapter_dropout=0.1)


def test_setup_errors_leave_the_model_alone(tmp_path):
    model = TinyMLP()
    before = copy.deepcopy(model.state_dict())
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[Quantization(compute_dtype="fp16")])
    with pytest.raises(ValueError, match="`compute_dtype`='fp16' is not supported on CPU"):
        trainer.fit(model, RandomDataModule())
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[Quantization(modules=["encoder.*"], when="fit_end")])
    with pytest.raises(NoMatchError, match="`modules` pattern 'encoder.\\*'"):
        trainer.fit(model, RandomDataModule())  # fails at setup, not after training
    assert type(model.fc1) is nn.Linear and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _FakePruning(AccelCallback):
    stage = "structure"
    capabilities = frozenset({"masks_weights"})


def test_conflicts_are_named(tmp_path):
    scheduled = type("ScheduledPruning", (_FakePruning,), {})()
    structured = type("StructuredPruning", (_FakePruning,), {"capabilities": frozenset({"changes_shapes"})})()
    for pruner in (scheduled, structured):
        trainer = tiny_trainer(tmp_path, callbacks=[Quantization(), pruner])
        with pytest.raises(CompositionError, match=f"{type(pruner).__name__} cannot be combined with Quantization: "):
            trainer.fit(TinyMLP(), RandomDataModule())
    assert "both replace layers" in find_conflict(Quantization(), Quantization(mode="int8"))
    # pruning during training, quantizing after it, is the supported order
    fine = Quantization(when="fit_end", monitor=None)
    assert find_conflict(fine, scheduled) is None and find_conflict(fine, structured) is None


def test_qlora_fit_trains_adapters_on_a_frozen_quantized_base(tmp_path):
    pl.seed_everything(0)
    model = DigitsTransformer(dim=32, depth=1, heads=2, lr=1e-2)
    callback = Quantization(mode="nf4", adapter_rank=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    dm = DigitsDataModule(batch_size=64)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=8, limit_val_batches=2, callbacks=[callback, ckpt], enable_checkpointing=True)
    head_before = model.head.weight.detach().clone()
    trainer.fit(model, dm)
    layers = quantized_layers(model)
    assert list(layers) == ["embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.3"]
    assert all(layer.adapter is not None and layer.adapter.lora_B.abs().sum() > 0 for layer in layers.values())
    assert not torch.equal(model.head.weight, head_before)  # the float output layer trains too
    record = callback.record
    assert record["applied"] and record["modules"] == list(layers) and record["adapters"] == list(layers)
    assert record["mode"] == "nf4" and record["adapter_rank"] == 4
    assert "pl_module" not in record and "on_load_checkpoint" not in model.__dict__  # hook removed at teardown

    # the checkpoint reloads: in-process, without a Trainer, and through Trainer.test(ckpt_path=...)
    x = torch.rand(16, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "ckpts" / "last.ckpt"
    loaded = lightning_accel.load_checkpoint(DigitsTransformer, path)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    # Lightning's own loader runs no callback: it fails loudly instead of loading packed weights into float layers
    with pytest.raises(RuntimeError, match="size mismatch for embed.weight"):
        DigitsTransformer.load_from_checkpoint(path)
    metrics = trainer.test(model, dm, verbose=False)[0]
    fresh = DigitsTransformer(dim=32, depth=1, heads=2)
    tester = tiny_trainer(tmp_path, callbacks=[Quantization(mode="nf4", adapter_rank=4)])
    assert tester.test(fresh, dm, ckpt_path=path, verbose=False)[0] == metrics
    # a checkpoint quantized one way does not load into a model set up another way
    other = tiny_trainer(tmp_path, callbacks=[Quantization(mode="int8", adapter_rank=4)])
    with pytest.raises(ValueError, match="use the checkpoint's `mode`"):
        other.test(DigitsTransformer(dim=32, depth=1, heads=2), dm, ckpt_path=path, verbose=False)


@pytest.mark.parametrize("backend", ["auto", "bitsandbytes"])
def test_post_training_quantization_keeps_or_reverts(tmp_path, backend):
    """``auto`` is torchao int8 on this CPU; the guard, the checkpoint and the replay work with both backends."""
    from lightning_accel.quantization.torchao import int8_layers

    quantized_layers = int8_layers if backend == "auto" else globals()["quantized_layers"]
    dm = DigitsDataModule(batch_size=64)
    pl.seed_everything(0)
    model = DigitsTransformer(dim=32, depth=1, heads=2)
    callback = Quantization(mode="int8", when="fit_end", monitor="val_acc", max_metric_drop=0.05, backend=backend)
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=10, callbacks=[callback])
    trainer.fit(model, dm)
    record = callback.record
    assert record["applied"] and not record["reverted"] and len(quantized_layers(model)) == 5
    assert record["metric_before"] > 0.5 and record["metric_before"] - record["metric_after"] <= 0.05
    assert trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.FINISHED
    path = tmp_path / "ptq.ckpt"
    trainer.save_checkpoint(path)
    model.eval()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(lightning_accel.load_checkpoint(DigitsTransformer, path)(x), model(x))
    metrics = trainer.test(model, dm, verbose=False)[0]
    tester = tiny_trainer(tmp_path, callbacks=[Quantization(mode="int8", when="fit_end", monitor=None, backend=backend)])
    fresh = DigitsTransformer(dim=32, depth=1, heads=2)
    assert tester.test(fresh, dm, ckpt_path=path, verbose=False)[0] == metrics  # replayed before the weights load
    assert len(quantized_layers(fresh)) == 5

    # a loss that quantization worsens, with no tolerance: the float model is kept, with a warning
    pl.seed_everything(0)
    model = DigitsTransformer(dim=32, depth=1, heads=2)
    callback = Quantization(mode="fp4", when="fit_end", monitor="val_loss", monitor_mode="min", max_metric_drop=0.0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=10, callbacks=[callback])
    with pytest.warns(MetricDropWarning, match=r"costs val_loss .* more than `max_metric_drop`=0.0; the float model is kept"):
        trainer.fit(model, dm)
    record = callback.record
    assert record["reverted"] and not record["applied"] and record["metric_after"] > record["metric_before"]
    assert not quantized_layers(model) and not int8_layers(model)
    assert not quantized_layers(model) and type(model.embed) is nn.Linear


def test_post_training_monitor_must_be_logged(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[Quantization(when="fit_end", monitor="val_f1")])
    with pytest.raises(ValueError, match="`monitor`='val_f1' is not logged by TinyMLP; logged metrics: .*'val_acc'"):
        trainer.fit(TinyMLP(), RandomDataModule())
    model = TinyMLP()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[Quantization(when="fit_end", max_metric_drop=0.1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.warns(MetricDropWarning, match="no validation data; the float model is kept"):
            trainer.fit(model, RandomDataModule())
    assert not quantized_layers(model)


@pytest.mark.gpu
def test_quantized_fit_on_cuda(tmp_path):
    pl.seed_everything(0)
    model = DigitsTransformer(dim=64)
    callback = Quantization(mode="nf4", adapter_rank=4, compute_dtype="auto")
    trainer = tiny_trainer(
        tmp_path, accelerator="gpu", deterministic=False, max_epochs=2, limit_train_batches=5, callbacks=[callback, EightBitOptimizer()]
    )
    trainer.fit(model, DigitsDataModule())
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit"
    path = tmp_path / "gpu.ckpt"
    trainer.save_checkpoint(path)
    model.eval()  # after fit the strategy moved it back to the CPU
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        expected = model.cuda()(x.cuda()).cpu()
    loaded = lightning_accel.load_checkpoint(DigitsTransformer, path).cuda()
    with torch.no_grad():
        assert torch.equal(loaded(x.cuda()).cpu(), expected)
    int8 = DigitsTransformer(dim=64).cuda()
    quantize_(int8, mode="int8", compute_dtype="fp16")
    with torch.no_grad():
        assert int8(x.cuda()).dtype == torch.float32


def test_qlora_freezes_everything_but_adapters_and_the_trainable_modules(tmp_path):
    """Embeddings, norms and biases of the base are frozen too (0.1.0 left them trainable: 53% on MiniLM)."""
    model = DigitsTransformer(dim=32, depth=1, heads=2)
    cb = Quantization(mode="nf4", adapter_rank=4, monitor=None)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[cb])
    trainer.fit(model, DigitsDataModule(batch_size=32))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n or n.startswith("head.") for n in trainable), trainable
    assert any(n.startswith("head.") for n in trainable)
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) / total < 0.35
    # `trainable` names more modules that keep training (the one name-pattern rule: any depth, class names)
    model2 = DigitsTransformer(dim=32, depth=1, heads=2)
    cb2 = Quantization(mode="nf4", adapter_rank=4, monitor=None, trainable=["head", "LayerNorm"])
    tiny_trainer(tmp_path / "b", max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[cb2]).fit(model2, DigitsDataModule(batch_size=32))
    assert any("norm" in n and p.requires_grad for n, p in model2.named_parameters())
    with pytest.raises(ValueError, match="`trainable` must be None or a non-empty list"):
        Quantization(adapter_rank=4, trainable="head")


def test_post_training_quantization_writes_a_quantized_checkpoint(tmp_path):
    from lightning_accel.quantization.torchao import int8_layers

    model = TinyMLP()
    cb = Quantization(mode="int8", when="fit_end", monitor=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[cb, ckpt], enable_checkpointing=True)
    trainer.fit(model, RandomDataModule())
    assert cb.quantized_checkpoint_path == str(tmp_path / "ckpts" / "quantized.ckpt")
    loaded = lightning_accel.load_checkpoint(TinyMLP, cb.quantized_checkpoint_path)
    assert set(int8_layers(loaded)) == {"fc1", "fc2"}
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    float_last = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)
    assert not float_last["callbacks"][cb.state_key]["applied"]  # the float model the epochs produced
    quantized = torch.load(cb.quantized_checkpoint_path, weights_only=False)
    assert "optimizer_states" in float_last and "optimizer_states" not in quantized  # deployable weights, no AdamW moments
    assert "lr_schedulers" not in quantized and cb.state_key in quantized["callbacks"]
    with pytest.raises(ValueError, match="`checkpoint_name` must be a file name"):
        Quantization(when="fit_end", checkpoint_name="a/b.ckpt")


class _Bag(pl.LightningModule):
    """A text classifier: an embedding table (most of the weights), mean-pooled, a Linear head pair."""

    def __init__(self, vocab: int = 512, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(self.emb(ids).mean(1))))

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return nn.functional.cross_entropy(self(ids), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _ids_data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 512, (64, 12), generator=g), torch.randint(0, 4, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, y), batch_size=16)


def test_embeddings_are_quantized_to_int8_when_asked_and_replayed(tmp_path):
    """#24.10: with embeddings=True the embedding table goes int8 weight-only (torchao), is counted in the stored
    bytes, and a checkpoint replays it; without it the table stays float."""
    from lightning_accel.quantization.backends import footprint_of, registered_backends
    from lightning_accel.quantization.torchao import int8_embeddings, int8_layers

    with pytest.raises(ValueError, match="`embeddings`=True .* needs when='fit_end'"):
        Quantization(mode="int8", embeddings=True)
    plain, asked = _Bag(), _Bag()
    asked.load_state_dict(plain.state_dict())
    for model, embeddings in ((plain, False), (asked, True)):
        cb = Quantization(mode="int8", when="fit_end", backend="torchao", monitor=None, embeddings=embeddings)
        trainer = tiny_trainer(tmp_path / str(embeddings), max_epochs=1, limit_val_batches=0, callbacks=[cb])
        trainer.fit(model, _ids_data())
    assert set(int8_layers(plain)) == set(int8_layers(asked)) == {"fc1"} and not int8_embeddings(plain)
    assert set(int8_embeddings(asked)) == {"emb"}
    size = footprint_of(asked, registered_backends().values())
    assert size["by_backend"]["torchao_embedding"]["weights"] == 512 * 32
    assert size["by_backend"]["torchao_embedding"]["bits_per_weight"] == pytest.approx(8 + 32 / 32)  # int8 + a float scale per row
    ids = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rel = (asked(ids) - plain(ids)).abs().max() / plain(ids).abs().max()
    assert 0 < rel < 0.05  # the int8 table is what changed
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    fresh = lightning_accel.load_checkpoint(_Bag(), tmp_path / "q.ckpt")
    assert set(int8_embeddings(fresh)) == {"emb"}
    with torch.no_grad():
        assert torch.equal(fresh(ids), asked.eval()(ids))
