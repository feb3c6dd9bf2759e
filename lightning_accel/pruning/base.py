"""What the pruning callbacks share: :class:`BasePruning` (in the spirit of Lightning's ``BaseFinetuning``).

It owns the schedule arguments and their validation, the schedule's progress (the last event and the end of
training it resolved) with the state's versioning, and the hooks that decide *when* to prune: an event every
``frequency`` steps or epochs from ``start``, and always at ``end``. A subclass implements :meth:`_prune_to`
(what one event does) and may override :meth:`_ready`, :meth:`_before_batch`, :meth:`_technique_state` and
:meth:`_load_technique_state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_accel._lifecycle import AccelCallback
from lightning_accel._validate import check_choice, check_int, check_number, check_str
from lightning_accel.evaluation import logged_metric
from lightning_accel.layer_settings import load_layer_amounts
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
        layer_amounts: per-layer final amounts (a dict or a ``sensitivity.json`` path), see the subclasses.
        monitor, monitor_mode, max_metric_drop: the accuracy guard, see the subclasses.

    The accuracy guard: with ``monitor`` and ``max_metric_drop`` set, every validation of the fit compares
    ``monitor`` with its *reference*, the last value validated before the schedule's first pruning event (or the
    first one validated after it, if none came before). While it is worse by more than ``max_metric_drop``, the
    schedule is paused: its events are skipped (counted in :attr:`guard`), nothing more is pruned, and what is
    pruned stays pruned; the next validation within the limit resumes it at the schedule's target of that time.
    Under DDP rank zero's value decides. The guard (reference, paused, skipped events) is in ``state_dict()``.
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
        layer_amounts: Mapping[str, float] | str | None = None,
        monitor: str | None = None,
        monitor_mode: str = "max",
        max_metric_drop: float | None = None,
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
        if layer_amounts is not None and not isinstance(layer_amounts, (str, Mapping)):
            raise ValueError(
                f"`layer_amounts` must be None, a dict {{layer name: amount}} or the path of a sensitivity.json; got {layer_amounts!r}"
            )
        self.layer_amounts = layer_amounts
        self._layer_amounts: dict[str, float] | None = None if layer_amounts is None else load_layer_amounts(layer_amounts)
        if self._layer_amounts is not None and amount == 0.0:
            raise ValueError(
                "`amount` must be > 0 with `layer_amounts`: each layer's target is its amount scaled by the schedule's "
                "progress (target / amount); got amount=0.0"
            )
        self.monitor = check_str("monitor", monitor, "a logged validation metric like 'val_acc'", allow_none=True)
        self.monitor_mode = check_choice("monitor_mode", monitor_mode, ("max", "min"))
        self.max_metric_drop = check_number("max_metric_drop", max_metric_drop, low=0.0, allow_none=True)
        if (monitor is None) != (max_metric_drop is None):
            raise ValueError(
                f"the accuracy guard needs both `monitor` and `max_metric_drop` (or neither); got monitor={monitor!r}, "
                f"max_metric_drop={max_metric_drop!r}"
            )
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
        self._guard: dict[str, Any] = {
            "reference": None, "last": None, "paused": False, "events_skipped": 0, "pauses": 0, "skipped_t": None,
        }

    @property
    def guard(self) -> dict[str, Any]:
        """The accuracy guard: ``monitor``, ``max_metric_drop``, ``reference`` (the metric at the schedule's
        start), ``last`` (the latest validated value), ``paused``, ``pauses`` (times it paused), ``events_skipped``."""
        return {"monitor": self.monitor, "max_metric_drop": self.max_metric_drop, **{k: v for k, v in self._guard.items() if k != "skipped_t"}}

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self._STATE_VERSION,
            "last_t": self._last_t,
            "end": self._end if self._end is not None else self._loaded_end,
            "guard": dict(self._guard),
            "layer_amounts": self._layer_amounts,
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
        if state_dict.get("guard") is not None:  # absent in checkpoints of 0.1.0
            self._guard = {**self._guard, **state_dict["guard"]}
        if state_dict.get("layer_amounts") is not None:  # the targets the run started with, even if the file changed
            self._layer_amounts = dict(state_dict["layer_amounts"])
        self._load_technique_state(state_dict)

    # ------------------------------------------------------------------ planners
    def set_targets(self, amount: float, layer_amounts: Mapping[str, float] | None = None) -> None:
        """Replace the final targets, e.g. by a planner (:class:`~lightning_accel.AutoCompress`) that decides them at
        fit start or holds a group back mid-schedule: ``amount`` (``0 <= amount < 1``) and per-layer ``layer_amounts``
        (each in ``[0, 1)``, scaled by the schedule's progress as usual). Units already removed stay removed. The
        targets are part of ``state_dict()``, so a resumed run continues with them."""
        check_number("amount", amount, low=0.0, high=1.0, high_inclusive=False)
        if layer_amounts is not None:
            for k, a in layer_amounts.items():
                check_number(f"layer_amounts[{k!r}]", a, low=0.0, high=1.0, high_inclusive=False)
            if amount <= 0.0 and any(a > 0 for a in layer_amounts.values()):
                raise ValueError(f"`amount` must be > 0 with `layer_amounts`: their targets scale with target / amount; got {amount}")
        self.amount = float(amount)
        self._layer_amounts = None if layer_amounts is None else {k: float(a) for k, a in layer_amounts.items()}

    def set_schedule(self, *, end: int, interval: str | None = None, frequency: int = 1) -> None:
        """Replace where the schedule ends (``end``, in ``interval`` units) and how often it prunes, before the fit's
        first event: for planners that fit the schedule to the training length at fit start."""
        check_int("end", end, low=max(self.start, 1))
        check_int("frequency", frequency, low=1)
        if interval is not None:
            self.interval = check_choice("interval", interval, ("epoch", "step"))
        self.end, self.frequency = int(end), int(frequency)
        if self._end is not None:  # already resolved at fit start
            self._end = int(end)

    # ------------------------------------------------------------------ per-layer targets and the guard
    def layer_targets(self, target: float) -> dict[str, float] | None:
        """Each layer's target when the schedule's target is ``target``: its ``layer_amounts`` entry scaled by
        ``target / amount`` (``None`` without ``layer_amounts``)."""
        if self._layer_amounts is None:
            return None
        scale = target / self.amount if self.amount > 0 else 0.0
        return {name: min(a * scale, a) for name, a in self._layer_amounts.items()}

    def _pruning_started(self) -> bool:
        return self._last_t is not None and self.target_at(self._last_t) > 0.0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or trainer.state.fn != TrainerFn.FITTING:
            return
        value = logged_metric(trainer, pl_module, self.monitor, self)  # refused at the sanity check already
        if trainer.sanity_checking:
            return
        value = float(trainer.strategy.broadcast(value, src=0))  # one decision on every rank
        g = self._guard
        g["last"] = value
        if g["reference"] is None or not self._pruning_started():
            g["reference"] = value
        drop = g["reference"] - value if self.monitor_mode == "max" else value - g["reference"]
        paused = drop > (self.max_metric_drop or 0.0) + 1e-12
        if paused != g["paused"]:
            g["paused"] = paused
            g["pauses"] += int(paused)
            verb = "paused" if paused else "resumed"
            rank_zero_info(
                f"{type(self).__name__}: schedule {verb} at step {trainer.global_step}: {self.monitor}={value:.4f}, "
                f"{drop:+.4f} below the reference {g['reference']:.4f} (limit {self.max_metric_drop})"
            )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"pruning/guard_paused": float(paused)}, step=trainer.global_step)

    def report_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """What :class:`~lightning_accel.AccelerationReport` shows when the guard or per-layer targets are used:
        the final target, how far the schedule got, and the guard."""
        if self.monitor is None and self._layer_amounts is None:
            return None
        return {
            "technique": type(self).__name__,
            "target": self.amount,
            "reached": self._reached(),
            "layer_amounts": self._layer_amounts,
            "guard": self.guard if self.monitor is not None else None,
        }

    def _log_guard(self) -> None:
        """At fit end: how far the schedule got, when the guard held it."""
        g = self._guard
        if self.monitor is None or not (g["events_skipped"] or g["paused"]):
            return
        rank_zero_info(
            f"{type(self).__name__}: the accuracy guard held {g['events_skipped']} events ({g['pauses']} pauses"
            f"{', still paused at the end' if g['paused'] else ''}); reached {self._reached():.1%} of the {self.amount:.0%} "
            f"target ({self.monitor} {g['last']} vs reference {g['reference']})"
        )

    def _reached(self) -> float:
        """The fraction the schedule reached (sparsity or amount pruned), in the units of ``amount``."""
        return 0.0

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
        if self._guard["paused"]:
            if self._guard["skipped_t"] != t:
                self._guard["skipped_t"] = t
                self._guard["events_skipped"] += 1
                if self.verbose >= 2:
                    rank_zero_info(f"{type(self).__name__}: {self.interval} {t}: event skipped, the accuracy guard holds the schedule")
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
