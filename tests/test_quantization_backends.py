"""The quantization backend protocol and its registry: registration, lookup, dispatch of ``quantize_`` by mode."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import lightning_accel
from lightning_accel import NoMatchError
from lightning_accel.quantization import backends as registry
from lightning_accel.quantization.backends import (
    QuantConfig,
    QuantizationBackend,
    backends_of,
    footprint_of,
    get_backend,
    register_backend,
    select_layers,
    unregister_backend,
)
from lightning_accel.quantization.replay import replay_quantization
from lightning_accel.report.measure import count_params, measure_model
from tests.helpers import TinyMLP


class _Halved(nn.Linear):
    """A toy "quantized" layer: the float weight rounded to halves."""


class HalfBackend(QuantizationBackend):
    """A toy backend registered by the tests: Linear weights rounded to multiples of 0.5."""

    name = "halves-test"
    family = "halves-test"
    modes = ("half",)
    layer_types = (nn.Linear,)
    layer_kind = "Linear layers"

    def is_quantized(self, module: nn.Module) -> bool:
        return isinstance(module, _Halved)

    def pick(self, model: nn.Module, candidates: Any, *, strict: bool) -> dict[str, nn.Module]:
        return {n: m for n, m in candidates.items() if type(m) is nn.Linear}

    def quantize_(self, model: nn.Module, layers: Any, config: QuantConfig) -> dict[str, Any]:
        originals = {}
        for name, layer in layers.items():
            new = _Halved(layer.in_features, layer.out_features, layer.bias is not None)
            with torch.no_grad():
                new.weight.copy_(torch.round(layer.weight * 2) / 2)
                if layer.bias is not None:
                    new.bias.copy_(layer.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            originals[name] = layer
        return originals

    def restore_float_(self, model: nn.Module) -> list[str]:
        return []

    def record(self, model: nn.Module, config: QuantConfig) -> dict[str, Any]:
        return {"modules": list(self.quantized_layers(model)), "mode": "half"}

    def replay_(self, model: nn.Module, state: Any) -> None:
        layers = {n: model.get_submodule(n) for n in state["modules"] if not self.is_quantized(model.get_submodule(n))}
        self.quantize_(model, layers, QuantConfig(mode="half"))

    def footprint(self, model: nn.Module) -> dict[str, Any]:
        layers = self.quantized_layers(model)
        weights = sum(m.weight.numel() for m in layers.values())
        return {"layers": len(layers), "weights": weights, "bytes": weights // 4, "bits_per_weight": 2.0}

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.detach()


@pytest.fixture
def halves():
    backend = register_backend(HalfBackend())
    yield backend
    unregister_backend(backend.name)


def test_built_in_backends_are_registered_in_order():
    assert list(registry.registered_backends())[:4] == ["bitsandbytes", "torchao", "torchao_embedding", "pt2e"]
    assert [b.name for b in backends_of("torchao")] == ["torchao", "torchao_embedding", "pt2e"]
    assert get_backend("torchao_embedding").embeddings and not get_backend("torchao").embeddings
    assert [b.name for b in backends_of("bitsandbytes")] == ["bitsandbytes"]
    assert get_backend("bitsandbytes").trainable_base and not get_backend("torchao").trainable_base
    assert get_backend("pt2e").needs_calibration and get_backend("pt2e").family == "torchao"


def test_a_registered_backend_is_found_by_name_and_family(halves):
    assert get_backend("halves-test") is halves
    assert backends_of("halves-test") == (halves,)
    assert "halves-test" in registry.registered_backends()


def test_an_unknown_name_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match=r"`backend` must be one of 'bitsandbytes', 'torchao', 'torchao_embedding', 'pt2e'.*; got 'nope'"):
        get_backend("nope")
    with pytest.raises(ValueError, match=r"`backend` must be one of 'bitsandbytes', 'torchao'.*; got 'nope'"):
        backends_of("nope")
    with pytest.raises(ValueError, match=r"`backend` must be one of 'bitsandbytes', 'torchao', 'torchao_embedding', 'pt2e'.*; got 'nope'"):
        lightning_accel.quantize_(TinyMLP(), mode="int8", backend="nope")


def test_registration_is_checked():
    with pytest.raises(TypeError, match="must be a QuantizationBackend instance"):
        register_backend(object())  # type: ignore[arg-type]

    class Nameless(QuantizationBackend):
        pass

    with pytest.raises(ValueError, match="no `name`"):
        register_backend(Nameless())

    class Impostor(HalfBackend):
        name = "bitsandbytes"

    with pytest.raises(ValueError, match="already registered as 'bitsandbytes'"):
        register_backend(Impostor())
    assert type(get_backend("bitsandbytes")).__name__ == "BitsandbytesBackend"


def test_quantize_dispatches_by_mode_to_a_registered_backend(halves):
    model = TinyMLP()
    ref = copy.deepcopy(model)
    originals = lightning_accel.quantize_(model, mode="half")  # "auto": the one backend with this mode
    assert set(originals) == set(halves.quantized_layers(model)) == {"fc1", "fc2"}  # every Linear but the output layer
    assert isinstance(model.fc1, _Halved) and type(model.head) is nn.Linear
    assert torch.equal(model.fc1.weight, torch.round(ref.fc1.weight * 2) / 2)
    halves.restore_(model, originals)
    assert type(model.fc1) is nn.Linear and torch.equal(model.fc1.weight, ref.fc1.weight)
    assert not halves.quantized_layers(model)


def test_quantize_auto_keeps_bitsandbytes_for_its_modes(halves):
    pytest.importorskip("bitsandbytes")
    model = TinyMLP()
    lightning_accel.quantize_(model, "int8", None, None, True, 64, "fp32")  # the positional signature of 0.1
    assert set(get_backend("bitsandbytes").quantized_layers(model)) == {"fc1", "fc2"}
    assert not halves.quantized_layers(model)


def test_quantize_by_backend_name_and_mode_checks():
    pytest.importorskip("torchao")
    model = TinyMLP()
    lightning_accel.quantize_(model, mode="int8", backend="torchao")
    assert set(get_backend("torchao").quantized_layers(model)) == {"fc1", "fc2"}
    with pytest.raises(ValueError, match="`mode` must be one of 'int8'; got 'nf4'"):
        lightning_accel.quantize_(TinyMLP(), mode="nf4", backend="torchao")
    with pytest.raises(ValueError, match="`mode` must be one of 'int8', 'nf4', 'fp4'; got 'int3'"):
        lightning_accel.quantize_(TinyMLP(), mode="int3")


def test_pt2e_through_quantize_needs_calibration():
    pytest.importorskip("torchao")
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="`calibration` batches are needed"):
        lightning_accel.quantize_(model, mode="int8", backend="pt2e")
    batches = [torch.rand(2, 1, 8, 8) for _ in range(2)]
    lightning_accel.quantize_(model, mode="int8", backend="pt2e", calibration=batches)
    assert list(get_backend("pt2e").quantized_layers(model)) == ["0"]  # the last conv is the output layer
    assert get_backend("pt2e").restore_float_(model) == ["0"] and type(model[0]) is nn.Conv2d


def test_select_layers_and_footprint_go_through_each_backend(halves):
    model = TinyMLP()
    picked = select_layers(model, (halves,), modules=["fc2", "head"])
    assert list(picked["halves-test"]) == ["fc2", "head"]
    with pytest.raises(NoMatchError, match="has no nn.Linear layer to quantize"):
        select_layers(nn.Sequential(nn.ReLU()), (halves,))
    halves.quantize_(model, picked["halves-test"], QuantConfig(mode="half"))
    foot = footprint_of(model, (halves,))
    assert foot["layers"] == 2 and foot["bits_per_weight"] == pytest.approx(8.0 * foot["bytes"] / foot["weights"])
    assert foot["by_backend"]["halves-test"]["layers"] == 2


def test_replay_goes_through_the_recorded_family(halves):
    model = TinyMLP()
    halves.quantize_(model, {"fc1": model.fc1}, QuantConfig(mode="half"))
    state = {"applied": True, "backend": "halves-test", **halves.record(model, QuantConfig(mode="half"))}
    fresh = TinyMLP()
    replay_quantization(fresh, state)
    assert isinstance(fresh.fc1, _Halved)
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="`backend` must be one of .*; got 'gone'"):
        replay_quantization(TinyMLP(), {"applied": True, "backend": "gone"})


def test_report_counts_layers_of_any_backend(halves):
    model = TinyMLP()
    before = count_params(model)
    lightning_accel.quantize_(model, mode="half")
    assert measure_model(model, None)["quantized_layers"] == 2
    assert count_params(model)["params"] == before["params"]
