"""When the Trainer prunes structurally: :class:`StructuredPruning`, plus :func:`load_pruned` for inference.

What structured pruning *does* lives in :mod:`lightning_accel.pruning.structured`; this callback decides
when to call it along the shared schedule (:mod:`lightning_accel.schedules`), keeps the pruning history and
the schedule's progress in its ``state_dict``, replays the history into a freshly built model before a
checkpoint's weights load, fixes the optimizer, the DDP wrapper and compiled code after every event, and logs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._compose import AccelCallback, notify_structure_changed
from lightning_accel._validate import check_bool, check_choice, check_int, check_number, check_patterns
from lightning_accel.checkpoint import load_checkpoint, register_replay
from lightning_accel.pruning.structured import (
    IMPORTANCES,
    SCOPES,
    StructuredPruningError,
    StructuredPruningWarning,
    apply_pruning_plan_,
    build_group_regularizer,
    build_pruning_graph,
    count_macs_params,
    plan_structured_pruning,
    replay_pruning_,
    slice_optimizer_,
)
from lightning_accel.schedules import check_schedule_args, is_event, sparsity_at

__all__ = ["StructuredPruning", "load_pruned"]

_STATE_VERSION = 1
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


class StructuredPruning(AccelCallback):
    """Remove whole channels, neurons and attention heads during training, so the model gets physically
    smaller and faster, with torch-pruning's dependency graph deciding which layers shrink together.

    At every *event* of the schedule (each ``frequency`` epochs or steps from ``start``, and at ``end``) the
    least important units are removed until every prunable group (``scope="layer"``) or the model as a
    whole (``scope="global"``) reaches the schedule's target fraction of its *original* units; training
    continues in the same ``fit``. After an event the optimizer's parameters are re-bound in place and its
    state (momentum, Adam moments) sliced to the surviving channels, LR schedulers keep their progress, a
    DDP wrapper is rebuilt and compiled code is told to recompile (``on_structure_changed``).

    The pruning history is saved in the checkpoint: resuming with ``ckpt_path=`` into a freshly built model
    replays it before the weights load, and :func:`load_pruned` does the same for inference. Every event
    logs ``pruning/macs``, ``pruning/params``, ``pruning/macs_ratio`` (unpruned / now) and
    ``pruning/amount``. The model is traced on ``LightningModule.example_input_array`` or, without one, on
    the first sample of the first training batch.

    Example::

        trainer = Trainer(max_epochs=15, callbacks=[StructuredPruning(amount=0.5, start=1, end=8)])

    Args:
        amount: fraction of units removed at the end of the schedule, ``0 <= amount < 1``, e.g. ``0.5``.
            Removing half the channels of a CNN cuts its MACs about 4x.
        initial_amount: the target at ``start``, ``0 <= initial_amount <= amount``, e.g. ``0.0``.
        schedule: how the target moves from ``initial_amount`` to ``amount`` between ``start`` and ``end``:
            ``"one_shot"``, ``"linear"``, ``"cubic"`` or ``"exponential"`` (:mod:`lightning_accel.schedules`),
            e.g. ``"linear"``.
        interval: what ``start``, ``end`` and ``frequency`` count: ``"epoch"`` s or optimizer ``"step"`` s,
            e.g. ``"epoch"``. Epoch events run before the epoch's first batch (``t = current_epoch``) and after
            its last (``t = current_epoch + 1``); step events before and after optimizer steps.
        start: first event, e.g. ``1`` (epoch 0 trains the dense model first).
        end: last event, where ``amount`` is reached, e.g. ``8``; ``None``: the end of training (``max_epochs``
            or ``trainer.estimated_stepping_batches``). Leave epochs after it to fine-tune.
        frequency: events every this many epochs/steps from ``start``, e.g. ``1``.
        importance: how units are ranked: ``"l1"`` / ``"l2"`` (group magnitude), ``"taylor"`` (``|w * grad|``
            with gradients summed since the previous event), ``"bn_scale"`` (BatchNorm scale; ``l2`` where a
            group has none) or ``"random"`` (seeded by ``seed``), e.g. ``"l2"``.
        scope: ``"layer"`` (every group loses ``amount`` of its units) or ``"global"`` (``amount`` of all
            channels ranked together, and of all heads), e.g. ``"layer"``.
        max_layer_amount: no group loses more than this fraction of its units, ``0 < x <= 1``, e.g. ``0.9``.
        exclude: glob patterns on qualified module names (or class / parameter names) whose output channels
            are kept, with their submodules, e.g. ``["stem.*", "blocks.0.attn"]``. The output layer is always
            kept.
        round_to: kept channel counts are multiples of this, e.g. ``8`` (friendlier to vectorized kernels);
            ``None`` for any count. Heads are not rounded.
        prune_heads: attention modules (an int ``num_heads`` attribute and a fused ``qkv`` Linear, or
            ``q``/``k``/``v`` Linears) lose whole heads and their ``num_heads`` is updated (``True``), or lose
            head dimensions, every head staying (``False``), e.g. ``True``. Exclude an attention module to keep it.
        regularization_strength: group-sparsity regularization during training with torch-pruning's
            ``GroupNormPruner``, so unimportant groups fade before they are removed, ``>= 0``, e.g. ``1e-4``.
        optimizer_state: ``"slice"`` keeps the optimizer's statistics of surviving channels; ``"reset"``
            restarts them (as if the optimizer were rebuilt), e.g. ``"slice"``.
        seed: seed of ``importance="random"`` (the same channels on every rank and after a resume), e.g. ``0``.
        verbose: ``0`` only logs metrics, ``1`` adds a line per event and a summary at fit end, ``2`` adds the
            units left in every group, e.g. ``1``.

    Attributes:
        amount_pruned: the schedule target reached by the latest event.
        history: the recorded events (what :func:`lightning_accel.pruning.structured.replay_pruning_` replays).
        event_seconds: wall time of every event of this process (tracing, ranking, pruning, optimizer slicing,
            measuring); not checkpointed.

    Raises:
        ValueError: an argument is invalid (raised here, before any model or checkpoint is touched); at
            setup: the strategy shards parameters, or ``end`` is ``None`` and the training length is unknown;
            at resume: the checkpoint's history does not fit the model.
        StructuredPruningError: the model cannot be traced, or does not run once pruned; the message names the
            module and the ``exclude`` that avoids it, and the model is left unpruned.
    """

    order: ClassVar[int] = 15

    def __init__(
        self,
        amount: float = 0.5,
        initial_amount: float = 0.0,
        schedule: Literal["one_shot", "linear", "cubic", "exponential"] = "linear",
        interval: Literal["epoch", "step"] = "epoch",
        start: int = 0,
        end: int | None = None,
        frequency: int = 1,
        importance: Literal["l1", "l2", "taylor", "bn_scale", "random"] = "l2",
        scope: Literal["layer", "global"] = "layer",
        max_layer_amount: float = 0.9,
        exclude: list[str] | None = None,
        round_to: int | None = None,
        prune_heads: bool = True,
        regularization_strength: float = 0.0,
        optimizer_state: Literal["slice", "reset"] = "slice",
        seed: int = 0,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        check_schedule_args(
            amount=amount, initial_amount=initial_amount, schedule=schedule, interval=interval,
            start=start, end=end, frequency=frequency, intervals=("epoch", "step"),
        )
        check_choice("importance", importance, IMPORTANCES)
        check_choice("scope", scope, SCOPES)
        check_number("max_layer_amount", max_layer_amount, low=0.0, high=1.0, low_inclusive=False)
        self.exclude = check_patterns("exclude", exclude)
        check_int("round_to", round_to, low=1, allow_none=True)
        check_bool("prune_heads", prune_heads)
        check_number("regularization_strength", regularization_strength, low=0.0)
        check_choice("optimizer_state", optimizer_state, ("slice", "reset"))
        check_int("seed", seed)
        check_choice("verbose", verbose, (0, 1, 2))
        self.amount = float(amount)
        self.initial_amount = float(initial_amount)
        self.schedule = schedule
        self.interval = interval
        self.start = start
        self.end = end
        self.frequency = frequency
        self.importance = importance
        self.scope = scope
        self.max_layer_amount = float(max_layer_amount)
        self.round_to = round_to
        self.prune_heads = prune_heads
        self.regularization_strength = float(regularization_strength)
        self.optimizer_state = optimizer_state
        self.seed = seed
        self.verbose = verbose
        if amount == 0.0:
            rank_zero_warn("StructuredPruning(amount=0) removes nothing", category=StructuredPruningWarning)
        self._reset()
        self._module: pl.LightningModule | None = None

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self.amount_pruned = 0.0
        self.history: list[dict[str, Any]] = []
        self._last_t: int | None = None
        self._end: int | None = None
        self._loaded_end: int | None = None
        self._original: dict[str, int] | None = None
        self._base: tuple[int, int] | None = None  # MACs, params of the unpruned model
        self._shapes: dict[str, list[int]] = {}
        self._grad_sum: dict[str, torch.Tensor] = {}
        self._grad_steps = 0
        self._example: Any = None
        self._regularizer: Any = None
        self.metrics: dict[str, float] = {}
        self.event_seconds: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "last_t": self._last_t,
            "end": self._end if self._end is not None else self._loaded_end,
            "amount_pruned": self.amount_pruned,
            "original": self._original,
            "base": None if self._base is None else list(self._base),
            "history": self.history,
            "shapes": self._shapes,
            "grad_sum": {n: g.detach().cpu() for n, g in self._grad_sum.items()},
            "grad_steps": self._grad_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"StructuredPruning state version {version!r} is not supported (expected {_STATE_VERSION})")
        self._last_t = state_dict["last_t"]
        self._loaded_end = state_dict["end"]
        self.amount_pruned = float(state_dict["amount_pruned"])
        self._original = None if state_dict["original"] is None else dict(state_dict["original"])
        self._base = None if state_dict["base"] is None else (int(state_dict["base"][0]), int(state_dict["base"][1]))
        self.history = list(state_dict["history"])
        self._shapes = dict(state_dict["shapes"])
        self._grad_sum = dict(state_dict["grad_sum"])
        self._grad_steps = int(state_dict["grad_steps"])

    # ------------------------------------------------------------------ composition
    def conflicts_with(self, other: AccelCallback) -> str | None:
        name = type(other).__name__
        if name == "ScheduledPruning":
            return (
                "structured pruning removes channels and changes the weight shapes that unstructured masks are "
                "kept for; use one pruning callback per model"
            )
        if name == "StructuredPruning":
            return "both would prune the same model and record interleaved histories; keep one StructuredPruning"
        if "Quant" in name and getattr(other, "when", None) == "setup":
            return (
                "layers quantized at setup hold frozen integer weights that torch-pruning cannot shrink; prune "
                "first and quantize at the end (a `when` other than 'setup')"
            )
        return None

    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in _UNSUPPORTED_STRATEGIES):
            raise ValueError(
                f"StructuredPruning supports single-device and DDP strategies; got {strategy}, which shards or "
                "flattens parameters"
            )
        if stage == "fit":
            self._reset()  # a fresh fit; resuming loads the checkpoint's state after this
        self._hook_checkpoint_loading(pl_module)

    def _hook_checkpoint_loading(self, pl_module: pl.LightningModule) -> None:
        """Replay the checkpoint's pruning history right before Lightning loads its weights: Lightning calls
        the module's ``on_load_checkpoint`` with the whole checkpoint first, for fit, validate, test and predict."""
        current = pl_module.on_load_checkpoint
        if getattr(current, "_structured_pruning", None) is self:
            return
        callback = self

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = _find_state(checkpoint, callback.state_key)
            if state is not None:
                replay_pruning_(pl_module, state["history"], shapes=state["shapes"])
            return current(checkpoint)

        on_load_checkpoint._structured_pruning = self  # type: ignore[attr-defined]
        on_load_checkpoint._had_instance_attr = "on_load_checkpoint" in pl_module.__dict__  # type: ignore[attr-defined]
        on_load_checkpoint._previous = current  # type: ignore[attr-defined]
        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        self._module = pl_module

    def _unhook_checkpoint_loading(self) -> None:
        module = self._module
        if module is None:
            return
        hook = module.__dict__.get("on_load_checkpoint")
        if getattr(hook, "_structured_pruning", None) is self:
            if hook._had_instance_attr:  # type: ignore[union-attr]
                module.on_load_checkpoint = hook._previous  # type: ignore[union-attr,method-assign]
            else:
                del module.__dict__["on_load_checkpoint"]
        self._module = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unhook_checkpoint_loading()
        self._example = None
        self._regularizer = None
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ when to prune
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end = self._resolve_end(trainer)
        if self.verbose >= 1:
            rank_zero_info(
                f"StructuredPruning: to {self.amount:.0%} of the {'channels and heads' if self.prune_heads else 'channels'} "
                f"({self.scope} scope, {self.importance} importance), {self.schedule} schedule over "
                f"{self.interval}s {self.start}..{self._end}, every {self.frequency}"
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._example is None:
            self._example = _example_inputs(pl_module, batch)
        t = trainer.current_epoch if self.interval == "epoch" else trainer.global_step
        self._maybe_prune(trainer, pl_module, t)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step":  # after the step: reaches the event at `end` after the very last step too
            self._maybe_prune(trainer, pl_module, trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._maybe_prune(trainer, pl_module, trainer.current_epoch + 1)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.importance == "taylor" and self.amount_pruned < self.amount:
            self._accumulate_grads(pl_module)
        if self.regularization_strength > 0 and self._example is not None and self.amount_pruned < self.amount:
            if self._regularizer is None:
                self._regularizer = build_group_regularizer(
                    pl_module, self._example, self.regularization_strength, exclude=self.exclude, prune_heads=self.prune_heads
                )
            self._regularizer.regularize(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.verbose >= 1 and self._base is not None and self.metrics:
            rank_zero_info(
                f"StructuredPruning: fit ended at {self.amount_pruned:.0%} pruned: MACs {self._base[0]:,} -> "
                f"{int(self.metrics['pruning/macs']):,} ({self.metrics['pruning/macs_ratio']:.2f}x fewer), params "
                f"{self._base[1]:,} -> {int(self.metrics['pruning/params']):,}"
            )
        unfinished = self.amount_pruned + 1e-9 < self.amount and self._end is not None and (self._last_t or 0) < self._end
        if unfinished and not getattr(trainer, "fast_dev_run", False):
            rank_zero_warn(
                f"StructuredPruning: training ended at {self.amount_pruned:.0%} of the {self.amount:.0%} target; the "
                f"schedule ends at {self.interval} {self._end}",
                category=StructuredPruningWarning,
            )

    # ------------------------------------------------------------------ internals
    def _resolve_end(self, trainer: pl.Trainer) -> int:
        if self.end is not None:
            return self.end
        if self._loaded_end is not None:
            return self._loaded_end  # a resumed run keeps the schedule it started with
        if self.interval == "step":
            total = trainer.estimated_stepping_batches
            if total is None or total == float("inf") or total < 0:
                raise ValueError("StructuredPruning `end=None` needs a known training length (max_epochs or max_steps); set `end`")
            end = int(total)
        else:
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                raise ValueError("StructuredPruning `end=None` with `interval='epoch'` needs `max_epochs`; set `end`")
            end = int(trainer.max_epochs)
        if end < self.start:
            rank_zero_warn(
                f"StructuredPruning `start={self.start}` is after the end of training ({end} {self.interval}s): "
                "nothing will be pruned",
                category=StructuredPruningWarning,
            )
        return max(end, self.start)

    def _maybe_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        if self._end is None or self._example is None:
            return
        if self._last_t is not None and t <= self._last_t:
            return
        if not is_event(t, start=self.start, end=self._end, frequency=self.frequency):
            return
        target = sparsity_at(
            t, schedule=self.schedule, initial=self.initial_amount, final=self.amount, start=self.start, end=self._end
        )
        self._prune(trainer, pl_module, t, target)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int, target: float) -> None:
        started = time.perf_counter()
        if self._original is not None and target <= self.amount_pruned + 1e-12:
            self._last_t = t  # nothing more to remove at this event
            return
        graph = build_pruning_graph(pl_module, self._example, exclude=self.exclude, prune_heads=self.prune_heads)
        if self._original is None:  # the first event sees the unpruned model: sizes and MACs to compare with
            self._original = graph.unit_counts()
            self._base = count_macs_params(pl_module, self._example)
            if not graph.groups:
                rank_zero_warn(
                    f"StructuredPruning found no prunable group in {type(pl_module).__name__} (exclude={self.exclude}); "
                    "nothing will be pruned",
                    category=StructuredPruningWarning,
                )
            if target <= 0.0:
                self._last_t = t
                return
        plan = None
        if trainer.is_global_zero:
            with warnings.catch_warnings():
                if trainer.world_size > 1:
                    warnings.simplefilter("ignore", StructuredPruningWarning)
                plan = plan_structured_pruning(
                    graph,
                    target,
                    scope=self.scope,
                    importance=self.importance,
                    max_layer_amount=self.max_layer_amount,
                    round_to=self.round_to,
                    original=self._original,
                    grads=self._mean_grads(),
                    seed=self.seed,
                    event=t,
                )
        plan = trainer.strategy.broadcast(plan, src=0)  # every rank removes the same channels
        assert plan is not None
        result = apply_pruning_plan_(graph, plan)
        self._last_t = t
        self.amount_pruned = max(self.amount_pruned, target)
        if result.ops:
            dropped: list[str] = []
            for optimizer in trainer.optimizers:
                dropped += slice_optimizer_(optimizer, result.slices, reset=self.optimizer_state == "reset")
            if dropped:
                rank_zero_warn(
                    f"StructuredPruning could not slice the optimizer state of {len(dropped)} parameters "
                    f"({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}): it is not shaped like the "
                    "parameter (e.g. block-quantized 8-bit state); their statistics restart",
                    category=StructuredPruningWarning,
                )
            self._rebuild_ddp(trainer, pl_module)
            self._grad_sum, self._grad_steps, self._regularizer = {}, 0, None
            params = dict(pl_module.named_parameters())
            self._shapes.update({s.name: list(params[s.name].shape) for s in result.slices if s.name in params})
            notify_structure_changed(trainer, pl_module, self)
        macs, n_params = count_macs_params(pl_module, self._example)
        seconds = time.perf_counter() - started
        if result.ops:
            self.history.append({"t": t, "amount": target, "macs": macs, "params": n_params, **result.record()})
            self.event_seconds.append(seconds)
        assert self._base is not None
        self.metrics = {
            "pruning/macs": float(macs),
            "pruning/params": float(n_params),
            "pruning/macs_ratio": self._base[0] / max(macs, 1),
            "pruning/amount": float(self.amount_pruned),
            "pruning/event_seconds": seconds,
        }
        if self.verbose >= 1 and result.ops:
            left = f"; units left {result.units}" if self.verbose >= 2 else ""
            rank_zero_info(
                f"StructuredPruning: {self.interval} {t}: {self.amount_pruned:.0%} pruned, MACs {self._base[0]:,} -> "
                f"{macs:,} ({self.metrics['pruning/macs_ratio']:.2f}x fewer), params {n_params:,} in {seconds:.2f} s{left}"
            )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=trainer.global_step)

    def _rebuild_ddp(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap the pruned module in a new ``DistributedDataParallel``: the old one's reducer holds the old
        parameters (the same way ``DDPStrategy.setup`` built it)."""
        from torch.nn.parallel import DistributedDataParallel

        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel) and hasattr(strategy, "configure_ddp"):
            strategy.model = pl_module
            strategy.configure_ddp()

    def _accumulate_grads(self, pl_module: pl.LightningModule) -> None:
        for name, p in pl_module.named_parameters():
            g = p.grad
            if g is None or not torch.isfinite(g).all():
                continue
            acc = self._grad_sum.get(name)
            if acc is None or acc.shape != g.shape:
                self._grad_sum[name] = g.detach().float().clone()
            else:
                self._grad_sum[name] = acc.to(g.device).add_(g.detach().float())
        self._grad_steps += 1

    def _mean_grads(self) -> dict[str, torch.Tensor] | None:
        if self.importance != "taylor" or not self._grad_steps:
            return None
        return {n: g / self._grad_steps for n, g in self._grad_sum.items()}


def _find_state(checkpoint: Mapping[str, Any], state_key: str) -> dict[str, Any] | None:
    states = checkpoint.get("callbacks") or {}
    if state_key in states:
        return states[state_key]
    found = [s for k, s in states.items() if k.split("{", 1)[0] == "StructuredPruning"]
    return found[0] if len(found) == 1 else None


def _example_inputs(pl_module: pl.LightningModule, batch: Any) -> Any:
    example = getattr(pl_module, "example_input_array", None)
    if example is not None:
        return example
    x = batch
    if isinstance(x, (list, tuple)) and x:
        x = x[0]
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x[:1]
    raise StructuredPruningError(
        f"StructuredPruning needs an example input to trace {type(pl_module).__name__}; the first batch's first "
        f"element is a {type(x).__name__}, not a tensor. Set `self.example_input_array` in the LightningModule."
    )


def _replay(model: nn.Module, state: dict[str, Any]) -> None:
    replay_pruning_(model, state.get("history", []), shapes=state.get("shapes"))


register_replay("StructuredPruning", StructuredPruning.order, _replay)


def load_pruned(
    model: nn.Module | type,
    checkpoint: str | Path | dict[str, Any],
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    **init_kwargs: Any,
) -> nn.Module:
    """Load a checkpoint written by a run with :class:`StructuredPruning` into a plain model, for inference.

    ``LightningModule.load_from_checkpoint`` runs no callbacks and fails on the pruned shapes; this replays
    the recorded pruning history (and any other lightning-accel change, through
    :func:`lightning_accel.load_checkpoint`) before loading the weights.

    Example::

        model = load_pruned(ResidualCNN, "last.ckpt")       # built from the checkpoint's hyper-parameters
        load_pruned(my_model, "last.ckpt")                    # or an unpruned instance, pruned in place

    Args:
        model: an unpruned model instance, or a LightningModule class built from the checkpoint's
            ``hyper_parameters`` (updated by ``init_kwargs``), e.g. ``ResidualCNN``.
        checkpoint: a checkpoint path or an already loaded checkpoint dict, e.g. ``"last.ckpt"``.
        map_location: as for :func:`torch.load`, e.g. ``"cpu"``.
        strict: as for :meth:`torch.nn.Module.load_state_dict`, e.g. ``True``.

    Returns:
        The pruned model with the checkpoint's weights, in eval mode.

    Raises:
        ValueError: the recorded history does not fit the model (another architecture or width); the model
            is left unchanged.
    """
    return load_checkpoint(model, checkpoint, map_location=map_location, strict=strict, **init_kwargs)
