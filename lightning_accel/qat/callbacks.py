"""When the Trainer fake-quantizes: :class:`QuantizationAwareTraining`.

The work is done by the pure functions of :mod:`~lightning_accel.qat.core`; this callback swaps the layers
in at setup (before optimizers, DDP and checkpoint restore), switches fake quantization and the observers on and
off by step, converts to real low-bit layers at the end of the fit, records what it did so checkpoints replay,
and logs.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal, cast

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._lifecycle import AccelCallback
from lightning_accel._select import set_submodule
from lightning_accel._validate import check_bool, check_choice, check_int, check_patterns
from lightning_accel.errors import SlowOnCPUWarning
from lightning_accel.qat.core import (
    BITS,
    GRANULARITIES,
    QATWarning,
    check_convertible,
    convert_qat_,
    converted_layers,
    fake_quantized_layers,
    prepare_qat_,
    replay_converted_,
    select_qat_layers,
    set_qat_flags_,
    strip_qat_,
    unconvert_,
)
from lightning_accel.quantization.ptq import save_quantized
from lightning_accel.quantization.torchao import SLOW_INT8_CPU, require_torchao, slow_int8_on

__all__ = ["CONVERT", "QuantizationAwareTraining"]

CONVERT: tuple[str, ...] = ("auto", "none", "torchao", "bitsandbytes")
_SETTINGS = ("bits", "granularity", "group_size", "symmetric", "activations")


class QuantizationAwareTraining(AccelCallback):
    """Train with fake-quantized weights (and optionally inputs), then convert to real int8 / int4 layers.

    Post-training quantization rounds weights the model never saw rounded; quantization-aware training (QAT) rounds
    them in every forward pass (torchao's fake quantizers, a straight-through gradient) so the model learns weights
    that survive it, and at the end of the fit the fake-quantized layers become the real low-bit layers of the
    inference backends ``Quantization`` uses. A run can train in float first and fake-quantize only its last part
    (``start``).

    * Linear layers: torchao ``FakeQuantizedLinear`` (``QATConfig``); Conv layers: a small ``nn.ConvNd`` subclass
      applying the same torchao fake quantizer to the weight, with a moving-average observer on the input. Both keep
      the model's parameters and ``state_dict`` keys (plus the observers' buffers) and the module's forward
      signature (keyword arguments included).
    * ``convert`` at fit end (see :mod:`~lightning_accel.qat.core` for the table): int8 Linear -> torchao
      dynamic int8 (CPU) or bitsandbytes int8 (CUDA); int4 Linear -> torchao packed int4 (CPU kernel), the trained
      values packed exactly; Conv -> PT2E ``X86InductorQuantizer`` static int8 convolution with the observed input
      range. ``lightning_accel.export`` takes the converted model.
    * Checkpoints: the fake-quantized layers are recreated from this callback's state before the weights load
      (:meth:`replay`), so ``fit(ckpt_path=...)``, ``test(ckpt_path=...)`` and ``lightning_accel.load_checkpoint``
      work; ``test`` / ``predict`` / a standalone ``validate`` of a fake-quantized checkpoint first convert it (with
      ``convert`` != ``"none"``), so they measure the model that would be deployed. Fitting the same model again
      continues QAT from the fake-quantized layers kept aside at conversion.

    Args:
        bits: weight bits, ``8`` or ``4``, e.g. ``4``.
        granularity: ``"per_channel"`` (one scale per output channel) or ``"per_group"`` (one per ``group_size``
            consecutive inputs), e.g. ``"per_group"``.
        group_size: inputs per scale with ``"per_group"``, e.g. ``32``.
        symmetric: symmetric weight grid (zero stays exactly zero, so pruned weights stay pruned), e.g. ``True``.
        activations: also fake-quantize the inputs of Linear layers (uint8, per tensor, moving-average range),
            e.g. ``True``. Convolutions always observe their input range (a real int8 convolution needs it); with
            ``activations=True`` they also train on its rounding.
        freeze_observers_at: global step from which the input ranges stop updating, e.g. ``300``; ``None``: never.
        start: global step at which fake quantization starts (float training before it), e.g. ``200``.
        modules: glob patterns on qualified or class names of the layers, e.g. ``["blocks.*"]``; ``None``: every
            ``nn.Linear`` and ``nn.ConvNd`` except the output layer.
        exclude: glob patterns removed from the selection, e.g. ``["embed"]``.
        convert: what the fit ends with: ``"auto"`` (int8 on a CPU and 4-bit: torchao; int8 on CUDA: bitsandbytes,
            as ``Quantization(backend="auto")``), ``"torchao"``, ``"bitsandbytes"`` (int8 only), or ``"none"`` (keep
            the fake-quantized model), e.g. ``"auto"``.
        save_checkpoint: after converting at fit end, write the converted model to ``checkpoint_name`` in the
            ``ModelCheckpoint``'s directory (weights and the states replay needs, no optimizer or LR-scheduler state:
            the file for :func:`lightning_accel.load_checkpoint` and ``test(ckpt_path=...)``; the run's own
            checkpoints hold the fake-quantized model), e.g. ``True``.
        checkpoint_name: file name of that checkpoint, e.g. ``"quantized.ckpt"``.

    Attributes:
        quantized_checkpoint_path: where the converted checkpoint was written (``None``: not written: no conversion,
            ``save_checkpoint=False``, or a run without a checkpoint directory).

    Raises:
        ValueError: a bad argument or combination (4-bit with bitsandbytes, per-group or affine int8 with a
            converter, ``freeze_observers_at`` before ``start``); at setup: a pattern that selects nothing, a
            ``group_size`` that does not divide a layer's inputs, layers the chosen converter cannot store, fitting a
            converted model whose fake-quantized layers are gone.
        ImportError: torchao is not installed (raised at setup).
        CompositionError: combined with another callback that replaces layers (``Quantization``, a second QAT).
    """

    stage: ClassVar[str] = "quantization"
    capabilities: ClassVar[frozenset[str]] = frozenset({"replaces_layers"})
    required_on_load: ClassVar[bool] = True

    def __init__(
        self,
        bits: Literal[8, 4] = 8,
        granularity: Literal["per_channel", "per_group"] = "per_channel",
        group_size: int = 64,
        symmetric: bool = True,
        activations: bool = False,
        freeze_observers_at: int | None = None,
        start: int = 0,
        modules: list[str] | None = None,
        exclude: list[str] | None = None,
        convert: Literal["auto", "none", "torchao", "bitsandbytes"] = "auto",
        save_checkpoint: bool = True,
        checkpoint_name: str = "quantized.ckpt",
    ) -> None:
        super().__init__()
        self.bits = check_choice("bits", check_int("bits", bits), BITS)
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        self.group_size = check_int("group_size", group_size, low=2)
        self.symmetric = check_bool("symmetric", symmetric)
        self.activations = check_bool("activations", activations)
        self.start = check_int("start", start, low=0)
        self.freeze_observers_at = check_int("freeze_observers_at", freeze_observers_at, low=0, allow_none=True)
        self.modules = check_patterns("modules", modules)
        self.exclude = check_patterns("exclude", exclude)
        self.convert = check_choice("convert", convert, CONVERT)
        self.save_checkpoint = check_bool("save_checkpoint", save_checkpoint)
        if not isinstance(checkpoint_name, str) or not checkpoint_name or "/" in checkpoint_name or "\\" in checkpoint_name:
            raise ValueError(f"`checkpoint_name` must be a file name like 'quantized.ckpt'; got {checkpoint_name!r}")
        self.checkpoint_name = checkpoint_name
        self.quantized_checkpoint_path: str | None = None
        if freeze_observers_at is not None and freeze_observers_at <= start:
            raise ValueError(
                f"`freeze_observers_at`={freeze_observers_at} must be after `start`={start}: the observers start with fake "
                "quantization and need some steps to see the input ranges"
            )
        if convert == "bitsandbytes" and bits == 4:
            raise ValueError(
                "`convert`='bitsandbytes' stores 4-bit weights as NF4/FP4 codes, not the uniform int4 grid `bits`=4 trains "
                "on; use convert='torchao' (packed int4), 'auto' or 'none'"
            )
        if convert != "none" and bits == 8 and (granularity != "per_channel" or not symmetric):
            raise ValueError(
                f"int8 layers convert with one symmetric scale per output channel; got `granularity`={granularity!r}, "
                f"`symmetric`={symmetric}: use granularity='per_channel', symmetric=True, or `convert`='none'"
            )
        self._state = self._empty_state()
        self._unconverted: dict[str, nn.Module] = {}  # fake-quantized layers replaced at conversion, for a next fit
        self._model_ref: Any = None

    # ------------------------------------------------------------------ state
    def _settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _SETTINGS}

    def _empty_state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "settings": self._settings(),
            "layers": {},  # name -> "linear" | "conv"
            "phase": "float",  # float -> qat -> frozen (observers) ; converted is in `converted`
            "started_at": None,
            "frozen_at": None,
            "last_step": 0,
            "converted": None,
        }

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        loaded = copy.deepcopy(state_dict)
        saved = loaded.get("settings") or {}
        differs = {k: (saved[k], getattr(self, k)) for k in _SETTINGS if k in saved and saved[k] != getattr(self, k)}
        if differs:
            listed = ", ".join(f"{k}: checkpoint {a!r}, callback {b!r}" for k, (a, b) in differs.items())
            raise ValueError(f"the checkpoint was trained with other QuantizationAwareTraining settings ({listed}); use the checkpoint's")
        self._state = {**self._empty_state(), **loaded}

    @property
    def record(self) -> dict[str, Any]:
        """What the callback did: the fake-quantized layers, when QAT started, the conversion."""
        return self.state_dict()

    @staticmethod
    def replay(model: nn.Module, state: dict[str, Any]) -> None:
        """Make ``model`` fit a checkpoint written with this state: fake-quantized layers (with their observers) as
        recorded, or the converted layers if the checkpoint holds a converted model. Converted layers of a model
        being given a fake-quantized checkpoint are turned back into fake-quantized ones (the weights then load).

        Raises:
            ValueError: a recorded layer is missing or of another type in ``model``.
        """
        layers = list(state.get("layers") or {})
        if not layers:
            return
        settings = state["settings"]
        converted = state.get("converted")
        if converted:
            replay_converted_(model, converted, settings)
            return
        present = converted_layers(model)
        unconvert_(model, [n for n in layers if n in present])
        missing = [n for n in layers if n not in fake_quantized_layers(model)]
        if missing:
            prepare_qat_(model, names=missing, **settings)

    # ------------------------------------------------------------------ hooks
    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_torchao()
        if stage != "fit":
            return
        if converted_layers(pl_module) and fake_quantized_layers(pl_module) == {}:
            if not self._unconverted:
                raise ValueError(
                    f"{type(pl_module).__name__} holds converted int8/int4 layers, which cannot train: fit a model built "
                    "afresh (or resume with ckpt_path= from a checkpoint saved before the conversion)"
                )
            for name, layer in self._unconverted.items():  # the same model fitted again: continue QAT
                set_submodule(pl_module, name, layer)
            self._unconverted = {}
            self._state["converted"] = None
            rank_zero_info("QuantizationAwareTraining: fitting again: the fake-quantized layers are back in place of the converted ones")
        chosen = select_qat_layers(pl_module, self.modules, self.exclude)
        if self.convert != "none":
            backend = self._backend(trainer)
            check_convertible(chosen, self.bits, self.granularity, self.symmetric, backend)
            if self.bits == 8 and backend == "torchao" and slow_int8_on(trainer.strategy.root_device):
                rank_zero_warn(f"QuantizationAwareTraining(bits=8) converts to torchao int8: {SLOW_INT8_CPU}", category=SlowOnCPUWarning)
        names = prepare_qat_(pl_module, self.modules, self.exclude, **self._settings())
        fq = fake_quantized_layers(pl_module)
        self._state["layers"] = {n: "linear" if isinstance(fq[n], nn.Linear) else "conv" for n in names}
        self._state["settings"] = self._settings()
        self._model_ref = pl_module
        self._apply_flags(pl_module, trainer.global_step)  # float until `start`
        n_lin = sum(v == "linear" for v in self._state["layers"].values())
        gran = "per channel" if self.granularity == "per_channel" else f"per group of {self.group_size}"
        rank_zero_info(
            f"QuantizationAwareTraining: {n_lin} Linear and {len(names) - n_lin} Conv layers fake-quantized to int{self.bits} "
            f"({gran}, {'symmetric' if self.symmetric else 'affine'}) from step {self.start}"
            + ("; inputs fake-quantized to int8" if self.activations else "")
            + (f"; converted at fit end with {self._backend(trainer)}" if self.convert != "none" else "")
        )

    def accel_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_flags(pl_module, trainer.global_step)  # after a resume, global_step is the checkpoint's

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._apply_flags(pl_module, trainer.global_step)

    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._state["last_step"] = trainer.global_step
        if self.convert == "none":
            return
        if self._state["started_at"] is None:
            rank_zero_warn(
                f"QuantizationAwareTraining: the fit ended at step {trainer.global_step}, before `start`={self.start}: the "
                "model never trained fake-quantized; it is kept fake-quantized, not converted",
                category=QATWarning,
            )
            return
        if self._convert(trainer, pl_module, "at fit end") and self.save_checkpoint:
            self.quantized_checkpoint_path = save_quantized(trainer, self.checkpoint_name, "QuantizationAwareTraining: the converted")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._convert_loaded(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_loaded(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_loaded(trainer, pl_module)

    def accel_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.state.status == TrainerStatus.INTERRUPTED and stage == "fit":
            # the fit failed: give the user back float layers (same parameters; the observers are in the checkpoints)
            strip_qat_(pl_module)
        self._model_ref = None

    def structure_settles_at(self, trainer: pl.Trainer) -> int | None:
        """The step where fake quantization starts (``start``), or where the observers freeze if later: the layers are
        swapped at setup, but each switch changes the code the forward runs. Conversion happens after training."""
        last = max(self.start, self.freeze_observers_at or 0)
        return last if last > 0 else None

    # ------------------------------------------------------------------ helpers
    def _backend(self, trainer: pl.Trainer) -> str:
        if self.convert != "auto":
            return self.convert
        if self.bits == 4:
            return "torchao"
        return "torchao" if trainer.strategy.root_device.type == "cpu" else "bitsandbytes"

    def _apply_flags(self, pl_module: nn.Module, step: int) -> None:
        on = step >= self.start
        observe = on and (self.freeze_observers_at is None or step < self.freeze_observers_at)
        set_qat_flags_(pl_module, weights=on, activations=on, observers=observe)
        if on and self._state["started_at"] is None:
            self._state["started_at"] = step
            self._state["phase"] = "qat"
            if step > 0:
                rank_zero_info(f"QuantizationAwareTraining: fake quantization starts at step {step}")
        if on and not observe and self._state["frozen_at"] is None:
            self._state["frozen_at"] = step
            self._state["phase"] = "frozen"
        self._state["last_step"] = step

    def _convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> bool:
        """Convert the fake-quantized layers; whether it did."""
        backend = self._backend(trainer)
        before = fake_quantized_layers(pl_module)
        try:
            record = convert_qat_(pl_module, backend)
        except ValueError as err:
            rank_zero_warn(f"QuantizationAwareTraining: not converted ({err}); the model stays fake-quantized", category=QATWarning)
            return False
        self._unconverted = before
        self._state["converted"] = record
        parts = []
        if record["linear"]:
            parts.append(f"{len(record['linear'])} Linear layers -> int{self.bits} ({backend})")
        if record["conv"]:
            parts.append(f"{len(record['conv'])} Conv layers -> PT2E int8 convolutions")
        rank_zero_info(f"QuantizationAwareTraining: converted {when}: {', '.join(parts)}")
        return True

    def _convert_loaded(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before test / predict / validate: a fake-quantized model (a checkpoint of a QAT fit) is converted first."""
        if self.convert == "none" or not fake_quantized_layers(pl_module) or self._state["started_at"] is None:
            return
        fn = cast(TrainerFn, trainer.state.fn)  # set: this runs from a test / predict / validate hook
        self._convert(trainer, pl_module, f"before {fn.value}")


