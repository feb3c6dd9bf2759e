"""What the monitored metric says now: the one way lightning-accel evaluates ``monitor`` on a model outside
Lightning's loops (sensitivity analysis, post-training quantization's accuracy guard, the pruning guard).

* :func:`validation_batches` collects the fit's validation batches (within ``limit_val_batches``), on the module's
  device; under DDP every rank gets every rank's shard.
* :class:`MonitoredMetric` runs the module's own ``validation_step`` on them with ``log`` captured and returns the
  value of ``monitor``.
* :func:`logged_metric` reads the value the last validation of the fit logged (``trainer.callback_metrics``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_accel._compat import transfer_batch, validation_loop
from lightning_accel._validate import check_logged

__all__ = ["MonitoredMetric", "logged_metric", "validation_batches"]


def logged_metric(trainer: pl.Trainer, pl_module: pl.LightningModule, monitor: str, owner: object) -> float:
    """The value of ``monitor`` the fit's last validation logged; ``ValueError`` naming ``owner`` (a callback)
    when the module does not log it."""
    check_logged(owner, monitor, trainer.callback_metrics, pl_module)
    return float(trainer.callback_metrics[monitor])


def validation_batches(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str) -> list[Any]:
    """The fit's first validation dataloader's batches (within ``limit_val_batches``), on the module's device; under
    DDP every rank's shard, gathered on every rank (rank order)."""
    if not is_overridden("validation_step", pl_module):
        raise ValueError(f"{owner} measures with `validation_step`, which {type(pl_module).__name__} does not define")
    if trainer.limit_val_batches == 0:
        raise ValueError(f"{owner} needs validation batches; the Trainer has `limit_val_batches=0`")
    loop = validation_loop(trainer)
    loop.setup_data()
    combined = loop._combined_loader
    if combined is None or not combined.flattened:
        raise ValueError(f"{owner} needs validation data; {type(pl_module).__name__}'s fit has no val_dataloader")
    loader = combined.flattened[0]
    limit = loop.max_batches[0] if loop.max_batches else float("inf")
    batches = []
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        batches.append(batch)
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, apply_to_collection(batches, torch.Tensor, lambda t: t.detach().cpu()))
        batches = [b for part in gathered for b in part]
    device = pl_module.device
    return [transfer_batch(pl_module, b, device) for b in batches]


class MonitoredMetric:
    """``evaluate(model, batches) -> float``: the value of ``monitor`` as the module's own ``validation_step`` logs
    it, over ``batches``, with ``self.log`` / ``self.log_dict`` captured (no nested Trainer call, no loop state
    touched). Logged numbers are averaged weighted by batch size, as Lightning's epoch-end mean does; a logged
    torchmetrics ``Metric`` is computed over all the batches. ``owner`` names the callback in errors."""

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, monitor: str, owner: str) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self.monitor = monitor
        self.owner = owner
        self.reset_metrics()

    def _metrics(self) -> list[nn.Module]:
        try:
            from torchmetrics import Metric
        except ImportError:  # pragma: no cover - torchmetrics comes with Lightning
            return []
        return [m for m in self.pl_module.modules() if isinstance(m, Metric)]

    def reset_metrics(self) -> None:
        for m in self._metrics():
            m.reset()  # type: ignore[operator]

    def __call__(self, model: nn.Module, batches: Sequence[Any]) -> float:
        module = self.pl_module
        total, weight = 0.0, 0
        logged: set[str] = set()
        metric_obj: Any = None
        current: list[Any] = [None]

        def log(name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
            nonlocal total, weight, metric_obj
            logged.add(name)
            if name != self.monitor:
                return
            if hasattr(value, "compute") and hasattr(value, "reset"):
                metric_obj = value
                return
            n = batch_size if batch_size is not None else extract_batch_size(current[0])
            total += float(value) * n
            weight += n

        def log_dict(dictionary: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
            for k, v in dict(dictionary).items():
                log(k, v, batch_size=batch_size)

        module.log = log  # type: ignore[method-assign]
        module.log_dict = log_dict  # type: ignore[method-assign]
        try:
            with self.trainer.strategy.precision_plugin.val_step_context():
                for i, batch in enumerate(batches):
                    current[0] = batch
                    module.validation_step(batch, i)
        finally:
            del module.__dict__["log"]
            del module.__dict__["log_dict"]
        if metric_obj is not None:
            value = float(metric_obj.compute())
            metric_obj.reset()
            return value
        if not weight:
            raise ValueError(
                f"{self.owner} `monitor`={self.monitor!r} is not logged by {type(module).__name__}.validation_step; "
                f"it logs {sorted(logged)}. Set `monitor` to one of them"
            )
        return total / weight
