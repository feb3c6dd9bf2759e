"""Real architectures (#16): Hugging Face ``BertForSequenceClassification`` and ``ViTForImageClassification`` built
from tiny configs with random weights, and a timm-style ViT (``tests/helpers/real.py``), fed dict batches without an
``example_input_array``. Every callback alone, then ``StructuredPruning + Quantization(when="fit_end")``, then a
resume from a checkpoint into a freshly built model and ``lightning_accel.load_checkpoint``.

torchvision (and timm, which imports it) is not tested: the registry's torchvision wheel for torch 2.13 is a CUDA
build whose operators fail to register beside the CPU torch (``import torchvision`` raises), see
``test_torchvision_cnns``.
"""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_accel
from lightning_accel import StructuredPruning
from tests.helpers import tiny_trainer
from tests.helpers.real import RealClassifier

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers", reason="the Hugging Face models need `transformers` (the `dev` extra)")

ARCHS = ["bert", "vit", "timm", "mobilenet"]


def _heads(model: RealClassifier) -> list[int]:
    return [
        getattr(m, "num_heads", None) or m.num_attention_heads
        for m in model.modules()
        if type(m).__name__ in ("BertSelfAttention", "ViTAttention", "TimmAttention")
    ]


def _pruned(model: RealClassifier, prune_heads: bool = True) -> bool:
    """Half the heads of every attention (or half of every head's size), or half the CNN's stem channels."""
    if model.arch == "mobilenet":
        return model.model.features[0][0].out_channels == 8
    attention = [m for m in model.modules() if type(m).__name__ in ("BertSelfAttention", "ViTAttention", "TimmAttention")]
    sizes = [getattr(m, "head_dim", None) or m.attention_head_size for m in attention]
    return _heads(model) == ([2, 2] if prune_heads else [4, 4]) and sizes == ([8, 8] if prune_heads else [4, 4])


def _n_int8(model: RealClassifier) -> int:
    """int8 Linear layers (torchao) and int8 convolutions (PT2E)."""
    from lightning_accel.quantization.torchao import int8_layers

    return len(int8_layers(model)) + sum(type(m).__name__ == "Int8Conv" for m in model.modules())


def _outputs(model: RealClassifier, x: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**x)


@pytest.mark.parametrize("arch", ARCHS)
def test_structured_pruning_resumes_into_a_fresh_model_and_loads(tmp_path, arch):
    """Heads and FFN neurons go during the fit; the checkpoint resumes into a freshly built model (pruning replayed
    before the weights load) and ``load_checkpoint`` rebuilds the same function."""
    model = RealClassifier(arch)
    prune = StructuredPruning(amount=0.5, schedule="one_shot", interval="step", start=1, end=1, verbose=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[prune, ckpt], enable_checkpointing=True)
    trainer.fit(model)
    assert _pruned(model)
    if arch in ("bert", "vit"):
        assert model.model.config.num_attention_heads == 2
    x = model.sample()
    expected = _outputs(model, x)

    fresh = RealClassifier(arch)
    prune2 = StructuredPruning(amount=0.5, schedule="one_shot", interval="step", start=1, end=1, verbose=0)
    trainer2 = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[prune2])
    trainer2.fit(fresh, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert _pruned(fresh) and trainer2.global_step == 4

    loaded = lightning_accel.load_checkpoint(RealClassifier, str(tmp_path / "ckpt" / "last.ckpt"))
    assert _pruned(loaded)
    torch.testing.assert_close(_outputs(loaded, x), expected)


def _fit(tmp_path, model: RealClassifier, callbacks: list, **kwargs) -> object:
    defaults = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=callbacks)
    defaults.update(kwargs)
    trainer = tiny_trainer(tmp_path, **defaults)
    trainer.fit(model)
    return trainer


def _zero_fraction(model: RealClassifier) -> float:
    from lightning_accel._select import output_layer_name

    head = output_layer_name(model)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n != head]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _case(name: str):
    """(callbacks, check(trainer, model, callbacks)) for one technique."""
    from lightning_accel import (
        EightBitOptimizer,
        KnowledgeDistillation,
        MixedPrecision,
        Quantization,
        QuantizationAwareTraining,
        ScheduledPruning,
        TorchCompile,
    )

    if name == "scheduled_pruning":
        return [ScheduledPruning(amount=0.5, schedule="one_shot", start=1, end=1, verbose=0)], (
            lambda t, m, cbs: _zero_fraction(m) >= 0.45
        )
    if name == "structured_pruning":
        return [StructuredPruning(amount=0.5, schedule="one_shot", interval="step", start=1, end=1, prune_heads=False, verbose=0)], (
            lambda t, m, cbs: _pruned(m, prune_heads=False)
        )
    if name == "int8_fit_end":
        return [Quantization(mode="int8", when="fit_end", monitor=None)], (
            lambda t, m, cbs: _n_int8(m) >= 8
        )
    if name == "nf4_adapters":
        return [Quantization(mode="nf4", adapter_rank=4)], (
            lambda t, m, cbs: sum(p.numel() for p in m.parameters() if p.requires_grad) < 0.5 * sum(p.numel() for p in m.parameters())
            and any("Linear4bit" in type(x).__name__ for x in m.modules())
        )
    if name == "qat":
        return [QuantizationAwareTraining(bits=8)], (lambda t, m, cbs: _n_int8(m) >= 8)
    if name == "eight_bit_optimizer":
        return [EightBitOptimizer(min_size=256)], (lambda t, m, cbs: "8bit" in type(t.optimizers[0]).__name__)
    if name == "mixed_precision":
        return [MixedPrecision(dtype="bf16")], (lambda t, m, cbs: cbs[0].choice is not None and "bf16" in str(cbs[0].choice))
    if name == "compile":
        return [TorchCompile(backend="aot_eager")], (lambda t, m, cbs: t.global_step == 2)
    if name == "distillation":
        prune = StructuredPruning(amount=0.5, schedule="one_shot", interval="step", start=1, end=1, verbose=0)
        return [KnowledgeDistillation(alpha=0.5, verbose=0), prune], (
            lambda t, m, cbs: _pruned(m) and cbs[0].metrics["distill/loss"] > 0 and not any("teacher" in k for k in m.state_dict())
        )
    raise KeyError(name)


CASES = ["scheduled_pruning", "structured_pruning", "int8_fit_end", "nf4_adapters", "qat", "eight_bit_optimizer",
         "mixed_precision", "compile", "distillation"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_callback_alone(tmp_path, arch, case):
    model = RealClassifier(arch)
    callbacks, check = _case(case)
    trainer = _fit(tmp_path, model, callbacks)
    assert check(trainer, model, callbacks), f"{case} had no effect on {arch}"
    out = _outputs(model, model.sample())
    assert out.shape == (4, 3) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_structured_pruning_then_int8_and_the_quantized_checkpoint_loads(tmp_path, arch):
    """The recipe of docs/real-models.md: distillation from the unpruned model, heads and FFN neurons pruned (Hugging Face: the
    hidden size kept by excluding the embeddings), int8 at fit end, ``quantized.ckpt`` through ``load_checkpoint``."""
    from lightning_accel import KnowledgeDistillation, Quantization
    from lightning_accel.quantization.torchao import int8_layers

    model = RealClassifier(arch)
    exclude = ["embeddings"] if arch in ("bert", "vit") else None
    prune = StructuredPruning(amount=0.5, schedule="one_shot", interval="step", start=1, end=1, exclude=exclude, verbose=0)
    quant = Quantization(mode="int8", when="fit_end", monitor=None)
    _fit(tmp_path, model, [KnowledgeDistillation(alpha=0.5, verbose=0), prune, quant], enable_checkpointing=True)
    assert _pruned(model) and _n_int8(model) >= 8
    if exclude:
        hidden = [m.normalized_shape[0] for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert set(hidden) == {32}  # the residual stream kept its width
        assert {m.out_features for n, m in model.named_modules() if n.endswith(("intermediate.dense", "mlp.fc1"))} == {32}
    x = model.sample()
    expected = _outputs(model, x)
    loaded = lightning_accel.load_checkpoint(RealClassifier, quant.quantized_checkpoint_path)
    assert _pruned(loaded) and _n_int8(loaded) == _n_int8(model) and set(int8_layers(loaded)) == set(int8_layers(model))
    torch.testing.assert_close(_outputs(loaded, x), expected)


def test_torchvision_cnns():
    """ResNet-18 / MobileNetV3 only where a torchvision matching the installed torch imports (CPU build)."""
    try:
        import torchvision
    except Exception as err:  # the CUDA wheel beside a CPU torch raises RuntimeError, not ImportError
        pytest.skip(
            f"no importable torchvision beside torch {torch.__version__} ({type(err).__name__}: {str(err)[:120]}); the "
            "registry's torchvision 0.28 wheel is a CUDA build whose operators fail to register with a CPU torch"
        )
    from lightning_accel.pruning.structured import prune_structured_

    for make in (torchvision.models.resnet18, torchvision.models.mobilenet_v3_small):
        model = make(num_classes=3).eval()
        x = torch.randn(1, 3, 32, 32)
        prune_structured_(model, x, amount=0.5)
        assert model(x).shape == (1, 3)


def test_nf4_on_bert_never_reaches_the_network_with_kernels_installed(tmp_path):
    """transformers pulls in ``kernels``, with which bitsandbytes would fetch CPU 4-bit kernels from a model hub at
    import; in a fresh interpreter, hub access enabled, ``kernels.get_kernel`` and every socket connection recorded,
    neither is attempted."""
    pytest.importorskip("kernels", reason="the network path only exists with `kernels` installed")
    from tests.helpers import run_python

    proc = run_python(
        """
        import os, socket
        os.environ.pop("HF_HUB_OFFLINE", None)
        attempts = []
        def connect(self, address, *args, **kwargs):
            attempts.append(address)
            raise OSError("no network in this test")
        socket.socket.connect = connect
        import kernels, transformers  # noqa: F401  (both importable, as in a user's environment)
        hub_calls = []
        _get_kernel = kernels.get_kernel
        def get_kernel(*args, **kwargs):  # what bitsandbytes calls at import to fetch its CPU kernels
            hub_calls.append(args)
            return _get_kernel(*args, **kwargs)
        kernels.get_kernel = get_kernel
        from lightning_accel import Quantization
        from tests.helpers import tiny_trainer
        from tests.helpers.real import RealClassifier

        model = RealClassifier("bert")
        trainer = tiny_trainer(".", max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                               callbacks=[Quantization(mode="nf4", adapter_rank=4)])
        trainer.fit(model)
        assert any("Linear4bit" in type(m).__name__ for m in model.modules())
        print("ATTEMPTS", attempts, "HUB", hub_calls)
        """,
        tmp_path,
    )
    assert "ATTEMPTS [] HUB []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
