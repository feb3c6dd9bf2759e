"""When the Trainer swaps optimizers: :class:`EightBitOptimizer`.

The work is done by the pure functions of :mod:`~lightning_accel.optimizers.eight_bit`; this callback converts the
optimizers the strategy built (and those a technique rebuilds), re-points the LR schedulers, records what it did, and
logs.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_accel._compat import is_step_marked, mark_step_for_lr_scheduler
from lightning_accel._lifecycle import AccelCallback
from lightning_accel._validate import check_bool, check_int
from lightning_accel.errors import (  # noqa: F401 (public here too)
    OptimizerNotConvertedWarning,
    QuantizationNoEffectWarning,
    SlowOnCPUWarning,
    UnsupportedOptimizerError,
)
from lightning_accel.optimizers.eight_bit import (
    has_paged_variant,
    is_8bit_optimizer,
    to_8bit_optimizer,
    why_not_8bit,
)
from lightning_accel.quantization.bnb import require_bitsandbytes

__all__ = ["EightBitOptimizer"]


class EightBitOptimizer(AccelCallback):
    """Replace the optimizers built by ``configure_optimizers`` by their bitsandbytes 8-bit counterparts.

    ``Adam``, ``AdamW``, ``SGD`` (momentum), ``RMSprop``, ``Adagrad`` and ``Lion`` become ``Adam8bit``,
    ``AdamW8bit``, ``SGD8bit``, ``RMSprop8bit``, ``Adagrad8bit`` and ``Lion8bit`` over the same param groups with the
    same hyper-parameters (see :mod:`~lightning_accel.optimizers.eight_bit` for when the update rules match),
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
        strict: raise :class:`~lightning_accel.UnsupportedOptimizerError` for an optimizer
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
