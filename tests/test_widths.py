"""Width attributes libraries read back after structured pruning (#24.2): timm's ``num_features`` /
``head_hidden_size`` / ``embed_dim`` (``reset_classifier`` builds a head from them) and Hugging Face
``config.intermediate_size`` / ``hidden_size`` (``save_pretrained`` + ``from_pretrained`` rebuild from them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_accel import prune_structured_
from lightning_accel.errors import StructuredPruningWarning
from lightning_accel.pruning.widths import sync_widths_
from tests.helpers.real import CLASSES, SEQ, VOCAB, TimmViT, build_backbone


class TimmStyleResNet(nn.Module):
    """timm's ``ResNet`` contract: ``num_features`` / ``head_hidden_size`` hold the pooled width the classifier
    reads; ``reset_classifier(n)`` builds ``nn.Linear(self.num_features, n)``."""

    def __init__(self, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.num_features = self.head_hidden_size = 2 * width
        self.fc = nn.Linear(self.num_features, classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_timm_reset_classifier_fits_the_pruned_model():
    model = TimmStyleResNet()
    x = torch.randn(2, 3, 8, 8)
    prune_structured_(model, x, amount=0.5)
    assert model.fc.in_features == 32
    assert model.num_features == 32 and model.head_hidden_size == 32  # were 64: timm's head would not fit
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


class _TimmViTWithWidths(TimmViT):
    def __init__(self) -> None:
        super().__init__()
        self.embed_dim = self.num_features = self.head_hidden_size = 32


def test_timm_vit_embed_dim_follows_a_pruned_residual_stream():
    model = _TimmViTWithWidths()
    with torch.no_grad():  # as pruning the residual stream leaves it: every width 24
        model.cls_token = nn.Parameter(model.cls_token[..., :24].clone())
        model.pos_embed = nn.Parameter(model.pos_embed[..., :24].clone())
        model.norm = nn.LayerNorm(24)
        model.head = nn.Linear(24, CLASSES)
    changed = sync_widths_(model)
    assert changed == {"embed_dim": 24, "num_features": 24, "head_hidden_size": 24}
    assert sync_widths_(model) == {}  # idempotent


def test_batchnorm_num_features_is_not_a_model_width():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert sync_widths_(model) == {} and model[1].num_features == 4


def _bert_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1, VOCAB, (2, SEQ), generator=g), "attention_mask": torch.ones(2, SEQ, dtype=torch.long)}


def test_hf_config_follows_pruned_ffn_and_from_pretrained_rebuilds_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = build_backbone("bert").eval()
    inputs = _bert_inputs()
    prune_structured_(model, inputs, amount=0.5, prune_heads=False)
    widths = {m.out_features for n, m in model.named_modules() if n.endswith("intermediate.dense")}
    assert widths == {32}  # 64 -> 32 in every layer
    assert model.config.intermediate_size == 32
    assert model.config.hidden_size == model.bert.embeddings.word_embeddings.embedding_dim
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "pruned")
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected)


def test_hf_ffn_layers_of_different_widths_are_said_to_defeat_from_pretrained():
    pytest.importorskip("transformers")
    model = build_backbone("bert")
    layer = model.bert.encoder.layer[0]
    layer.intermediate.dense = nn.Linear(32, 16)
    layer.output.dense = nn.Linear(16, 32)
    with pytest.warns(StructuredPruningWarning, match=r"different widths \[16, 64\].*`intermediate_size`"):
        sync_widths_(model)
    assert model.config.intermediate_size == 64  # left as it was: no single width describes the model
