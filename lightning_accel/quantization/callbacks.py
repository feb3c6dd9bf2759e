"""When the Trainer quantizes: :class:`Quantization` (8/4-bit weights and adapters before training, or post-training
quantization after it).

The callback decides when and keeps the record; the work is done elsewhere: the setup-time path (a frozen quantized
base, adapters: :mod:`~lightning_accel.quantization.qlora`), the fit-end path (calibration, the metric guard, save and
export: :mod:`~lightning_accel.quantization.ptq`), the replay of a checkpoint
(:mod:`~lightning_accel.quantization.replay`), and the backends behind one protocol
(:mod:`~lightning_accel.quantization.backends`). :class:`~lightning_accel.EightBitOptimizer` lives in
:mod:`lightning_accel.optimizers`.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

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
from lightning_accel.deploy import FORMATS
from lightning_accel.errors import (  # noqa: F401 (public here too)
    MetricDropWarning,
    QuantizationNoEffectWarning,
    QuantizationWarning,
    SlowOnCPUWarning,
)
from lightning_accel.layer_settings import load_layer_bits
from lightning_accel.quantization.backends import QuantConfig, backends_of
from lightning_accel.quantization.bnb import BLOCK_SIZES, COMPUTE_DTYPES, MODES, resolve_compute_dtype
from lightning_accel.quantization.plan import check_backend_args, is_quantized, select_for, training_family
from lightning_accel.quantization.ptq import (
    batch_runner,
    calibration_batches,
    check_fit_end_args,
    choose_backend,
    export_quantized,
    forward_inputs,
    quantize_after_fit_,
    save_quantized,
    warn_if_slow,
)
from lightning_accel.quantization.qlora import (
    check_setup_args,
    quantize_for_training_,
    warn_unused_adapter_args,
)
from lightning_accel.quantization.replay import DEFAULT_RECORDED_BACKEND, replay_quantization

#: The user-facing ``backend`` values (each but ``"auto"`` a family of the backend registry).
BACKENDS: tuple[str, ...] = ("auto", "torchao", "bitsandbytes")

__all__ = [
    "BACKENDS",
    "Quantization",
    "QuantizationWarning",
    "MetricDropWarning",
    "QuantizationNoEffectWarning",
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
        export_format: the runtime of ``export_path`` (see :func:`lightning_accel.export`): ``"aoti"``,
            ``"program"``, ``"onnx"``, ``"openvino"`` or ``"auto"`` (each available format timed at batch 1 and the
            fastest within the accuracy tolerance kept); ``None``: from ``export_path``'s suffix and
            ``export_compile``, e.g. ``"auto"``.
        embeddings: ``when="fit_end"`` with torchao int8 (``backend="torchao"``, or ``"auto"`` on a CPU): also
            quantize the ``nn.Embedding`` tables to int8 weight-only (one scale per row), e.g. ``True`` for a text
            model, whose word-embedding table is most of its bytes.
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
        export_format: Literal["aoti", "program", "onnx", "openvino", "auto"] | None = None,
        calibration_batches: int = 32,
        layer_bits: dict[str, str] | str | None = None,
        embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.embeddings = check_bool("embeddings", embeddings)
        if embeddings and (when != "fit_end" or mode != "int8" or backend == "bitsandbytes"):
            raise ValueError(
                f"`embeddings`=True quantizes embedding tables with torchao int8 after the fit: it needs when='fit_end', "
                f"mode='int8' and backend 'torchao' or 'auto'; got when={when!r}, mode={mode!r}, backend={backend!r}"
            )
        self.calibration_batches = check_int("calibration_batches", calibration_batches, low=1)
        self.save_checkpoint = check_bool("save_checkpoint", save_checkpoint)
        if not isinstance(checkpoint_name, str) or not checkpoint_name or "/" in checkpoint_name:
            raise ValueError(f"`checkpoint_name` must be a file name like 'quantized.ckpt'; got {checkpoint_name!r}")
        self.checkpoint_name = checkpoint_name
        self.quantized_checkpoint_path: str | None = None
        self.export_path = check_str("export_path", export_path, "a file path like 'model.pt2'", allow_none=True)
        self.export_compile = check_bool("export_compile", export_compile)
        self.export_format = None if export_format is None else check_choice("export_format", export_format, (*FORMATS, "auto"))
        self.exported_path: str | None = None
        self.mode = check_choice("mode", mode, MODES)
        self.double_quant = check_bool("double_quant", double_quant)
        self.block_size = check_choice("block_size", block_size, BLOCK_SIZES)
        self.compute_dtype = check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
        self.backend = check_choice("backend", backend, BACKENDS)
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
        if when == "setup":
            check_setup_args(max_metric_drop=max_metric_drop)
        else:
            check_fit_end_args(adapter_rank=adapter_rank, max_metric_drop=max_metric_drop, monitor=monitor)
        if layer_bits is not None and not isinstance(layer_bits, (str, dict)):
            raise ValueError(
                f"`layer_bits` must be None, a dict {{layer name: 'int8' | 'nf4' | 'fp4' | 'float'}} or the path of a "
                f"sensitivity.json; got {layer_bits!r}"
            )
        self.layer_bits = layer_bits
        self._layer_bits: dict[str, str] | None = None if layer_bits is None else load_layer_bits(layer_bits)
        check_backend_args(backend, mode, when, adapter_rank, per_layer=self._layer_bits is not None)
        if mode == "int8" and (block_size != 64 or not double_quant):
            rank_zero_warn(
                "`block_size` and `double_quant` have no effect with `mode`='int8' (one scale per weight row)",
                category=QuantizationNoEffectWarning,
            )
        warn_unused_adapter_args(
            adapter_rank=adapter_rank, adapter_alpha=adapter_alpha, adapter_dropout=adapter_dropout, trainable=trainable
        )
        self._record = self._empty_record()
        self._monitor_checked = False
        self._recorder = ForwardRecorder()
        self.skipped: str | None = None

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
            "backend": DEFAULT_RECORDED_BACKEND,
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
        device = trainer.strategy.root_device
        if self.when != "setup":
            name = self._choose_backend(device, trainer.world_size)[0]  # a backend that cannot run here fails now
            family = self._family(name)
            for backend in family:
                backend.require()
            resolve_compute_dtype(self.compute_dtype, device)  # fp16 on a CPU fails here, before the fit
            if not is_quantized(pl_module):
                select_for(pl_module, family, self.modules, self.exclude, self.mode)  # fails now, not after the fit
            if stage == "fit":  # not again for the validations
                warn_if_slow(family, self.mode, device)
            return
        family = backends_of(training_family(self.backend))
        for backend in family:
            backend.require()
        dtype = resolve_compute_dtype(self.compute_dtype, device)  # fp16 on a CPU fails here, before any change
        record = quantize_for_training_(
            trainer,
            pl_module,
            family,
            self._config(dtype),
            modules=self.modules,
            exclude=self.exclude,
            layer_bits=self.layer_bits,
            adapter_rank=self.adapter_rank,
            adapter_alpha=self.adapter_alpha,
            adapter_dropout=self.adapter_dropout,
            trainable=self.trainable,
        )
        self._record.update(record)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.when == "fit_end"
            and self.monitor is not None
            and not self._monitor_checked
            and trainer.state.fn == TrainerFn.FITTING
        ):
            check_logged(self, self.monitor, trainer.callback_metrics, pl_module)
            self._monitor_checked = True

    def skip(self, reason: str) -> None:
        """Leave the model float at fit end (``when="fit_end"``), logging ``reason``: for a planner
        (:class:`~lightning_accel.AutoCompress`) that measured that int8 does not pay here."""
        self.skipped = check_str("reason", reason, "why the model stays float")

    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "fit_end" or is_quantized(pl_module):
            return
        if self.skipped is not None:
            rank_zero_info(f"Quantization: the model stays float: {self.skipped}")
            return
        device = trainer.strategy.root_device
        name, why = self._choose_backend(device, trainer.world_size)
        config = self._config(resolve_compute_dtype(self.compute_dtype, device), run=batch_runner(pl_module, self._recorder.example))
        record = quantize_after_fit_(
            trainer,
            pl_module,
            self._family(name),
            config,
            why=why,
            modules=self.modules,
            exclude=self.exclude,
            layer_bits=self.layer_bits,
            monitor=self.monitor,
            monitor_mode=self.monitor_mode,
            max_metric_drop=self.max_metric_drop,
            calibration=lambda: calibration_batches(trainer, self.calibration_batches),
            adapter_alpha=self.adapter_alpha,
            adapter_dropout=self.adapter_dropout,
        )
        if record is None:
            return
        if record.get("reverted"):
            self._record = {**self._empty_record(), **record}
            return
        self._record.update(record)
        if self.save_checkpoint:
            self.quantized_checkpoint_path = save_quantized(trainer, self.checkpoint_name) or self.quantized_checkpoint_path
        if self.export_path is not None:
            example = getattr(pl_module, "example_input_array", None)
            if example is None:
                example = self._recorder.example
            calibration = None
            if self.export_format in ("onnx", "openvino", "auto"):  # runtimes that calibrate their own activations
                batches = calibration_batches(trainer, min(self.calibration_batches, 8))
                calibration = forward_inputs(pl_module, batches, batch_runner(pl_module, self._recorder.example))
            self.exported_path = export_quantized(
                trainer, pl_module, self.export_path, example, self.export_compile, self.export_format, calibration
            )

    # ------------------------------------------------------------------ helpers
    def _choose_backend(self, device: Any, world_size: int = 1) -> tuple[str, str]:
        """The user-facing backend of this run's post-training quantization, and why (logged)."""
        return choose_backend(self.backend, self.mode, device, world_size, per_layer=self._layer_bits is not None)

    def _family(self, name: str) -> tuple[Any, ...]:
        """The backends of the user-facing backend ``name``; embedding tables only with ``embeddings=True``."""
        family = tuple(b for b in backends_of(name) if self.embeddings or not b.embeddings)
        if self.embeddings and not any(b.embeddings for b in family):
            rank_zero_warn(
                f"Quantization: `embeddings`=True has no effect with the {name} backend (no embedding quantization there)",
                category=QuantizationNoEffectWarning,
            )
        return family

    def _config(self, dtype: Any, run: Any = None) -> QuantConfig:
        return QuantConfig(
            mode=self.mode,
            double_quant=self.double_quant,
            block_size=self.block_size,
            compute_dtype=dtype,
            layer_modes=self._layer_bits,
            run=run,
        )

