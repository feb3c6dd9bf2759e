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

ARCHS = ["bert", "vit", "timm"]


def _heads(model: RealClassifier) -> list[int]:
    return [
        getattr(m, "num_heads", None) or m.num_attention_heads
        for m in model.modules()
        if type(m).__name__ in ("BertSelfAttention", "ViTAttention", "TimmAttention")
    ]


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
    assert _heads(model) == [2, 2]
    if arch != "timm":
        assert model.model.config.num_attention_heads == 2
    x = model.sample()
    expected = _outputs(model, x)

    fresh = RealClassifier(arch)
    prune2 = StructuredPruning(amount=0.5, schedule="one_shot", interval="step", start=1, end=1, verbose=0)
    trainer2 = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[prune2])
    trainer2.fit(fresh, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert _heads(fresh) == [2, 2] and trainer2.global_step == 4

    loaded = lightning_accel.load_checkpoint(RealClassifier, str(tmp_path / "ckpt" / "last.ckpt"))
    assert _heads(loaded) == [2, 2]
    torch.testing.assert_close(_outputs(loaded, x), expected)
