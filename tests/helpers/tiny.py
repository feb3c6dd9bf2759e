"""Tiny models and data that train in well under a second."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_accel.demos import EpochSeededSampler


class RandomDataModule(pl.LightningDataModule):
    """Seeded random classification data of a given input shape; the training order depends only on the
    epoch (resumable from epoch-end checkpoints)."""

    def __init__(self, shape: tuple[int, ...] = (16,), n: int = 128, classes: int = 4, batch_size: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, *shape, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        ds = TensorDataset(self.x, self.y)
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochSeededSampler(len(ds)))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class _Classifier(pl.LightningModule):
    def __init__(self, lr: float = 1e-2, optimizer: str = "adamw") -> None:
        super().__init__()
        self.lr = lr
        self.optimizer_name = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TinyMLP(_Classifier):
    """``fc1 -> relu -> fc2 -> relu -> head``."""

    def __init__(self, d_in: int = 16, hidden: int = 32, classes: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        self.example_input_array = torch.zeros(2, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class TinyConvNet(_Classifier):
    """Two convs with BatchNorm, a residual add, pooling and a head; inputs ``[B, 1, 8, 8]``."""

    def __init__(self, width: int = 8, classes: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(h + self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoderLayer``: torch's MultiheadAttention, whose embed_dim must stay a multiple of its heads.
    Input ``(batch, tokens, 4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 24)
        self.enc = nn.TransformerEncoderLayer(24, 4, 48, batch_first=True, dropout=0.0)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.embed(x)).mean(1))


def tiny_trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer rooted in ``tmp_path``."""
    defaults: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
