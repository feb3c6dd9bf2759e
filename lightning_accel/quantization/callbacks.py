"""When the Trainer quantizes: :class:`Quantization` (8/4-bit weights, adapters) and :class:`EightBitOptimizer`.

The work is done by the pure functions of :mod:`~lightning_accel.quantization.bnb`,
:mod:`~lightning_accel.quantization.adapters` and :mod:`~lightning_accel.quantization.optimizers`; these callbacks
decide when, record what was done (so checkpoints can be resumed, tested and loaded) and log it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_accel._compat import is_step_marked, mark_step_for_lr_scheduler
from lightning_accel._inputs import ForwardRecorder
from lightning_accel._lifecycle import AccelCallback
from lightning_accel._validate import (
    check_bool,
    check_choice,
    check_int,
    check_logged,
    check_number,
    check_patterns,
    check_str,
)
from lightning_accel.errors import (  # noqa: F401 (public here too)
    MetricDropWarning,
    OptimizerNotConvertedWarning,
    QuantizationNoEffectWarning,
    QuantizationWarning,
    SlowOnCPUWarning,
)
from lightning_accel.quantization.adapters import (
    LoRAAdapter,
    adapted_layers,
    add_adapters_,
    freeze_except_adapters_,
)
from lightning_accel.quantization.bnb import (
    BLOCK_SIZES,
    COMPUTE_DTYPES,
    MODES,
    count_parameters,
    layer_config,
    quantize_layers_,
    quantized_footprint,
    quantized_layers,
    require_bitsandbytes,
    resolve_compute_dtype,
    restore_,
    select_quantizable,
)
from lightning_accel.quantization.optimizers import (
    UnsupportedOptimizerError,
    has_paged_variant,
    is_8bit_optimizer,
    to_8bit_optimizer,
    why_not_8bit,
)
from lightning_accel.quantization.pt2e import (
    calibrate_,
    int8_conv_footprint,
    int8_convs,
    quantize_convs_int8_,
    replay_int8_convs_,
    restore_convs_,
    select_int8_layers,
)
from lightning_accel.quantization.torchao import (
    SLOW_INT8_CPU,
    int8_footprint,
    int8_layers,
    quantize_int8_,
    replay_int8_,
    restore_float_,
    slow_int8_on,
)

BACKENDS: tuple[str, ...] = ("auto", "torchao", "bitsandbytes")

__all__ = [
    "BACKENDS",
    "Quantization",
    "EightBitOptimizer",
    "QuantizationWarning",
    "MetricDropWarning",
    "QuantizationNoEffectWarning",
    "OptimizerNotConvertedWarning",
    "SlowOnCPUWarning",
    "replay_quantization",
]


class Quantization(AccelCallback):
    """Quantize Linear layers to 8 or 4 bits with bitsandbytes (CPU and CUDA), before training or after it; or, for
    fast CPU inference, Linear layers and convolutions to int8 with torchao after it.

    * ``when="setup"``: the selected layers are quantized and frozen before training (before the optimizers are
      built, the model is wrapped by DDP, or a checkpoint is restored), and the model is trained on the quantized
      base. With ``adapter_rank > 0`` every quantized layer gets a trainable low-rank adapter (QLoRA). Layers that
      are not quantized (the output layer by default, norms, embeddings) keep training.
    * ``when="fit_end"``: post-training quantization of the trained model. With ``monitor`` set, the model is
      validated before and after, the change is logged, and with ``max_metric_drop`` the float model is kept (with a
      :class:`MetricDropWarning`) when quantization costs more than that.

    What was quantized is recorded in the callback's checkpoint state, so ``Trainer.fit(ckpt_path=...)``,
    ``Trainer.test(ckpt_path=...)`` and :func:`lightning_accel.load_checkpoint` recreate the quantized layers and
    adapters before the weights load (:meth:`replay`).
    Model state-dict keys stay the model's own (plus bitsandbytes' quantization-state entries next to each weight and
    ``<layer>.adapter.lora_A`` / ``lora_B``).

    Args:
        mode: ``"nf4"``, ``"fp4"`` or ``"int8"``, e.g. ``"nf4"``.
        double_quant: 4-bit only: quantize the per-block absmax values too (4.13 instead of 4.5 bits per weight),
            e.g. ``True``.
        block_size: 4-bit only: weights per absmax block, one of 64, 128, ..., 4096, e.g. ``64``.
        compute_dtype: ``"auto"`` (bf16 where the device runs it natively, else fp32), ``"fp32"``, ``"bf16"``, or
            ``"fp16"`` (CUDA only), e.g. ``"auto"``.
        modules: glob patterns on qualified or class names of the layers to quantize, e.g. ``["blocks.*"]``;
            ``None``: every ``nn.Linear`` (and with ``backend`` torchao every ``nn.Conv1d`` / ``nn.Conv2d``) except
            the output layer.
        exclude: glob patterns removed from the selection, e.g. ``["embed"]``.
        when: ``"setup"`` (quantize, then train / fine-tune) or ``"fit_end"`` (post-training), e.g. ``"setup"``.
        adapter_rank: rank of the LoRA adapter of every quantized layer, ``0`` for none (``when="setup"`` only),
            e.g. ``8``.
        adapter_alpha: adapters scale their update by ``adapter_alpha / adapter_rank``, e.g. ``16.0``.
        adapter_dropout: dropout on the adapters' inputs, e.g. ``0.05``.
        trainable: with adapters: glob patterns of the modules that train besides the adapters, e.g.
            ``["classifier", "pooler"]``; every other parameter (embeddings, norms, biases) is frozen, QLoRA-style.
            ``None``: the output layer only. The trainable fraction is logged at setup.
        monitor: ``when="fit_end"``: the validation metric compared before and after quantizing, ``None`` to
            quantize without validating, e.g. ``"val_acc"``.
        monitor_mode: ``"max"`` if a higher ``monitor`` is better (accuracy), ``"min"`` if lower is (loss), e.g.
            ``"max"``.
        backend: which library quantizes: ``"auto"`` picks the one fastest for inference on the device and logs why
            (int8 after the fit on a CPU: ``"torchao"``, dynamic int8 activations x int8 weights, fast once compiled
            or exported; everything else: ``"bitsandbytes"``: 4-bit storage, a frozen quantized base to train on,
            adapters, CUDA), e.g. ``"auto"``.
        calibration_batches: backend torchao: how many training batches calibrate the static int8 convolutions'
            input ranges (torchao's PT2E x86 observers), e.g. ``32``.
        export_path: ``when="fit_end"``: also write the quantized model with :func:`lightning_accel.export` to this
            file (relative paths go to the ``ModelCheckpoint``'s directory, else the Trainer's root dir), e.g.
            ``"model.pt2"``; traced on ``example_input_array`` or the first recorded forward call.
        export_compile: compile the export ahead of time with AOTInductor (the fast file), e.g. ``True``.
        save_checkpoint: ``when="fit_end"``: write the quantized model to ``checkpoint_name`` in the
            ``ModelCheckpoint``'s directory after quantizing (the run's other checkpoints hold the float model), e.g.
            ``True``; its path is logged and kept in ``quantized_checkpoint_path``.
        checkpoint_name: file name of that checkpoint, e.g. ``"quantized.ckpt"``.
        max_metric_drop: ``when="fit_end"``: keep the float model when ``monitor`` gets worse by more than this,
            e.g. ``0.01`` (one point of accuracy); ``None``: always keep the quantized model.
        layer_bits: per-layer formats instead of one ``mode`` (bitsandbytes): ``{layer name: "int8" | "nf4" | "fp4" |
            "float"}`` (``"float"`` keeps the layer unquantized; selected layers not named use ``mode``) or the path
            of a ``sensitivity.json`` written by :class:`~lightning_accel.SensitivityAnalysis` with ``bits``, e.g.
            ``{"blocks.0.mlp.fc1": "nf4", "blocks.0.attn.qkv": "int8"}``; ``None``: ``mode`` everywhere.

    Raises:
        ValueError: a bad argument, or a combination that cannot work (adapters with ``when="fit_end"``,
            ``max_metric_drop`` without ``monitor``); at setup: ``compute_dtype="fp16"`` on a CPU, a pattern that
            selects nothing, a model without ``nn.Linear`` layers, a checkpoint quantized differently.
        ImportError: bitsandbytes is not installed (raised at setup).
        CompositionError: combined with a pruning callback while ``when="setup"`` (quantized weights are frozen and
            cannot be pruned), or with a second ``Quantization``.
    """

    stage: ClassVar[str] = "quantization"
    required_on_load: ClassVar[bool] = True

    def __init__(
        self,
        mode: Literal["int8", "nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        block_size: int = 64,
        compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
        backend: Literal["auto", "torchao", "bitsandbytes"] = "auto",
        modules: list[str] | None = None,
        exclude: list[str] | None = None,
        when: Literal["setup", "fit_end"] = "setup",
        adapter_rank: int = 0,
        adapter_alpha: float = 16.0,
        adapter_dropout: float = 0.0,
        trainable: list[str] | None = None,
        monitor: str | None = "val_acc",
        monitor_mode: Literal["max", "min"] = "max",
        max_metric_drop: float | None = None,
        save_checkpoint: bool = True,
        checkpoint_name: str = "quantized.ckpt",
        export_path: str | None = None,
        export_compile: bool = True,
        calibration_batches: int = 32,
        layer_bits: dict[str, str] | str | None = None,
    ) -> None:
        super().__init__()
        self.calibration_batches = check_int("calibration_batches", calibration_batches, low=1)
        self.save_checkpoint = check_bool("save_checkpoint", save_checkpoint)
        if not isinstance(checkpoint_name, str) or not checkpoint_name or "/" in checkpoint_name:
            raise ValueError(f"`checkpoint_name` must be a file name like 'quantized.ckpt'; got {checkpoint_name!r}")
        self.checkpoint_name = checkpoint_name
        self.quantized_checkpoint_path: str | None = None
        self.export_path = check_str("export_path", export_path, "a file path like 'model.pt2'", allow_none=True)
        self.export_compile = check_bool("export_compile", export_compile)
        self.exported_path: str | None = None
        self.mode = check_choice("mode", mode, MODES)
        self.double_quant = check_bool("double_quant", double_quant)
        self.block_size = check_choice("block_size", block_size, BLOCK_SIZES)
        self.compute_dtype = check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
        self.backend = check_choice("backend", backend, BACKENDS)
        if backend == "torchao" and (mode != "int8" or when != "fit_end" or adapter_rank):
            raise ValueError(
                f"`backend`='torchao' runs int8 post-training quantization for inference: it needs `mode`='int8', "
                f"`when`='fit_end' and no adapters; got mode={mode!r}, when={when!r}, adapter_rank={adapter_rank}. "
                "4-bit storage, training on a quantized base and adapters use backend='bitsandbytes'"
            )
        self.modules = check_patterns("modules", modules)
        self.exclude = check_patterns("exclude", exclude)
        self.when = check_choice("when", when, ("setup", "fit_end"))
        self.adapter_rank = check_int("adapter_rank", adapter_rank, low=0)
        self.adapter_alpha = check_number("adapter_alpha", adapter_alpha, low=0.0, low_inclusive=False)
        self.trainable = check_patterns("trainable", trainable)
        self.adapter_dropout = check_number("adapter_dropout", adapter_dropout, low=0.0, high=1.0, high_inclusive=False)
        self.monitor = check_str("monitor", monitor, "a logged metric name like 'val_acc'", allow_none=True)
        self.monitor_mode = check_choice("monitor_mode", monitor_mode, ("max", "min"))
        self.max_metric_drop = check_number("max_metric_drop", max_metric_drop, low=0.0, allow_none=True)
        if adapter_rank and when == "fit_end":
            raise ValueError(
                f"`adapter_rank`={adapter_rank} needs `when`='setup': adapters are trained on a quantized base, and with "
                "when='fit_end' nothing trains after quantization; use adapter_rank=0"
            )
        if max_metric_drop is not None and when != "fit_end":
            raise ValueError(
                f"`max_metric_drop`={max_metric_drop} only applies with `when`='fit_end' (post-training quantization); "
                f"got when={when!r}"
            )
        if max_metric_drop is not None and monitor is None:
            raise ValueError(f"`max_metric_drop`={max_metric_drop} needs a `monitor` metric to compare; got monitor=None")
        if layer_bits is not None and not isinstance(layer_bits, (str, dict)):
            raise ValueError(
                f"`layer_bits` must be None, a dict {{layer name: 'int8' | 'nf4' | 'fp4' | 'float'}} or the path of a "
                f"sensitivity.json; got {layer_bits!r}"
            )
        from lightning_accel.sensitivity.core import load_layer_bits

        self.layer_bits = layer_bits
        self._layer_bits: dict[str, str] | None = None if layer_bits is None else load_layer_bits(layer_bits)
        if self._layer_bits is not None and backend == "torchao":
            raise ValueError(
                "`layer_bits` chooses bitsandbytes formats per layer; it needs `backend`='bitsandbytes' or 'auto'; got "
                "backend='torchao'"
            )
        if mode == "int8" and (block_size != 64 or not double_quant):
            rank_zero_warn(
                "`block_size` and `double_quant` have no effect with `mode`='int8' (one scale per weight row)",
                category=QuantizationNoEffectWarning,
            )
        if trainable is not None and not adapter_rank:
            rank_zero_warn("`trainable` has no effect with `adapter_rank`=0 (no adapters to train)", category=QuantizationNoEffectWarning)
        if not adapter_rank and (adapter_alpha != 16.0 or adapter_dropout):
            rank_zero_warn("`adapter_alpha` and `adapter_dropout` have no effect with `adapter_rank`=0", category=QuantizationNoEffectWarning)
        self._record = self._empty_record()
        self._monitor_checked = False
        self._recorder = ForwardRecorder()

    def accel_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end" and getattr(pl_module, "example_input_array", None) is None:
            self._recorder = ForwardRecorder()  # the first forward call's inputs, to trace the export on
            self._recorder.attach(pl_module)

    def accel_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._recorder.detach()

    # ------------------------------------------------------------------ composition
    @property
    def capabilities(self) -> frozenset[str]:  # type: ignore[override]
        """Replaces Linear layers; with ``when="setup"`` it also freezes their weights before training."""
        return frozenset({"replaces_layers", "freezes_weights"} if self.when == "setup" else {"replaces_layers"})

    @staticmethod
    def replay(model: nn.Module, state: dict[str, Any]) -> None:
        """Recreate the quantized layers and adapters of a ``Quantization`` state (see :func:`replay_quantization`)."""
        replay_quantization(model, state)

    # ------------------------------------------------------------------ state
    def _empty_record(self) -> dict[str, Any]:
        return {
            "applied": False,
            "backend": "bitsandbytes",
            "when": self.when,
            "mode": self.mode,
            "double_quant": self.double_quant,
            "block_size": self.block_size,
            "compute_dtype": None,
            "modules": [],
            "convs": [],
            "adapters": [],
            "adapter_rank": self.adapter_rank,
            "adapter_alpha": self.adapter_alpha,
            "adapter_dropout": self.adapter_dropout,
            "metric_before": None,
            "metric_after": None,
            "reverted": False,
        }

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._record)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._record = {**self._empty_record(), **copy.deepcopy(state_dict)}

    @property
    def record(self) -> dict[str, Any]:
        """What this callback did: quantized layer names and settings, adapters, metrics before/after."""
        return copy.deepcopy(self._record)

    # ------------------------------------------------------------------ hooks
    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_bitsandbytes()
        device = trainer.strategy.root_device
        dtype = resolve_compute_dtype(self.compute_dtype, device)  # fp16 on a CPU fails here, before any change
        if self.when != "setup":
            if self.backend == "torchao" and trainer.world_size > 1:
                raise ValueError(
                    f"`backend`='torchao' cannot run under DDP (world size {trainer.world_size}): the post-training "
                    "validation re-wraps the model and DDP cannot broadcast torchao's int8 tensors; use backend='auto' "
                    "(bitsandbytes under DDP) or quantize the trained model in one process"
                )
            backend = self._choose_backend(device, trainer.world_size)[0]
            if not (quantized_layers(pl_module) or int8_layers(pl_module) or int8_convs(pl_module)):
                self._select(pl_module, backend)  # fails now, not after the fit
            if stage == "fit" and backend == "torchao" and slow_int8_on(device):  # not again for the validations
                rank_zero_warn(f"Quantization(mode='int8') with torchao: {SLOW_INT8_CPU}", category=SlowOnCPUWarning)
            return
        if quantized_layers(pl_module):  # the same model set up again (test after fit), or quantized by the user
            if self.adapter_rank and not adapted_layers(pl_module):
                add_adapters_(pl_module, self.adapter_rank, self.adapter_alpha, self.adapter_dropout)
            if self.adapter_rank:
                freeze_except_adapters_(pl_module, self.trainable)
            self._record_model(pl_module)
            return
        chosen = self._per_layer(pl_module, select_quantizable(pl_module, self.modules, self.exclude))
        _broadcast_from_rank_zero(trainer, chosen.values())
        self._quantize(pl_module, chosen, dtype, device)
        if self.adapter_rank:
            add_adapters_(pl_module, self.adapter_rank, self.adapter_alpha, self.adapter_dropout)
            freeze_except_adapters_(pl_module, self.trainable)
        self._record_model(pl_module)
        counts = count_parameters(pl_module)
        foot = quantized_footprint(pl_module)
        adapters = f", adapters of rank {self.adapter_rank} on each" if self.adapter_rank else ""
        rank_zero_info(
            f"Quantization: {foot['layers']} Linear layers -> {self._describe(dtype)} on {device}{adapters}; "
            f"{foot['bits_per_weight']:.3f} stored bits per quantized weight; {counts['trainable']:,} of {counts['total']:,} parameters "
            f"trainable ({counts['trainable'] / max(counts['total'], 1):.2%})"
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.when == "fit_end"
            and self.monitor is not None
            and not self._monitor_checked
            and not trainer.sanity_checking
            and trainer.state.fn == TrainerFn.FITTING
        ):
            check_logged(self, self.monitor, trainer.callback_metrics, pl_module)
            self._monitor_checked = True

    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "fit_end" or quantized_layers(pl_module) or int8_layers(pl_module) or int8_convs(pl_module):
            return
        device = trainer.strategy.root_device
        backend, why = self._choose_backend(device, trainer.world_size)
        source = _validation_source(trainer, pl_module) if self.monitor is not None else None
        if self.monitor is not None and source is None:
            msg = f"Quantization(when='fit_end') cannot check `monitor`={self.monitor!r}: there is no validation data"
            if self.max_metric_drop is not None:
                rank_zero_warn(f"{msg}; the float model is kept", category=MetricDropWarning)
                return
            rank_zero_warn(f"{msg}; quantizing without a check", category=QuantizationWarning)
        before = self._validate(trainer, pl_module, source) if source is not None else None
        if source is not None and before is None and self.max_metric_drop is not None:
            rank_zero_warn(
                f"Quantization: validation did not log `monitor`={self.monitor!r}; the float model is kept",
                category=MetricDropWarning,
            )
            return
        # after the fit the strategy has moved the model back to the CPU: quantize it there (validation moves it to
        # the Trainer's device and back), computing in the dtype chosen for the Trainer's device
        dtype = resolve_compute_dtype(self.compute_dtype, device)
        chosen = self._select(pl_module, backend)
        if backend == "torchao":
            linears, convs = chosen
            observers = calibrate_(pl_module, convs, self._calibration_data(trainer), self._runner(pl_module)) if convs else {}
            float_weights = quantize_int8_(pl_module, linears) if linears else {}
            float_convs = quantize_convs_int8_(pl_module, convs, observers)
            self._record_torchao(pl_module)
        else:
            originals = self._quantize(pl_module, self._per_layer(pl_module, chosen), dtype, None)
            self._record_model(pl_module)
        after = self._validate(trainer, pl_module, source) if before is not None else None
        revert = False
        if before is not None:
            drop = (before - after) if self.monitor_mode == "max" else (after - before)
            revert = self.max_metric_drop is not None and drop > self.max_metric_drop
            revert = bool(trainer.strategy.broadcast(revert, src=0))  # one decision for every rank
            self._record.update(metric_before=before, metric_after=after)
            if trainer.logger is not None:
                trainer.logger.log_metrics(
                    {
                        f"quantization/{self.monitor}_before": before,
                        f"quantization/{self.monitor}_after": after,
                        f"quantization/{self.monitor}_drop": drop,
                    },
                    step=trainer.global_step,
                )
                trainer.logger.save()
            change = f"{self.monitor} {before:.4f} -> {after:.4f} (drop {drop:+.4f})"
        if revert:
            if backend == "torchao":
                restore_float_(pl_module, float_weights)
                restore_convs_(pl_module, float_convs)
            else:
                restore_(pl_module, originals)
            self._record = {**self._empty_record(), "metric_before": before, "metric_after": after, "reverted": True}
            rank_zero_warn(
                f"Quantization: {self._describe(dtype, backend)} costs {change}, more than `max_metric_drop`="
                f"{self.max_metric_drop}; the float model is kept",
                category=MetricDropWarning,
            )
            return
        foot = _int8_footprint(pl_module) if backend == "torchao" else quantized_footprint(pl_module)
        rank_zero_info(
            f"Quantization: {_layer_count(foot)} -> {self._describe(dtype, backend)} after fit "
            f"({foot['bits_per_weight']:.3f} stored bits per weight; backend {backend}: {why})"
            + (f"; {change}" if before is not None else "")
        )
        self._save_quantized(trainer)
        self._export(trainer, pl_module)

    def _choose_backend(self, device: torch.device, world_size: int = 1) -> tuple[str, str]:
        """The backend for this run, and why (logged)."""
        if self._layer_bits is not None and self.backend == "auto":
            return "bitsandbytes", "per-layer formats (`layer_bits`) are bitsandbytes formats"
        if self.backend != "auto":
            return self.backend, "chosen by `backend`"
        if world_size > 1:
            return "bitsandbytes", (
                "under DDP the post-training validation re-wraps the model, and DDP cannot broadcast torchao's int8 "
                "tensors; quantize with torchao after training for deployment (lightning_accel.export)"
            )
        if self.mode == "int8" and self.when == "fit_end" and not self.adapter_rank and device.type == "cpu":
            return "torchao", (
                "int8 inference on a CPU: torchao's int8 x int8 kernels (through inductor) ran faster than float on a VNNI CPU once "
                "compiled or exported, bitsandbytes' int8 ran 0.2-1.4x of float; run the model compiled or exported "
                "(`export_path`): in eager mode torchao int8 is slower than float"
            )
        if device.type == "cpu":
            return "bitsandbytes", (
                f"{self.mode} {'training on a quantized base' if self.when == 'setup' else 'storage'}: bitsandbytes; on a "
                "CPU this saves memory, it is not faster than float (0.24-1.96x measured)"
            )
        return "bitsandbytes", f"{self.mode} on {device.type}: bitsandbytes kernels"

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_path is None:
            return
        from lightning_accel.deploy import export

        path = Path(self.export_path)
        if not path.is_absolute():
            dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
            path = Path(dirpath) / path
        example = getattr(pl_module, "example_input_array", None)
        if example is None:
            example = self._recorder.example
        if example is None:
            raise ValueError(
                f"Quantization `export_path`={self.export_path!r} needs an example input: set `example_input_array` "
                f"in {type(pl_module).__name__} or call `self(...)` in its steps"
            )
        if trainer.is_global_zero:
            export(pl_module, example, path, compile=self.export_compile)
            rank_zero_info(f"Quantization: exported the quantized model to {path} (lightning_accel.load_exported)")
        trainer.strategy.barrier()
        self.exported_path = str(path)

    def _save_quantized(self, trainer: pl.Trainer) -> None:
        """Write the post-training-quantized model beside the run's checkpoints (theirs hold the float model)."""
        ckpt = trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None)
        if not self.save_checkpoint or dirpath is None:
            return
        path = str(Path(dirpath) / self.checkpoint_name)
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
        self.quantized_checkpoint_path = path
        rank_zero_info(f"Quantization: the quantized model is saved in {path} (load it with lightning_accel.load_checkpoint)")

    # ------------------------------------------------------------------ helpers
    def _describe(self, dtype: torch.dtype, backend: str = "bitsandbytes") -> str:
        compute = str(dtype).replace("torch.", "")
        if backend == "torchao":
            return (
                "int8 (torchao: Linear: dynamic int8 activations x int8 weights, one scale per output row; "
                "convolutions: static uint8 inputs calibrated on training batches x int8 weights per channel)"
            )
        if self.mode == "int8":
            return f"int8 (row-wise, compute {compute})"
        dq = ", double quant" if self.double_quant else ""
        return f"{self.mode} (block {self.block_size}{dq}, compute {compute})"

    def _per_layer(self, model: nn.Module, chosen: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
        """``chosen`` without the layers ``layer_bits`` keeps in float; unknown names raise."""
        if self._layer_bits is None:
            return chosen
        unknown = sorted(set(self._layer_bits) - set(chosen))
        if unknown:
            raise ValueError(
                f"Quantization `layer_bits` names {unknown[:5]}, which are not selected Linear layers of "
                f"{type(model).__name__}; selected: {sorted(chosen)[:40]} (change `modules` / `exclude`, or the names)"
            )
        kept = {n: m for n, m in chosen.items() if self._layer_bits.get(n, self.mode) != "float"}
        if not kept:
            raise ValueError(f"Quantization `layer_bits` keeps every selected layer in float ({self.layer_bits!r}): nothing to quantize")
        return kept

    def _quantize(self, model: nn.Module, chosen: dict[str, nn.Linear], dtype: Any, device: Any) -> dict[str, nn.Module]:
        """Quantize ``chosen``, each layer to its ``layer_bits`` format (else ``mode``); returns the float layers."""
        by_mode: dict[str, dict[str, nn.Linear]] = {}
        for name, layer in chosen.items():
            mode = self.mode if self._layer_bits is None else self._layer_bits.get(name, self.mode)
            by_mode.setdefault(mode, {})[name] = layer
        originals: dict[str, nn.Module] = {}
        for mode, layers in by_mode.items():
            originals.update(quantize_layers_(model, layers, mode, self.double_quant, self.block_size, dtype, device))
        return originals

    def _record_torchao(self, model: nn.Module) -> None:
        self._record.update(
            applied=True,
            backend="torchao",
            mode="int8",
            activation="dynamic",
            modules=list(int8_layers(model)),
            convs=list(int8_convs(model)),
            adapters=[],
        )

    def _select(self, model: nn.Module, backend: str) -> Any:
        """The layers ``backend`` quantizes: ``(linears, convs)`` for torchao, ``{name: linear}`` for bitsandbytes."""
        if backend == "torchao":
            return select_int8_layers(model, self.modules, self.exclude)
        try:
            return select_quantizable(model, self.modules, self.exclude)
        except ValueError as err:
            if not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
                raise
            raise type(err)(
                f"{err}. bitsandbytes quantizes Linear layers only; convolutions quantize to int8 with mode='int8', "
                "when='fit_end' and backend='torchao' (or 'auto' on a CPU)"
            ) from err

    def _calibration_data(self, trainer: pl.Trainer) -> list[Any]:
        """The first ``calibration_batches`` training batches (for the int8 convolutions' input ranges)."""
        loaders = trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            datamodule = trainer.datamodule
            loaders = datamodule.train_dataloader() if datamodule is not None else None
        if loaders is None:
            raise ValueError("Quantization cannot calibrate the int8 convolutions: the fit had no training dataloader")
        batches = []
        for batch in loaders:
            batches.append(batch)
            if len(batches) >= self.calibration_batches:
                break
        return batches

    def _runner(self, pl_module: pl.LightningModule) -> Any:
        """Runs the module's forward on one training batch, as its steps call it."""
        recorded = self._recorder.example

        def run(batch: Any) -> Any:
            device = next(iter(pl_module.parameters()), torch.empty(0)).device
            batch = pl_module._apply_batch_transfer_handler(batch, device=device)
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

    def _record_model(self, model: nn.Module) -> None:
        layers = quantized_layers(model)
        cfg = layer_config(next(iter(layers.values())))
        adapters = {n: m.adapter for n, m in adapted_layers(model).items() if n in layers}
        first = next(iter(adapters.values()), None)
        self._record.update(
            applied=True,
            mode=cfg["mode"],
            double_quant=cfg.get("double_quant", self.double_quant),
            block_size=cfg.get("block_size", self.block_size),
            compute_dtype=cfg["compute_dtype"],
            layer_modes={n: layer_config(m)["mode"] for n, m in layers.items()},
            modules=list(layers),
            adapters=list(adapters),
            adapter_rank=first.rank if first is not None else 0,
            adapter_alpha=first.alpha if first is not None else self.adapter_alpha,
            adapter_dropout=_dropout_p(first) if first is not None else self.adapter_dropout,
        )

    def _validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: dict[str, Any]) -> float | None:
        """Run ``trainer.validate`` from ``on_fit_end`` and restore the fit's trainer state afterwards."""
        saved = (trainer.state.fn, trainer.state.status, trainer.state.stage)
        try:
            results = trainer.validate(pl_module, verbose=False, **source)
        finally:
            trainer.state.fn, trainer.state.status, trainer.state.stage = saved
        for metrics in results:
            if self.monitor in metrics:
                return float(metrics[self.monitor])
        return None


def _int8_footprint(model: nn.Module) -> dict[str, Any]:
    """Stored bytes and bits per weight of torchao's int8 Linear layers and the int8 convolutions together."""
    lin, conv = int8_footprint(model), int8_conv_footprint(model)
    weights, stored = lin["weights"] + conv["weights"], lin["bytes"] + conv["bytes"]
    return {
        "layers": lin["layers"] + conv["layers"],
        "linear_layers": lin["layers"],
        "conv_layers": conv["layers"],
        "weights": weights,
        "bytes": stored,
        "bits_per_weight": 8.0 * stored / max(weights, 1),
    }


def _layer_count(foot: dict[str, Any]) -> str:
    if "conv_layers" not in foot:
        return f"{foot['layers']} Linear layers"
    return f"{foot['linear_layers']} Linear layers and {foot['conv_layers']} convolutions"


def _dropout_p(adapter: LoRAAdapter) -> float:
    return float(adapter.dropout.p) if isinstance(adapter.dropout, nn.Dropout) else 0.0


def _validation_source(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
    """Where the fit's validation data came from, as ``trainer.validate`` keyword arguments (``None``: nowhere)."""
    if trainer.limit_val_batches == 0:
        return None
    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden("val_dataloader", datamodule):
        return {"datamodule": datamodule}
    loaders = trainer.val_dataloaders
    if loaders is not None:
        return {"dataloaders": loaders}
    if is_overridden("val_dataloader", pl_module):
        return {}
    return None


def _broadcast_from_rank_zero(trainer: pl.Trainer, layers: Any) -> None:
    """Under DDP, give every rank rank zero's float weights before quantizing: quantization statistics are not
    parameters, so DDP's own broadcast at wrap time could not reconcile ranks that started from different weights."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    device = trainer.strategy.root_device
    with torch.no_grad():
        for layer in layers:
            for p in (layer.weight, layer.bias):
                if p is not None:
                    t = p.detach().to(device)
                    torch.distributed.broadcast(t, src=0)
                    p.copy_(t)


# ---------------------------------------------------------------------- replay
def replay_quantization(model: nn.Module, state: dict[str, Any]) -> None:
    """Recreate the quantized layers and adapters a :class:`Quantization` state records, in place, so that the
    checkpoint's weights load into ``model``. Layers already quantized as recorded are left alone.

    Raises:
        ValueError: ``model`` is quantized differently from the record (other layers, mode or adapters).
    """
    if not state.get("applied"):
        return
    if state.get("backend") == "torchao":
        replay_int8_(model, list(state.get("modules") or []), state.get("activation", "dynamic"))
        replay_int8_convs_(model, list(state.get("convs") or []))
        return
    names = list(state.get("modules") or [])
    present = quantized_layers(model)
    extra = [n for n in present if n not in names]
    if extra:
        raise ValueError(
            f"the checkpoint was made with quantized layers {names}, but {type(model).__name__} also has quantized "
            f"layers {extra}: quantize the same layers (`modules` / `exclude`) as the checkpoint"
        )
    modes = dict(state.get("layer_modes") or {})  # per-layer formats (``layer_bits``); absent in 0.1.0 checkpoints
    for name in names:
        if name in present:
            cfg = layer_config(present[name])
            want = {k: state[k] for k in ("mode", "double_quant", "block_size") if k in cfg}
            if "mode" in want:
                want["mode"] = modes.get(name, state["mode"])
            if {k: cfg[k] for k in want} != want:
                raise ValueError(
                    f"the checkpoint quantized {name!r} with {want}, but the model's layer is {cfg}: use the "
                    "checkpoint's `mode`, `double_quant` and `block_size`"
                )
    missing = {}
    for name in names:
        if name in present:
            continue
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"the checkpoint quantized {name!r}, which {type(model).__name__} does not have") from err
        if type(layer) is not nn.Linear:
            raise ValueError(f"the checkpoint quantized {name!r}, which is a {type(layer).__name__} in this model, not an nn.Linear")
        missing[name] = layer
    if missing:
        first = next(iter(missing.values()))
        dtype = _replay_dtype(state.get("compute_dtype"), first.weight.device)
        by_mode: dict[str, dict[str, nn.Linear]] = {}
        for name, layer in missing.items():
            by_mode.setdefault(modes.get(name, state["mode"]), {})[name] = layer
        for mode, layers in by_mode.items():
            quantize_layers_(model, layers, mode, bool(state.get("double_quant", True)), int(state.get("block_size", 64)), dtype, None)
    adapters = list(state.get("adapters") or [])
    if adapters:
        rank = int(state["adapter_rank"])
        layers = quantized_layers(model)
        for name in adapters:
            layer = layers.get(name)
            if layer is None:
                raise ValueError(f"the checkpoint has an adapter on {name!r}, which is not a quantized layer here")
            if layer.adapter is not None:
                if layer.adapter.rank != rank:
                    raise ValueError(f"{name!r} has an adapter of rank {layer.adapter.rank}, the checkpoint's is rank {rank}")
                continue
            layer.adapter = LoRAAdapter(
                layer.in_features,
                layer.out_features,
                rank,
                float(state["adapter_alpha"]),
                float(state["adapter_dropout"]),
                device=layer.weight.device,
            )


def _replay_dtype(name: str | None, device: torch.device) -> str:
    if name in ("fp32", "bf16", "fp16"):
        try:
            resolve_compute_dtype(name, device)
            return name
        except ValueError:
            pass
    return "auto"


# ---------------------------------------------------------------------- 8-bit optimizers
class EightBitOptimizer(AccelCallback):
    """Replace the optimizers built by ``configure_optimizers`` by their bitsandbytes 8-bit counterparts.

    ``Adam``, ``AdamW``, ``SGD`` (momentum), ``RMSprop``, ``Adagrad`` and ``Lion`` become ``Adam8bit``,
    ``AdamW8bit``, ``SGD8bit``, ``RMSprop8bit``, ``Adagrad8bit`` and ``Lion8bit`` over the same param groups with the
    same hyper-parameters (see :mod:`~lightning_accel.quantization.optimizers` for when the update rules match),
    in ``on_fit_start``, after the strategy built them; LR schedulers are re-pointed to the new optimizers. The
    checkpointed optimizer state is the 8-bit optimizer's own (about 0.25x the bytes), so a resumed run continues it.

    On a CPU the 8-bit optimizers save memory, not time: bitsandbytes' ``AdamW8bit`` step took 3.6x torch
    ``AdamW``'s on the 69k-parameter digits Transformer (4.7 vs 1.3 ms, 1 thread), which made a training step about
    1.4x slower. Converting an optimizer on a CPU warns once with a :class:`SlowOnCPUWarning`.

    Example::

        EightBitOptimizer()                       # AdamW -> AdamW8bit, 8-bit state for tensors >= 4096 elements
        EightBitOptimizer(min_size=1024, strict=False)

    Args:
        paged: use paged optimizers (CUDA unified memory; Adam, AdamW, Lion) that page state to CPU RAM under memory
            pressure, e.g. ``False``. No effect on a CPU.
        min_size: tensors with fewer elements keep 32-bit state (bitsandbytes' ``min_8bit_size``), e.g. ``4096``.
        strict: raise :class:`~lightning_accel.quantization.optimizers.UnsupportedOptimizerError` for an optimizer
            that cannot be converted; ``False``: leave it as it is with an :class:`OptimizerNotConvertedWarning`.

    Raises:
        ValueError: a bad argument; at fit start, a checkpoint whose optimizer state was saved by a 32-bit optimizer.
        UnsupportedOptimizerError: an optimizer without an 8-bit counterpart (``strict=True``), e.g. SGD with
            Nesterov momentum.
        ImportError: bitsandbytes is not installed (raised at setup).
    """

    stage: ClassVar[str] = "optimizer"
    capabilities: ClassVar[frozenset[str]] = frozenset({"owns_optimizer"})

    def __init__(self, paged: bool = False, min_size: int = 4096, strict: bool = True) -> None:
        super().__init__()
        self.paged = check_bool("paged", paged)
        self.min_size = check_int("min_size", min_size, low=0)
        self.strict = check_bool("strict", strict)
        self._converted: list[dict[str, Any]] = []
        self._resumed_formats: list[str] | None = None
        self._warned_cpu = False

    def state_dict(self) -> dict[str, Any]:
        return {"converted": copy.deepcopy(self._converted)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._converted = copy.deepcopy(state_dict.get("converted", []))

    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_bitsandbytes()
        self._resumed_formats = None  # set again below if this run restores a checkpoint

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # runs before on_fit_start; the optimizer states themselves are loaded after it
        self._resumed_formats = [_state_format(s) for s in checkpoint.get("optimizer_states") or []]

    def accel_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(trainer, fresh_only=False)
        formats, self._resumed_formats = self._resumed_formats, None
        for i, (fmt, opt) in enumerate(zip(formats or [], trainer.strategy.optimizers)):
            if fmt == "32-bit" and is_8bit_optimizer(opt):
                raise ValueError(
                    f"the checkpoint's state of optimizer {i} was saved by a 32-bit optimizer, but EightBitOptimizer "
                    f"made it a {type(opt).__name__}, which cannot load it: resume without EightBitOptimizer, or start "
                    "the 8-bit run from the model weights only"
                )

    def on_structure_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: AccelCallback) -> None:
        if trainer.state.fn == TrainerFn.FITTING and trainer.strategy.optimizers:
            self._convert(trainer, fresh_only=True)  # a technique may have rebuilt the optimizers

    def _convert(self, trainer: pl.Trainer, fresh_only: bool) -> None:
        device = trainer.strategy.root_device
        paged = self.paged
        if paged and device.type != "cuda":
            rank_zero_warn(f"EightBitOptimizer `paged`=True has no effect on {device.type}", category=QuantizationNoEffectWarning)
            paged = False
        optimizers = list(trainer.strategy.optimizers)
        changed = False
        for i, opt in enumerate(optimizers):
            if is_8bit_optimizer(opt):
                continue
            reason = why_not_8bit(opt)
            if reason is not None:
                if self.strict and not fresh_only:
                    raise UnsupportedOptimizerError(
                        f"EightBitOptimizer cannot convert optimizer {i} ({type(opt).__name__}): {reason}. "
                        "Pass `strict`=False to keep it as it is."
                    )
                rank_zero_warn(
                    f"EightBitOptimizer leaves optimizer {i} ({type(opt).__name__}) as it is: {reason}",
                    category=OptimizerNotConvertedWarning,
                )
                continue
            if paged and not has_paged_variant(opt):
                rank_zero_warn(
                    f"EightBitOptimizer `paged`=True has no effect on {type(opt).__name__}: bitsandbytes has no paged version",
                    category=QuantizationNoEffectWarning,
                )
            new = to_8bit_optimizer(opt, paged=paged, min_size=self.min_size)
            for config in trainer.lr_scheduler_configs:
                _repoint(config.scheduler, opt, new)
            optimizers[i] = new
            changed = True
            n8 = sum(p.numel() for g in new.param_groups for p in g["params"] if p.numel() >= self.min_size)
            total = sum(p.numel() for g in new.param_groups for p in g["params"])
            self._converted = [c for c in self._converted if c["index"] != i]
            self._converted.append({"index": i, "from": type(opt).__name__, "to": type(new).__name__})
            rank_zero_info(
                f"EightBitOptimizer: optimizer {i} {type(opt).__name__} -> {type(new).__name__}; 8-bit state for "
                f"{n8:,} of {total:,} parameters (tensors >= {self.min_size:,} elements)"
            )
        if changed:
            trainer.strategy.optimizers = optimizers  # also rebuilds the LightningOptimizer wrappers
            if device.type == "cpu" and not self._warned_cpu:
                self._warned_cpu = True
                rank_zero_warn(
                    "EightBitOptimizer on a CPU saves optimizer-state memory but not time: bitsandbytes' 8-bit update "
                    "steps are slower there than torch's (AdamW8bit measured 3.6x AdamW's step time on a small "
                    "Transformer). Remove EightBitOptimizer from a CPU run that is limited by time, not memory.",
                    category=SlowOnCPUWarning,
                )


def _state_format(optimizer_state: dict[str, Any]) -> str:
    states = [s for s in (optimizer_state.get("state") or {}).values() if s]
    if not states:
        return "empty"
    if any("state1" in s or "__bnb_optimizer_quant_state__" in s for s in states):
        return "bitsandbytes"
    return "32-bit"


def _repoint(scheduler: Any, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Point ``scheduler`` (and the schedulers it chains) from ``old`` to ``new``."""
    if getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new
        if is_step_marked(old):
            mark_step_for_lr_scheduler(new)
    for inner in getattr(scheduler, "_schedulers", None) or ():
        _repoint(inner, old, new)
