"""Static int8 convolutions (torchao's PT2E x86 recipe) in ``Quantization``: the core against ``convert_pt2e``, the
callback on CNNs, checkpoints, export and errors."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_accel
from lightning_accel import Quantization, load_checkpoint
from lightning_accel.quantization.backends import backends_of
from lightning_accel.quantization.plan import select_for
from lightning_accel.quantization.pt2e import (
    Int8Conv,
    calibrate_,
    int8_convs,
    quantize_convs_int8_,
    restore_convs_,
    select_int8_layers,
)
from lightning_accel.quantization.torchao import int8_layers
from tests.helpers import RandomDataModule, tiny_trainer
from tests.helpers.tiny import TinyConvNet, _Classifier

#: int8 vs float on these tiny layers: one quantization step of the input and of the weight per product
INT8_ATOL = 0.05


def _data(n: int = 4, shape: tuple[int, ...] = (1, 8, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, *shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(4, 8, (1, 3), stride=(1, 2)), nn.Conv2d(8, 8, 3, groups=8)])
def test_int8_conv_computes_what_convert_pt2e_produces(conv):
    """Same observers, same calibration data: the swapped-in layer equals PT2E's X86InductorQuantizer result."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    torch.manual_seed(0)
    conv.eval()
    shape = (conv.in_channels, 8, 8)
    batches = [torch.relu(b) for b in _data(3, shape)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(conv, (batches[0],)).module()
        prepared = prepare_pt2e(program, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
        for b in batches:
            prepared(b)
        reference = convert_pt2e(prepared)
    holder = nn.Sequential(conv)
    observers = calibrate_(holder, {"0": conv}, batches, lambda b: holder(b))
    quantize_convs_int8_(holder, {"0": conv}, observers)
    assert isinstance(holder[0], Int8Conv) and holder[0].weight.dtype == torch.int8
    x = batches[1]
    with torch.no_grad():
        assert torch.allclose(holder(x), reference(x), atol=1e-5)
        assert not torch.equal(holder(x), conv(x))  # it is quantized
        assert torch.allclose(holder(x), conv(x), atol=INT8_ATOL)


def test_a_conv1d_is_the_equivalent_conv2d_of_height_one():
    torch.manual_seed(0)
    conv1 = nn.Conv1d(4, 8, 3, stride=2, padding=1, dilation=2).eval()
    conv2 = nn.Conv2d(4, 8, (1, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2)).eval()
    with torch.no_grad():
        conv2.weight.copy_(conv1.weight.unsqueeze(2))
        conv2.bias.copy_(conv1.bias)
    q1, q2 = Int8Conv.from_float(conv1, 0.02, 3), Int8Conv.from_float(conv2, 0.02, 3)
    x = torch.rand(5, 4, 20) * 4  # inside the input range [-0.06, 5.04]
    with torch.no_grad():
        assert torch.equal(q1(x), q2(x.unsqueeze(2)).squeeze(2))
        assert torch.allclose(q1(x), conv1(x), atol=INT8_ATOL)
        back = q1.to_float()
        assert isinstance(back, nn.Conv1d) and torch.allclose(back(x), conv1(x), atol=INT8_ATOL)


def test_select_calibrate_restore_and_errors():
    model = TinyConvNet(width=8)
    linears, convs = select_int8_layers(model)
    assert linears == {} and list(convs) == ["conv1", "conv2"]  # the head is the output layer
    linears, convs = select_int8_layers(model, modules=["conv2", "head"])
    assert list(linears) == ["head"] and list(convs) == ["conv2"]
    model.conv2.padding_mode = "reflect"
    assert list(select_int8_layers(model)[1]) == ["conv1"]
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        select_int8_layers(model, modules=["conv2"])
    model.conv2.padding_mode = "zeros"
    with pytest.raises(ValueError, match="calibration never ran the convolutions"):
        calibrate_(model, {"conv1": model.conv1}, [], model)
    x = _data(1)[0]
    before = model.eval()(x)
    _, convs = select_int8_layers(model)
    originals = quantize_convs_int8_(model, convs, calibrate_(model, convs, _data(), model))
    assert set(int8_convs(model)) == {"conv1", "conv2"}
    assert torch.allclose(model(x), before, atol=INT8_ATOL)
    restore_convs_(model, originals)
    assert int8_convs(model) == {} and torch.equal(model(x), before)


def test_quantization_int8_on_a_cnn_checkpoint_and_test(tmp_path):
    torch.manual_seed(0)
    model = TinyConvNet(width=8)
    quant = Quantization(mode="int8", when="fit_end", calibration_batches=3)
    trainer = tiny_trainer(tmp_path, enable_checkpointing=True, callbacks=[quant])
    data = RandomDataModule(shape=(1, 8, 8))
    trainer.fit(model, data)
    record = quant.record
    assert record["backend"] == "torchao" and record["convs"] == ["conv1", "conv2"] and record["modules"] == []
    assert abs(record["metric_after"] - record["metric_before"]) <= 0.1
    assert set(int8_convs(model)) == {"conv1", "conv2"}
    # the quantized checkpoint: plain tensors, int8 weights, replayed into a fresh float model
    ckpt = torch.load(quant.quantized_checkpoint_path, weights_only=True)
    assert ckpt["state_dict"]["conv1.weight"].dtype == torch.int8
    fresh = load_checkpoint(TinyConvNet, quant.quantized_checkpoint_path, width=8)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
    # Trainer.test(ckpt_path=) on a freshly built float model gives the in-memory quantized model's metric
    expected = trainer.test(model, data, verbose=False)[0]["test_acc"]
    again = tiny_trainer(tmp_path, callbacks=[Quantization(mode="int8", when="fit_end")])
    assert again.test(TinyConvNet(width=8), data, ckpt_path=quant.quantized_checkpoint_path, verbose=False)[0]["test_acc"] == expected


class _KwargConvNet(_Classifier):
    """A 1-d CNN whose forward takes keyword arguments and whose batches are dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, signal: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.conv(signal)).mean(-1)
        h = F.relu(self.mix(h)) * (1.0 if scale is None else scale[:, None])
        return self.head(h)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(signal=batch["signal"], scale=batch["scale"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        logits = self(signal=batch["signal"], scale=batch["scale"])
        self.log("val_acc", (logits.argmax(-1) == batch["y"]).float().mean())


class _DictData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.signal, self.y = torch.randn(64, 2, 16, generator=g), torch.randint(0, 4, (64,), generator=g)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"signal": self.signal[i], "scale": torch.tensor(1.0), "y": self.y[i]}


def test_conv1d_with_keyword_forward_and_dict_batches_exports(tmp_path):
    model = _KwargConvNet()
    loader = torch.utils.data.DataLoader(_DictData(), batch_size=16)
    quant = Quantization(mode="int8", when="fit_end", monitor=None, calibration_batches=2, export_path="m.pt2", export_compile=False)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[quant])
    trainer.fit(model, loader)
    assert list(int8_convs(model)) == ["conv"] and list(int8_layers(model)) == ["mix"]
    run = lightning_accel.load_exported(quant.exported_path)
    x, s = torch.randn(3, 2, 16), torch.ones(3)
    with torch.no_grad():
        assert torch.allclose(run(signal=x, scale=s), model.eval()(signal=x, scale=s), atol=1e-5)


def test_aoti_compiled_int8_cnn_matches_the_in_memory_model(tmp_path):
    """The file a user deploys: inductor lowers the int8 convolutions; its outputs match within 1e-4."""
    torch.manual_seed(0)
    model = TinyConvNet(width=8).eval()
    _, convs = select_int8_layers(model)
    quantize_convs_int8_(model, convs, calibrate_(model, convs, _data(), model))
    path = lightning_accel.export(model, torch.randn(2, 1, 8, 8), tmp_path / "cnn.pt2", compile=True)
    run = lightning_accel.load_exported(path)
    for batch in (1, 7):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(run(x), model(x), atol=1e-4)


def test_conv_errors_name_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="`calibration_batches` must be"):
        Quantization(mode="int8", when="fit_end", calibration_batches=0)
    conv_only = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    quant = Quantization(mode="int8", when="fit_end", backend="bitsandbytes")
    with pytest.raises(ValueError, match="int8 convolutions are mode='int8', backend='torchao' with when='fit_end'"):
        select_for(conv_only, backends_of("bitsandbytes"), quant.modules, quant.exclude)
    ddp = types.SimpleNamespace(world_size=2, strategy=types.SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(ValueError, match="`backend`='torchao' cannot run under DDP"):
        Quantization(mode="int8", when="fit_end", backend="torchao").accel_setup(ddp, TinyConvNet(), "fit")


class _ConvOnly(_Classifier):
    """A CNN without any Linear layer (a 1x1 convolution as the head): nothing bitsandbytes can quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("mode, when", [("nf4", "setup"), ("nf4", "fit_end"), ("fp4", "setup")])
def test_four_bit_on_a_cnn_says_linear_layers_and_the_int8_convolution_path(tmp_path, mode, when):
    """Quantization(mode="nf4") on a model of convolutions only: the error says that 4-bit needs Linear layers and
    that int8 convolutions are mode="int8", backend="torchao"; quantize_ names its convolution backend too."""
    quant = Quantization(mode=mode, when=when, monitor=None)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[quant])
    with pytest.raises(lightning_accel.NoMatchError) as err:
        trainer.fit(_ConvOnly(), RandomDataModule(shape=(1, 8, 8)))
    message = str(err.value)
    assert f"4-bit formats (mode={mode!r}) need Linear layers" in message, message
    assert "int8 convolutions are mode='int8', backend='torchao'" in message, message
    with pytest.raises(lightning_accel.NoMatchError) as err:
        lightning_accel.quantize_(_ConvOnly(), mode=mode)
    message = str(err.value)
    assert f"4-bit formats (mode={mode!r}) need Linear layers" in message, message
    assert "backend='pt2e'" in message and "calibration" in message, message


def test_quantization_exports_to_the_named_runtime(tmp_path):
    """Quantization(export_path=..., export_format="onnx"): the quantized model goes to ONNX Runtime through
    lightning_accel.export (int8 of the same layers), loadable by load_exported; a bad format is refused."""
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="`export_format` must be one of"):
        Quantization(mode="int8", when="fit_end", export_path="m.onnx", export_format="tflite")
    model = TinyConvNet(width=8)
    quant = Quantization(mode="int8", when="fit_end", monitor=None, calibration_batches=2, export_path="m.onnx", export_format="onnx")
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[quant])
    trainer.fit(model, RandomDataModule(shape=(1, 8, 8)))
    assert quant.exported_path is not None and quant.exported_path.endswith(".onnx")
    run = lightning_accel.load_exported(quant.exported_path)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        ref = model.eval()(x)
    assert (run(x) - ref).abs().max() <= 0.1 * ref.abs().max()
