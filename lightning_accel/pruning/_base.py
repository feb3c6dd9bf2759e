"""What the pruning callbacks share: :class:`BasePruning` (in the spirit of Lightning's ``BaseFinetuning``).

It owns the schedule arguments and their validation, the schedule's progress (the last event and the end of
training it resolved) with the state's versioning, and the hooks that decide *when* to prune: an event every
``frequency`` steps or epochs from ``start``, and always at ``end``. A subclass implements :meth:`_prune_to`
(what one event does) and may override :meth:`_ready`, :meth:`_before_batch`, :meth:`_technique_state` and
:meth:`_load_technique_state`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_accel._lifecycle import AccelCallback
from lightning_accel._validate import check_choice, check_int
from lightning_accel.schedules import check_schedule_args, is_event, sparsity_at

__all__ = ["BasePruning"]

_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


class BasePruning(AccelCallback):
    """Base of :class:`~lightning_accel.ScheduledPruning` and :class:`~lightning_accel.StructuredPruning`.

    Events: with ``interval="step"`` before and after optimizer steps (``t = trainer.global_step``); with
    ``interval="epoch"`` before an epoch's first batch (``t = current_epoch``) and after its last
    (``t = current_epoch + 1``). Each ``t`` is an event at most once, also across a resume.

    Args:
        amount, initial_amount, schedule, interval, start, end, frequency: the shared schedule, see
            :func:`lightning_accel.schedules.check_schedule_args` and the subclasses.
        seed: seed of the subclass's random choices.
        verbose: ``0``, ``1`` or ``2``.
    """

    stage: ClassVar[str] = "structure"
    _STATE_VERSION: ClassVar[int] = 1
    #: the category of the schedule's no-effect warnings
    _WARNING: ClassVar[type[Warning]] = UserWarning

    def __init__(
        self,
        amount: float,
        initial_amount: float,
        schedule: str,
        interval: str,
        start: int,
        end: int | None,
        frequency: int,
        seed: int,
        verbose: int,
    ) -> None:
        super().__init__()
        check_schedule_args(
            amount=amount, initial_amount=initial_amount, schedule=schedule, interval=interval,
            start=start, end=end, frequency=frequency,
        )
        check_int("seed", seed)
        check_choice("verbose", verbose, (0, 1, 2))
        self.amount = float(amount)
        self.initial_amount = float(initial_amount)
        self.schedule = schedule
        self.interval = interval
        self.start = start
        self.end = end
        self.frequency = frequency
        self.seed = seed
        self.verbose = verbose
        self._reset_progress()

    # ------------------------------------------------------------------ what subclasses implement
    def _prune_to(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int, target: float) -> None:
        """Run the event at progress ``t`` with the schedule's ``target``; must set ``self._last_t = t``."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether events can run now (e.g. the weights are bound, an example input is known)."""
        return True

    def _before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Called before every training batch, before any event of that batch."""

    def _technique_state(self) -> dict[str, Any]:
        return {}

    def _load_technique_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ progress and its state
    def _reset_progress(self) -> None:
        self._last_t: int | None = None
        self._end: int | None = None
        self._loaded_end: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self._STATE_VERSION,
            "last_t": self._last_t,
            "end": self._end if self._end is not None else self._loaded_end,
            **self._technique_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != self._STATE_VERSION:
            raise ValueError(
                f"{type(self).__name__} state version {version!r} is not supported (expected {self._STATE_VERSION})"
            )
        self._last_t = state_dict["last_t"]
        self._loaded_end = state_dict["end"]
        self._load_technique_state(state_dict)

    # ------------------------------------------------------------------ when to prune
    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in _UNSUPPORTED_STRATEGIES):
            raise ValueError(
                f"{type(self).__name__} supports single-device and DDP strategies; got {strategy}, which shards or "
                "flattens parameters"
            )

    def _resolve_end(self, trainer: pl.Trainer) -> int:
        """The last event: ``end``, else the end a resumed run started with, else the end of training."""
        name = type(self).__name__
        if self.end is not None:
            end = self.end
        elif self._loaded_end is not None:
            end = self._loaded_end
        elif self.interval == "step":
            total = trainer.estimated_stepping_batches
            if total is None or total == float("inf") or total < 0:
                raise ValueError(f"{name} `end=None` needs a known training length (max_epochs or max_steps); set `end`")
            end = int(total)
        else:
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                raise ValueError(f"{name} `end=None` with `interval='epoch'` needs `max_epochs`; set `end`")
            end = int(trainer.max_epochs)
        if end < self.start:
            rank_zero_warn(
                f"{name} `start={self.start}` is after the end of training ({end} {self.interval}s): nothing will be pruned",
                category=self._WARNING,
            )
        return end

    def target_at(self, t: int) -> float:
        """The schedule's target at progress ``t`` (``end`` as resolved at fit start)."""
        end = self._end if self._end is not None else (self.end if self.end is not None else self.start)
        return sparsity_at(t, schedule=self.schedule, initial=self.initial_amount, final=self.amount, start=self.start, end=end)

    def _maybe_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        if self._end is None or not self._ready():
            return
        if self._last_t is not None and t <= self._last_t:
            return
        if not is_event(t, start=self.start, end=self._end, frequency=self.frequency):
            return
        self._prune_to(trainer, pl_module, t, self.target_at(t))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._before_batch(trainer, pl_module, batch)
        self._maybe_prune(trainer, pl_module, trainer.global_step if self.interval == "step" else trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.interval == "step":  # after the step: reaches the event at `end` after the very last step too
            self._maybe_prune(trainer, pl_module, trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._maybe_prune(trainer, pl_module, trainer.current_epoch + 1)
