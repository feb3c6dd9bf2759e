"""Two real digit classifiers: a residual CNN and a Transformer encoder over image patches.

Both share :class:`DigitsClassifier`: cross-entropy training, ``val_acc``/``test_acc`` from torchmetrics,
AdamW or SGD with an optional per-step cosine schedule, and an ``example_input_array``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_accel._validate import check_choice, check_int, check_number

__all__ = ["Attention", "Block", "DigitsClassifier", "DigitsTransformer", "ResidualCNN"]


class DigitsClassifier(pl.LightningModule):
    """Training logic shared by the digit models; subclasses build ``self`` layers and ``forward``.

    Args:
        num_classes: size of the output layer, e.g. ``10``.
        lr: peak learning rate, e.g. ``3e-3``.
        weight_decay: decoupled weight decay, e.g. ``1e-4``.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum 0.9, Nesterov).
        scheduler: ``"cosine"`` (per-step cosine decay over the whole fit) or ``"none"``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        scheduler: Literal["cosine", "none"] = "cosine",
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, low=2)
        check_number("lr", lr, low=0.0, low_inclusive=False)
        check_number("weight_decay", weight_decay, low=0.0)
        check_choice("optimizer", optimizer, ("adamw", "adam", "sgd"))
        check_choice("scheduler", scheduler, ("cosine", "none"))
        self.num_classes = num_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.scheduler_name = scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        metric = getattr(self, f"{stage}_acc")
        metric(logits.detach().float(), y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, prog_bar=stage != "test", on_step=on_step, on_epoch=True, sync_dist=stage != "train")
        self.log(f"{stage}_acc", metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay
            )
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.scheduler_name == "none":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _Cosine(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Cosine:
    """Picklable cosine decay to 1% of the peak over ``total`` steps (a lambda would not pickle)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, step: int) -> float:
        p = min(step / self.total, 1.0)
        return 0.01 + 0.99 * 0.5 * (1.0 + torch.cos(torch.tensor(p * torch.pi)).item())


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResidualCNN(DigitsClassifier):
    """Residual CNN: a stem, two stages of residual blocks (the second at twice the width and half the
    resolution), global average pooling and a linear head.

    Args:
        width: channels of the first stage, e.g. ``32``.
        depth: residual blocks per stage, e.g. ``2``.
        **kwargs: :class:`DigitsClassifier` arguments (``lr``, ``optimizer``, ...).
    """

    def __init__(self, width: int = 32, depth: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_int("width", width, low=1)
        check_int("depth", depth, low=1)
        self.save_hyperparameters()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks = []
        c = width
        for stage, c_out in enumerate((width, 2 * width)):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(c, c_out, stride))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear and an output ``proj`` Linear.

    Heads are read from ``num_heads`` and the head size from the ``qkv`` width at run time, so structured
    pruning can remove whole heads (update ``num_heads``) or head dimensions without code changes.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by `heads` ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm Transformer encoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsTransformer(DigitsClassifier):
    """Transformer encoder classifier: square image patches are tokens.

    ``patch_size=4`` turns an 8x8 digit into 4 tokens of 16 pixels (``2``: 16 tokens of 4); each is embedded by a Linear layer,
    given a learned position embedding, passed through ``depth`` pre-norm blocks, mean-pooled and
    classified by a linear head.

    Args:
        dim: token width, e.g. ``64``.
        depth: encoder blocks, e.g. ``2``.
        heads: attention heads per block (must divide ``dim``), e.g. ``4``.
        mlp_ratio: MLP hidden width over ``dim``, e.g. ``2.0``.
        patch_size: side of a square patch, a divisor of 8, e.g. ``4``.
        dropout: dropout in attention and MLP, e.g. ``0.0``.
        **kwargs: :class:`DigitsClassifier` arguments (``lr``, ``optimizer``, ...).
    """

    def __init__(
        self,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        patch_size: int = 4,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_int("dim", dim, low=1)
        check_int("depth", depth, low=1)
        check_int("heads", heads, low=1)
        check_number("mlp_ratio", mlp_ratio, low=0.0, low_inclusive=False)
        check_choice("patch_size", patch_size, (1, 2, 4, 8))
        check_number("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        if dim % heads:
            raise ValueError(f"`dim` must be divisible by `heads`; got dim={dim}, heads={heads}")
        self.save_hyperparameters()
        self.patch_size = patch_size
        tokens = (8 // patch_size) ** 2
        self.embed = nn.Linear(patch_size * patch_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.num_classes)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 8, 8]`` images to ``[B, tokens, patch_size**2]`` patches."""
        p = self.patch_size
        b = x.shape[0]
        x = x.reshape(b, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4)
        return x.reshape(b, (8 // p) ** 2, p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.patchify(x)) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))
