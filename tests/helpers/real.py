"""Real architectures with random weights (nothing is downloaded): Hugging Face BERT and ViT built from tiny
configs, and a timm-style ViT (timm's ``Attention`` / ``Mlp`` / ``Block`` written out faithfully, because timm
needs torchvision, whose registry wheel is a CUDA build that does not import beside the CPU torch).

Every model is a LightningModule taking dict batches, the way Hugging Face models are fed.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

VOCAB, SEQ, CLASSES, IMAGE = 64, 8, 3, 16


# ------------------------------------------------------------------------------------------------ timm-style


class TimmAttention(nn.Module):
    """timm 1.0's ``timm.layers.Attention`` (fused ``qkv``; ``num_heads``, ``head_dim`` and ``attn_dim`` attributes;
    ``reshape(B, N, self.attn_dim)``), without the optional q/k norms and gating."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False) -> None:
        super().__init__()
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))


class TimmMlp(nn.Module):
    """timm's ``Mlp``: ``fc1 -> GELU -> fc2``."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmBlock(nn.Module):
    """timm's ViT ``Block`` (pre-norm, residual attention then MLP; layer scale and drop path are identities)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, num_heads, qkv_bias=True)
        self.ls1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TimmMlp(dim, int(dim * mlp_ratio))
        self.ls2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# ------------------------------------------------------------------------------------------------ data


class _DictRows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def _rows(arch: str, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        label = torch.randint(0, CLASSES, (), generator=g)
        if arch == "bert":
            ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
            mask = torch.ones(SEQ, dtype=torch.long)
            mask[SEQ - int(label) - 1 :] = 0  # padded tails of different lengths
            rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": label})
        else:
            x = torch.randn(3, IMAGE, IMAGE, generator=g) + label.float()
            rows.append({"pixel_values": x, "labels": label})
    return rows


# ------------------------------------------------------------------------------------------------ models


def build_backbone(arch: str, heads: int = 4) -> nn.Module:
    """A tiny model of ``arch`` (``"bert"``, ``"vit"``: Hugging Face; ``"timm"``: timm-style ViT; ``"mobilenet"``:
    torchvision-style MobileNetV3) with random weights: 2 layers, hidden 32, ``heads`` heads, FFN 64."""
    if arch == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=64,
            max_position_embeddings=SEQ, num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return BertForSequenceClassification(config)
    if arch == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
            intermediate_size=64, num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return ViTForImageClassification(config)
    if arch == "timm":
        return TimmViT(heads=heads)
    if arch == "mobilenet":
        return MobileNetV3Style()
    raise ValueError(f"`arch` must be one of 'bert', 'vit', 'timm', 'mobilenet'; got {arch!r}")


class TimmViT(nn.Module):
    """timm's ``VisionTransformer`` reduced to its parts: conv patch embedding, class token, learned position
    embedding, ``Block`` s, final norm, head on the class token."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, patch: int = 8) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (IMAGE // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(TimmBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class SqueezeExcitation(nn.Module):
    """torchvision's ``ops.SqueezeExcitation``: pooled 1x1 convs rescale the channels of their input."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV3 ``InvertedResidual``: 1x1 expand, depthwise conv, squeeze-excitation, 1x1 project,
    residual add when shapes allow (every conv followed by BatchNorm)."""

    def __init__(self, cin: int, expanded: int, cout: int, stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish(),
            nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish(),
            SqueezeExcitation(expanded, max(8, expanded // 4)),
            nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3Style(nn.Module):
    """torchvision's ``mobilenet_v3_small`` in miniature (stem, two inverted residuals with squeeze-excitation, the
    last with a residual add, 1x1 conv, pooled classifier ``Linear -> Hardswish -> Dropout -> Linear``), for where
    torchvision itself does not import."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()),
            InvertedResidual(16, 32, 16, 2),
            InvertedResidual(16, 48, 16, 1),
            nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.Hardswish()),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(48, 64), nn.Hardswish(), nn.Dropout(0.0), nn.Linear(64, CLASSES))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(pixel_values)), 1))


class RealClassifier(pl.LightningModule):
    """A LightningModule around :func:`build_backbone`: dict batches (``input_ids`` / ``attention_mask`` or
    ``pixel_values``, and ``labels``), ``forward`` with the model's own keyword arguments, logits out. No
    ``example_input_array``: the callbacks record the first forward call."""

    def __init__(self, arch: str = "bert", heads: int = 4, lr: float = 1e-3, n: int = 24, batch_size: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.arch = arch
        self.model = build_backbone(arch, heads)

    def forward(self, input_ids: Any = None, attention_mask: Any = None, pixel_values: Any = None) -> torch.Tensor:
        if self.arch == "bert":
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        out = self.model(pixel_values=pixel_values)
        return out if isinstance(out, torch.Tensor) else out.logits

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != "labels"}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(**self.inputs(batch)), batch["labels"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(**self.inputs(batch)), batch["labels"]))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_DictRows(_rows(self.arch, self.hparams.n, 0)), batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_DictRows(_rows(self.arch, self.hparams.batch_size, 1)), batch_size=self.hparams.batch_size)

    def sample(self, n: int = 4) -> dict[str, torch.Tensor]:
        """``n`` fixed inputs (no labels), for comparing outputs."""
        rows = _rows(self.arch, n, 2)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "labels"}
