"""When the Trainer changes precision: :class:`MixedPrecision`, over the pure core of
:mod:`lightning_accel.precision.core`.

It installs a Lightning AMP precision plugin from ``setup`` (before the strategy sets up), counts the optimizer
steps the fp16 loss scaler skips, logs ``precision/loss_scale`` and ``precision/skipped_steps``, and keeps the
scaler state in its own checkpoint state so a resumed fp16 run continues with the scale it had.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision as _LightningAMP
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_accel._compat import set_precision_plugin
from lightning_accel._lifecycle import AccelCallback
from lightning_accel._validate import check_choice, check_int, check_number, check_patterns
from lightning_accel.errors import CompositionError
from lightning_accel.precision.core import (
    DTYPES,
    DType,
    PrecisionChoice,
    PrecisionNoEffectWarning,
    PrecisionWarning,
    fp32_islands_,
    remove_fp32_islands_,
    resolve_precision,
)

__all__ = ["MixedPrecision"]


# ---------------------------------------------------------------------------------------------------------
# The Lightning plugin and callback
# ---------------------------------------------------------------------------------------------------------
#: consecutive skipped fp16 steps after which MixedPrecision warns that the model does not train
_SKIPS_BEFORE_WARNING = 8


class _AccelAMP(_LightningAMP):
    """Lightning's AMP plugin, counting the optimizer steps the loss scaler skips.

    The scaler state is saved by :class:`MixedPrecision` in its own callback state (restored before the
    strategy sets up), so this plugin contributes nothing of its own to the checkpoint.
    """

    def __init__(self, precision: str, device: str, scaler: torch.amp.GradScaler | None, owner: MixedPrecision) -> None:
        super().__init__(precision, device, scaler)  # type: ignore[arg-type]
        self.owner = owner

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:  # type: ignore[override]
        if self.scaler is None:
            return super().optimizer_step(optimizer, model, closure, **kwargs)
        before = self.scaler.get_scale()
        out = super().optimizer_step(optimizer, model, closure, **kwargs)
        after = self.scaler.get_scale()
        # GradScaler.update() lowers the scale exactly when it found inf/NaN gradients and skipped the step
        if after < before:
            self.owner._skipped_steps += 1
            self.owner._skipped_in_a_row += 1
            if self.owner._skipped_in_a_row == _SKIPS_BEFORE_WARNING:
                rank_zero_warn(
                    f"MixedPrecision: the last {_SKIPS_BEFORE_WARNING} optimizer steps were all skipped for non-finite "
                    f"fp16 gradients on {self.device} (loss scale now {after:g}): the model is not training. Check the loss "
                    "for inf/NaN, or train in dtype='bf16' (or 'auto'), which needs no loss scaling",
                    category=PrecisionWarning,
                )
        else:
            self.owner._skipped_in_a_row = 0
        self.owner._scale = float(after)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}


class MixedPrecision(AccelCallback):
    """Mixed-precision training chosen for the hardware, with float32 islands and visible loss scaling.

    From ``setup`` (before the strategy sets up) it installs Lightning's AMP precision plugin for the chosen
    dtype, so autocast covers the training, validation, test and predict steps. ``dtype="auto"`` picks bf16
    where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX, there only for a model that
    gains from it: one with a convolution, or whose largest Linear weight has at least ``CPU_BF16_MIN_WEIGHT`` =
    65,536 elements),
    else fp16 with dynamic loss scaling on CUDA, else float32; the choice and its reason are logged once. With fp16 the optimizer
    steps that the loss scaler skips for non-finite gradients are counted and logged with the loss scale
    (``precision/skipped_steps``, ``precision/loss_scale``), and the scaler state is part of this callback's
    checkpoint state. Pipeline stage ``precision``: after pruning and quantization, before ``TorchCompile``.

    Example::

        MixedPrecision()                                            # bf16 here (AVX512-BF16) for a wide model, fp16 on a T4
        MixedPrecision(dtype="bf16", fp32_modules=["LayerNorm", "head"])

    Args:
        dtype: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"``, e.g. ``"auto"``. An explicit dtype is honoured
            even where the device only emulates it or the model is too narrow for it to pay off on a CPU (with a
            :class:`PrecisionWarning`).
        fp32_modules: qualified-name or class-name glob patterns of modules computed in float32 inside the
            autocast region, e.g. ``["LayerNorm", "head"]`` (``None``: none).
        init_scale: initial fp16 loss scale, e.g. ``65536.0`` (fp16 only).
        growth_interval: consecutive finite steps before the fp16 loss scale doubles, e.g. ``2000`` (fp16 only).

    Raises:
        ValueError: a bad argument (raised here, before any model is touched).
        CompositionError: at ``setup``, the Trainer already sets a precision (``precision="bf16-mixed"`` or a
            precision plugin), or a second ``MixedPrecision`` is present.
        NoMatchError: at ``setup``, a ``fp32_modules`` pattern matches no module.
    """

    stage: ClassVar[str] = "precision"
    capabilities: ClassVar[frozenset[str]] = frozenset({"owns_precision"})

    def __init__(
        self,
        dtype: DType = "auto",
        fp32_modules: list[str] | None = None,
        init_scale: float = 65536.0,
        growth_interval: int = 2000,
    ) -> None:
        check_choice("dtype", dtype, DTYPES)
        check_patterns("fp32_modules", fp32_modules)
        check_number("init_scale", init_scale, low=0.0, low_inclusive=False)
        if init_scale == float("inf"):
            raise ValueError(f"`init_scale` must be a finite number > 0; got {init_scale!r}")
        check_int("growth_interval", growth_interval, low=1)
        self.dtype = dtype
        self.fp32_modules = list(fp32_modules) if fp32_modules else None
        self.init_scale = float(init_scale)
        self.growth_interval = growth_interval
        self.choice: PrecisionChoice | None = None
        self.fp32_module_names: list[str] = []
        self._skipped_steps = 0
        self._skipped_in_a_row = 0
        self._scale: float | None = None
        self._logged: dict[str, float] = {}
        self._plugin: _AccelAMP | None = None
        self._replaced: Precision | None = None
        self._pending_scaler: dict[str, Any] | None = None
        self._logged_choice = False

    # -- set-up ----------------------------------------------------------------------------------------------
    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        current = trainer.strategy.precision_plugin
        if not isinstance(current, _AccelAMP):
            _check_no_precision_set(trainer, current, self)
        device = trainer.strategy.root_device
        self.choice = resolve_precision(self.dtype, device, pl_module)
        if not self._logged_choice:
            rank_zero_info(f"MixedPrecision(dtype={self.dtype!r}): {self.choice.name} on {device.type}: {self.choice.reason}")
            self._logged_choice = True
        if self.dtype != "auto" and "slower than float32" in self.choice.reason:
            rank_zero_warn(f"MixedPrecision: {self.choice.reason}", category=PrecisionWarning)
        if self.choice.dtype == torch.float32:
            self._plugin = None
            if self.fp32_modules:
                rank_zero_warn(
                    f"MixedPrecision: `fp32_modules`={self.fp32_modules} has no effect: training runs in float32 "
                    f"({self.choice.reason})",
                    category=PrecisionNoEffectWarning,
                )
            return
        scaler = None
        if self.choice.dtype == torch.float16:
            scaler = torch.amp.GradScaler(device.type, init_scale=self.init_scale, growth_interval=self.growth_interval)
            if self._pending_scaler:
                scaler.load_state_dict(self._pending_scaler)
        precision = "bf16-mixed" if self.choice.dtype == torch.bfloat16 else "16-mixed"
        self._plugin = _AccelAMP(precision, device.type, scaler, self)
        if not isinstance(current, _AccelAMP):
            self._replaced = current
        set_precision_plugin(trainer, self._plugin)
        if self.fp32_modules:
            self.fp32_module_names = fp32_islands_(pl_module, self.fp32_modules)
            rank_zero_info(f"MixedPrecision: float32 islands: {', '.join(self.fp32_module_names)}")

    def accel_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        remove_fp32_islands_(pl_module)
        if self._plugin is not None and trainer.strategy.precision_plugin is self._plugin:
            if self._plugin.scaler is not None:  # keep the scale for a later stage of the same callback
                self._pending_scaler = self._plugin.scaler.state_dict()
            if self._replaced is not None:
                set_precision_plugin(trainer, self._replaced)
        self._plugin = None

    # -- progress and logging -------------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped by the fp16 loss scaler for non-finite gradients (across resumes)."""
        return self._skipped_steps

    @property
    def loss_scale(self) -> float | None:
        """The current fp16 loss scale (``None`` when no scaler is active)."""
        if self._plugin is not None and self._plugin.scaler is not None:
            return float(self._plugin.scaler.get_scale())
        if self._pending_scaler:
            return float(self._pending_scaler["scale"])
        return None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._plugin is None or self._plugin.scaler is None:
            return
        scale = self._scale if self._scale is not None else float(self._plugin.scaler.get_scale())
        values = {"precision/loss_scale": scale, "precision/skipped_steps": float(self._skipped_steps)}
        if values != self._logged or trainer.global_step % max(1, getattr(trainer, "log_every_n_steps", 50)) == 0:
            self._logged = values  # log when the scale or the count changed, else at the Trainer's log interval
            for k, v in values.items():
                pl_module.log(k, v, on_step=True, on_epoch=False)

    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._plugin is not None and self._plugin.scaler is not None:
            rank_zero_info(
                f"MixedPrecision: {self._skipped_steps} optimizer step(s) skipped for non-finite fp16 gradients; "
                f"final loss scale {self._plugin.scaler.get_scale():g}"
            )

    # -- checkpoint state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        scaler = None
        if self._plugin is not None and self._plugin.scaler is not None:
            scaler = self._plugin.scaler.state_dict()
        elif self._pending_scaler:
            scaler = dict(self._pending_scaler)
        return {
            "dtype": self.choice.name if self.choice is not None else None,
            "skipped_steps": self._skipped_steps,
            "scaler": scaler,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._skipped_steps = int(state_dict.get("skipped_steps", 0))
        saved, scaler = state_dict.get("dtype"), state_dict.get("scaler")
        if self.choice is not None and saved is not None and saved != self.choice.name:
            rank_zero_warn(
                f"MixedPrecision: the checkpoint was trained with {saved}, this run uses {self.choice.name} "
                f"({self.choice.reason})",
                category=PrecisionWarning,
            )
        if not scaler:
            return
        self._pending_scaler = dict(scaler)
        if self._plugin is not None and self._plugin.scaler is not None:
            self._plugin.scaler.load_state_dict(scaler)


def _check_no_precision_set(trainer: pl.Trainer, plugin: Precision, cb: MixedPrecision) -> None:
    """Raise when the Trainer already chose a precision other than the default ``"32-true"``."""
    if type(plugin) is Precision:
        return
    precision = getattr(plugin, "precision", None)
    if type(plugin).__module__.startswith("lightning.") and precision != "32-true":
        what = f"Trainer(precision={precision!r})"
    else:
        what = f"the precision plugin {type(plugin).__name__} (precision={precision!r}) set on the Trainer or its strategy"
    raise CompositionError(
        f"MixedPrecision(dtype={cb.dtype!r}) cannot be combined with {what}: both choose the training precision. "
        "Remove `precision=`/the precision plugin from the Trainer (MixedPrecision(dtype='bf16') is the "
        "equivalent of 'bf16-mixed', dtype='fp16' of '16-mixed'), or remove the MixedPrecision callback."
    )
