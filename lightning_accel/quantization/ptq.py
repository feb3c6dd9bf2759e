"""The fit-end path of :class:`~lightning_accel.Quantization` (``when="fit_end"``): post-training quantization of the
trained model.

The backend family is chosen once (``backend="auto"``: torchao int8 for int8 on a single-process CPU, bitsandbytes
otherwise, :func:`choose_backend`), the model is validated before and after quantizing with its layers calibrated
where a backend needs it, the float model is kept when the monitored metric drops by more than allowed
(:func:`quantize_after_fit_`), and the quantized model is saved and exported. The setup-time path is
:mod:`~lightning_accel.quantization.qlora`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

import lightning_accel.deploy as deploy
from lightning_accel._compat import transfer_batch
from lightning_accel._inputs import recorded_forward_inputs
from lightning_accel.errors import MetricDropWarning, QuantizationWarning, SlowOnCPUWarning
from lightning_accel.quantization.backends import QuantConfig, backends_of, footprint_of, registered_backends
from lightning_accel.quantization.plan import (
    Family,
    choose_layers,
    describe,
    layer_counts,
    quantization_record,
)

__all__ = [
    "CPU_INT8_FAMILY",
    "DEFAULT_FAMILY",
    "batch_runner",
    "calibration_batches",
    "check_fit_end_args",
    "choose_backend",
    "export_quantized",
    "forward_inputs",
    "quantize_after_fit_",
    "save_quantized",
    "validate_monitor",
    "validation_source",
    "warn_if_slow",
]

#: ``backend="auto"`` for int8 after the fit on a single-process CPU: int8 x int8 kernels fast once compiled.
CPU_INT8_FAMILY = "torchao"
#: ``backend="auto"`` everywhere else.
DEFAULT_FAMILY = "bitsandbytes"


def check_fit_end_args(*, adapter_rank: int, max_metric_drop: float | None, monitor: str | None) -> None:
    """The argument rules of ``when="fit_end"``.

    Raises:
        ValueError: adapters (nothing trains after quantization), or ``max_metric_drop`` without a ``monitor``.
    """
    if adapter_rank:
        raise ValueError(
            f"`adapter_rank`={adapter_rank} needs `when`='setup': adapters are trained on a quantized base, and with "
            "when='fit_end' nothing trains after quantization; use adapter_rank=0"
        )
    if max_metric_drop is not None and monitor is None:
        raise ValueError(f"`max_metric_drop`={max_metric_drop} needs a `monitor` metric to compare; got monitor=None")


def choose_backend(
    backend: str, mode: str, device: torch.device, world_size: int = 1, *, per_layer: bool = False
) -> tuple[str, str]:
    """The user-facing backend of a post-training quantization, and why (logged): ``backend`` unless ``"auto"``.

    Raises:
        ValueError: ``backend`` cannot run under DDP (its quantized tensors cannot be broadcast).
    """
    if backend != "auto":
        unsafe = [b.name for b in backends_of(backend) if not b.supports_ddp]
        if unsafe and world_size > 1:
            raise ValueError(
                f"`backend`={backend!r} cannot run under DDP (world size {world_size}): the post-training validation "
                f"re-wraps the model and DDP cannot broadcast {backend}'s int8 tensors; use backend='auto' "
                f"({DEFAULT_FAMILY} under DDP) or quantize the trained model in one process"
            )
        return backend, "chosen by `backend`"
    if per_layer:
        family = next(b.family for b in registered_backends().values() if b.per_layer_modes)
        return family, f"per-layer formats (`layer_bits`) are {family} formats"
    if world_size > 1:
        return DEFAULT_FAMILY, (
            f"under DDP the post-training validation re-wraps the model, and DDP cannot broadcast {CPU_INT8_FAMILY}'s int8 "
            f"tensors; quantize with {CPU_INT8_FAMILY} after training for deployment (lightning_accel.export)"
        )
    if mode in _modes(CPU_INT8_FAMILY) and device.type == "cpu":
        return CPU_INT8_FAMILY, (
            "int8 inference on a CPU: torchao's int8 x int8 kernels (through inductor) ran faster than float on a VNNI CPU once "
            "compiled or exported, bitsandbytes' int8 ran 0.2-1.4x of float; run the model compiled or exported "
            "(`export_path`): in eager mode torchao int8 is slower than float"
        )
    if device.type == "cpu":
        return DEFAULT_FAMILY, (
            f"{mode} storage: bitsandbytes; on a CPU this saves memory, it is not faster than float (0.24-1.96x measured)"
        )
    return DEFAULT_FAMILY, f"{mode} on {device.type}: bitsandbytes kernels"


def _modes(family: str) -> set[str]:
    return {m for b in backends_of(family) for m in b.modes}


def warn_if_slow(family: Family, mode: str, device: torch.device) -> None:
    """Warn (:class:`~lightning_accel.SlowOnCPUWarning`) where the family's layers run far slower than float on
    ``device``."""
    for why in dict.fromkeys(w for w in (b.slow_on(device) for b in family) if w):
        rank_zero_warn(f"Quantization(mode={mode!r}) with {family[0].family}: {why}", category=SlowOnCPUWarning)


def quantize_after_fit_(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    family: Family,
    config: QuantConfig,
    *,
    why: str,
    modules: Sequence[str] | None,
    exclude: Sequence[str] | None,
    layer_bits: Any,
    monitor: str | None,
    monitor_mode: str,
    max_metric_drop: float | None,
    calibration: Callable[[], list[Any]],
    adapter_alpha: float,
    adapter_dropout: float,
) -> dict[str, Any] | None:
    """Quantize the trained ``pl_module`` with ``family``, validating before and after when ``monitor`` is set, and
    put the float layers back when the metric drops by more than ``max_metric_drop``; returns the record a checkpoint
    keeps (``reverted`` set when the float model was kept; ``None`` when nothing was tried).

    Calibration batches (``calibration()``) are drawn only when a backend that needs them has layers to quantize,
    and those backends quantize first, on the float model.
    """
    source = validation_source(trainer, pl_module) if monitor is not None else None
    if monitor is not None and source is None:
        msg = f"Quantization(when='fit_end') cannot check `monitor`={monitor!r}: there is no validation data"
        if max_metric_drop is not None:
            rank_zero_warn(f"{msg}; the float model is kept", category=MetricDropWarning)
            return None
        rank_zero_warn(f"{msg}; quantizing without a check", category=QuantizationWarning)
    before = validate_monitor(trainer, pl_module, source, monitor) if source is not None and monitor is not None else None
    if source is not None and before is None and max_metric_drop is not None:
        rank_zero_warn(
            f"Quantization: validation did not log `monitor`={monitor!r}; the float model is kept", category=MetricDropWarning
        )
        return None
    # after the fit the strategy has moved the model back to the CPU: quantize it there (validation moves it to the
    # Trainer's device and back), computing in the dtype chosen for the Trainer's device
    chosen = choose_layers(pl_module, family, config, modules, exclude, layer_bits)
    if any(b.needs_calibration and chosen[b.name] for b in family):
        config = dataclasses.replace(config, calibration=calibration())
    originals = {}
    for b in sorted(family, key=lambda b: not b.needs_calibration):  # calibrated on the float model
        originals[b.name] = b.quantize_(pl_module, chosen[b.name], config)
    record = quantization_record(pl_module, family, config, adapter_alpha, adapter_dropout)
    after = validate_monitor(trainer, pl_module, source, monitor) if before is not None and source is not None and monitor else None
    revert = False
    change = ""
    if before is not None and after is not None and monitor is not None:
        drop = (before - after) if monitor_mode == "max" else (after - before)
        revert = max_metric_drop is not None and drop > max_metric_drop
        revert = bool(trainer.strategy.broadcast(revert, src=0))  # one decision for every rank
        record.update(metric_before=before, metric_after=after)
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"quantization/{monitor}_before": before, f"quantization/{monitor}_after": after, f"quantization/{monitor}_drop": drop},
                step=trainer.global_step,
            )
            trainer.logger.save()
        change = f"{monitor} {before:.4f} -> {after:.4f} (drop {drop:+.4f})"
    if revert:
        for b in family:
            b.restore_(pl_module, originals[b.name])
        rank_zero_warn(
            f"Quantization: {describe(family, config)} costs {change}, more than `max_metric_drop`={max_metric_drop}; "
            "the float model is kept",
            category=MetricDropWarning,
        )
        return {"metric_before": before, "metric_after": after, "reverted": True}
    foot = footprint_of(pl_module, family)
    rank_zero_info(
        f"Quantization: {layer_counts(foot, family)} -> {describe(family, config)} after fit "
        f"({foot['bits_per_weight']:.3f} stored bits per weight; backend {family[0].family}: {why})"
        + (f"; {change}" if before is not None else "")
    )
    return record


# ---------------------------------------------------------------------- the monitored metric
def _datamodule(trainer: pl.Trainer) -> pl.LightningDataModule | None:
    """The fit's datamodule (Lightning's data connector sets ``trainer.datamodule``; the Trainer class does not
    declare it)."""
    datamodule: pl.LightningDataModule | None = trainer.datamodule  # type: ignore[attr-defined]
    return datamodule


def validation_source(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
    """Where the fit's validation data came from, as ``trainer.validate`` keyword arguments (``None``: nowhere)."""
    if trainer.limit_val_batches == 0:
        return None
    datamodule = _datamodule(trainer)
    if datamodule is not None and is_overridden("val_dataloader", datamodule):
        return {"datamodule": datamodule}
    loaders = trainer.val_dataloaders
    if loaders is not None:
        return {"dataloaders": loaders}
    if is_overridden("val_dataloader", pl_module):
        return {}
    return None


def validate_monitor(trainer: pl.Trainer, pl_module: pl.LightningModule, source: dict[str, Any], monitor: str) -> float | None:
    """Run ``trainer.validate`` from ``on_fit_end`` and restore the fit's trainer state afterwards; the value of
    ``monitor`` (``None``: not logged)."""
    saved = (trainer.state.fn, trainer.state.status, trainer.state.stage)
    try:
        results = trainer.validate(pl_module, verbose=False, **source)
    finally:
        trainer.state.fn, trainer.state.status, trainer.state.stage = saved
    for metrics in results:
        if monitor in metrics:
            return float(metrics[monitor])
    return None


# ---------------------------------------------------------------------- calibration
def calibration_batches(trainer: pl.Trainer, count: int) -> list[Any]:
    """The first ``count`` training batches (for the input ranges of statically quantized layers).

    Raises:
        ValueError: the fit had no training dataloader.
    """
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        datamodule = _datamodule(trainer)
        loaders = datamodule.train_dataloader() if datamodule is not None else None
    if loaders is None:
        raise ValueError("Quantization cannot calibrate the int8 convolutions: the fit had no training dataloader")
    batches = []
    for batch in loaders:
        batches.append(batch)
        if len(batches) >= count:
            break
    return batches


@torch.no_grad()
def forward_inputs(pl_module: pl.LightningModule, batches: Sequence[Any], run: Callable[[Any], Any]) -> list[Any]:
    """The inputs the module's forward receives from each of ``batches`` (run by ``run``, e.g. :func:`batch_runner`),
    as :func:`lightning_accel.export` takes examples: a tensor, a tuple of positional inputs, or a dict of keyword
    inputs (the calibration data of runtimes that quantize activations themselves: ONNX Runtime, OpenVINO)."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with recorded_forward_inputs(pl_module) as seen:
            for batch in batches:
                run(batch)
    finally:
        pl_module.train(was_training)
    return seen


def batch_runner(pl_module: pl.LightningModule, recorded: Any) -> Callable[[Any], Any]:
    """Runs the module's forward on one training batch, as its steps call it (``recorded``: the inputs of a forward
    call seen during the fit, which tell how many positional inputs or which keywords it takes)."""

    def run(batch: Any) -> Any:
        device = next(iter(pl_module.parameters()), torch.empty(0)).device
        batch = transfer_batch(pl_module, batch, device)
        if isinstance(batch, dict):
            if isinstance(recorded, dict):
                batch = {k: v for k, v in batch.items() if k in recorded}
            return pl_module(**batch)
        if isinstance(batch, torch.Tensor):
            return pl_module(batch)
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            if isinstance(recorded, tuple) and len(recorded) <= len(batch):
                return pl_module(*batch[: len(recorded)])  # the forward takes several inputs
            return pl_module(batch[0])
        raise ValueError(
            f"Quantization cannot calibrate the int8 convolutions of {type(pl_module).__name__}: a training batch "
            f"is a {type(batch).__name__}, not a tensor, a tuple starting with the input, or a dict of forward "
            "arguments; exclude the convolutions (`exclude`) or use batches of one of those forms"
        )

    return run


# ---------------------------------------------------------------------- outputs
#: checkpoint entries that only resuming a fit reads (the float model's optimizer state can be larger than the
#: quantized weights: 240 MB of a 61 MB MiniLM)
_TRAINING_ONLY = ("optimizer_states", "lr_schedulers")


def save_quantized(trainer: pl.Trainer, name: str, what: str = "Quantization: the quantized") -> str | None:
    """Write the post-training-quantized model as ``name`` beside the run's checkpoints (theirs hold the float
    model): its weights, hyper-parameters and the callback states replay needs, without the optimizer and
    LR-scheduler states (it is for :func:`lightning_accel.load_checkpoint` / ``test(ckpt_path=)``, not for
    resuming a fit); returns its path (``None``: the run has no checkpoint directory). ``what`` begins the log line."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    if dirpath is None:
        return None
    path = str(Path(dirpath) / name)
    trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
    if trainer.is_global_zero:  # the deployable weights and what replay needs, not the float optimizer's state
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        for key in _TRAINING_ONLY:
            checkpoint.pop(key, None)
        torch.save(checkpoint, path)
    trainer.strategy.barrier("lightning_accel.save_quantized")
    rank_zero_info(f"{what} model is saved in {path} (load it with lightning_accel.load_checkpoint)")
    return path


def export_quantized(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    export_path: str,
    example: Any,
    compile: bool,
    format: str | None = None,
    calibration: Sequence[Any] | None = None,
) -> str:
    """Write the quantized model with :func:`lightning_accel.export` to ``export_path`` (relative paths go to the
    ``ModelCheckpoint``'s directory, else the Trainer's root dir), traced on ``example``; returns the path.

    Raises:
        ValueError: no example input.
    """
    path = Path(export_path)
    if not path.is_absolute():
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = Path(dirpath) / path
    if example is None:
        raise ValueError(
            f"Quantization `export_path`={export_path!r} needs an example input: set `example_input_array` "
            f"in {type(pl_module).__name__} or call `self(...)` in its steps"
        )
    if trainer.is_global_zero:
        if format is None:
            path = deploy.export(pl_module, example, path, compile=compile)
        else:
            path = deploy.export(pl_module, example, path, format, calibration=calibration)
        rank_zero_info(f"Quantization: exported the quantized model to {path} (lightning_accel.load_exported)")
    trainer.strategy.barrier()
    return str(path)
