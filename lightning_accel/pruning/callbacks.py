"""When the Trainer prunes: :class:`ScheduledPruning` (unstructured masks) and :class:`StructuredPruning`
(channels, neurons, heads), both on the shared schedule of :class:`~lightning_accel.pruning.base.BasePruning`,
plus :func:`load_pruned` for inference.

What pruning *does* lives in the cores: :mod:`lightning_accel.pruning.unstructured` and the structured-pruning
modules (:mod:`~lightning_accel.pruning.graph`, :mod:`~lightning_accel.pruning.plan`,
:mod:`~lightning_accel.pruning.apply`, ...; :mod:`lightning_accel.pruning.structured` lists them); these callbacks
decide when to call it, keep their progress in their ``state_dict`` and log.

``ScheduledPruning`` uses no module hooks and no parametrizations: masks are multiplied into the weights in place
right after every optimizer step (an optimizer step post-hook) and into the gradients right before it, so the
model's code, its ``state_dict`` keys and any ``torch.compile``-d graph stay untouched.

``StructuredPruning`` keeps the pruning history in its ``state_dict``; its :meth:`~StructuredPruning.replay`
rebuilds the pruned shapes in a freshly built model before a checkpoint's weights load. After every event it
fixes the optimizer, the DDP wrapper and compiled code.
"""

from __future__ import annotations

import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_accel._compat import reconfigure_ddp
from lightning_accel._inputs import ForwardRecorder, example_from_batch
from lightning_accel._lifecycle import (
    STRUCTURE_UNKNOWN,
    AccelCallback,
    CompositionError,
    notify_structure_changed,
)
from lightning_accel._validate import check_bool, check_choice, check_int, check_number, check_patterns
from lightning_accel.checkpoint import load_checkpoint
from lightning_accel.errors import PruningNoEffectWarning, StructuredPruningError, StructuredPruningWarning
from lightning_accel.pruning.apply import apply_pruning_plan_
from lightning_accel.pruning.attention import check_attention_layouts
from lightning_accel.pruning.base import BasePruning
from lightning_accel.pruning.graph import build_pruning_graph
from lightning_accel.pruning.macs import count_macs_params
from lightning_accel.pruning.optimizer_state import slice_optimizer_
from lightning_accel.pruning.plan import IMPORTANCES, plan_structured_pruning
from lightning_accel.pruning.plan import SCOPES as STRUCTURED_SCOPES
from lightning_accel.pruning.regularizer import build_group_regularizer
from lightning_accel.pruning.replay import replay_pruning_
from lightning_accel.pruning.unstructured import (
    CRITERIA,
    REGULARIZATIONS,
    SCOPES,
    apply_masks_,
    broadcast_masks,
    compute_masks_with_counts,
    count_kept,
    mask_grads_,
    pack_mask,
    prunable_parameters,
    regularize_grads_,
    unpack_mask,
)

__all__ = ["PruningNoEffectWarning", "ScheduledPruning", "StructuredPruning", "load_pruned"]

_MIN_EVENT_GAP = 1e-3  # fraction of the selected weights: smaller steps of the schedule wait for the next event


class ScheduledPruning(BasePruning):
    """Gradual unstructured pruning: the selected weights reach ``amount`` sparsity along a schedule.

    At every *event* (each ``frequency`` steps or epochs from ``start``, and at ``end``) the weights with the
    lowest scores are zeroed until the schedule's target is reached; pruned weights stay pruned. Between
    events the masks are enforced after every optimizer step and pruned gradients are zeroed before it, so
    neither momentum nor weight decay can revive them. The model gets no hooks, parametrizations or extra
    ``state_dict`` keys, and a ``torch.compile``-d model keeps its graphs. Masks (bit-packed), the random
    generator and the schedule's progress are saved in the checkpoint; under DDP rank 0's masks are
    broadcast at every event.

    Example::

        trainer = Trainer(max_epochs=15, callbacks=[ScheduledPruning(amount=0.9, end=200, frequency=10)])

    Args:
        amount: final fraction of the selected weights that are zero, ``0 <= amount < 1``, e.g. ``0.9``.
        initial_amount: sparsity at ``start``, ``0 <= initial_amount <= amount``, e.g. ``0.0``.
        schedule: how the target moves from ``initial_amount`` to ``amount`` between ``start`` and ``end``:
            ``"one_shot"`` (all at ``start``), ``"linear"``, ``"cubic"`` (Zhu & Gupta 2017:
            ``s_f + (s_i - s_f) * (1 - p) ** 3``) or ``"exponential"``, e.g. ``"cubic"``.
        interval: what ``start``, ``end`` and ``frequency`` count: optimizer ``"step"`` s or ``"epoch"`` s,
            e.g. ``"step"``.
        start: first event, in ``interval`` units, e.g. ``0``.
        end: last event, where ``amount`` is reached, e.g. ``1000``; ``None``: the end of training
            (``trainer.estimated_stepping_batches`` steps or ``max_epochs`` epochs). Leave some
            fine-tuning after it for the best accuracy. A resumed run keeps the end its first run resolved.
        frequency: events every this many steps/epochs from ``start``, e.g. ``100``.
        criterion: ``"magnitude"`` (smallest ``|w|`` first) or ``"random"`` (seeded by ``seed``), e.g.
            ``"magnitude"``.
        scope: ``"global"`` (one ranking over all selected weights; at high sparsity it may empty a whole
            layer whose weights are all small) or ``"layer"`` (every weight at the same sparsity), e.g.
            ``"global"``.
        modules: glob patterns on qualified module names (or class names) choosing the Linear/Conv layers to
            prune, e.g. ``["blocks.*"]``; ``None``: all of them but the output layer.
        exclude: glob patterns removed from the selection, e.g. ``["stem.*"]``.
        prune_head: also prune the output layer (the last Linear/Conv) when ``modules`` is ``None``, e.g.
            ``False``. Biases and norm layers are never pruned.
        regularization: a sparsity-inducing penalty on the selected weights, applied every step through
            their gradients (the loss you log is untouched): ``"none"``, ``"l1"`` (adds
            ``strength * sign(w)``) or ``"l2"`` (adds ``strength * w``), e.g. ``"l1"``.
        regularization_strength: the penalty's coefficient, ``>= 0``, e.g. ``1e-5``.
        make_permanent: at fit end drop the masks and the optimizer hooks (zeros stay in the weights), e.g.
            ``True``; ``False`` keeps :attr:`masks` on the callback.
        rewind: lottery-ticket rewinding: at every event that prunes more, surviving weights go back to their
            values at ``start`` (iterative magnitude pruning; meant for ``interval="epoch"``), e.g. ``False``.
        seed: seed of the generator of ``criterion="random"``, e.g. ``0``.
        verbose: ``0`` logs only the ``pruning/sparsity`` metric, ``1`` adds a summary at fit start and end,
            ``2`` adds per-layer ``pruning/sparsity/<weight>`` metrics and a line per event, e.g. ``1``.
        layer_amounts: per-layer final amounts instead of one ``amount`` for all: ``{layer name: amount}`` or the
            path of a ``sensitivity.json`` written by :class:`~lightning_accel.SensitivityAnalysis` (its
            recommendation), e.g. ``"lightning_logs/version_0/sensitivity.json"``. Each layer follows the same
            schedule, its target scaled by the schedule's progress (``its amount * target(t) / amount``); layers not
            named keep ``amount``; ``scope`` is not used. Keys are module names (``"blocks.0.conv1"``; a ``.weight`` suffix is dropped); ``None``: one ``amount``.
        monitor: the validation metric of the accuracy guard, e.g. ``"val_acc"``; ``None``: no guard.
        monitor_mode: ``"max"`` if a higher ``monitor`` is better, ``"min"`` if lower is, e.g. ``"max"``.
        max_metric_drop: the guard pauses the schedule (no further pruning) while ``monitor`` is worse than its
            value at the schedule's start by more than this, until a validation is back within it, e.g. ``0.02``
            (see :class:`~lightning_accel.pruning.base.BasePruning`; the state is checkpointed, :attr:`guard`).

    Attributes:
        sparsity: fraction of the selected weights that are zero after the latest event.

    Raises:
        ValueError: an argument is invalid (raised here, before any model or checkpoint is touched); at fit
            start: the training length is unknown and ``end`` is ``None``, or the strategy shards parameters.
        NoMatchError: at setup, a ``modules``/``exclude`` pattern matches no Linear/Conv module (the message
            lists module names), or nothing is left to prune.
        CompositionError: at setup, combined with ``StructuredPruning``, with a quantization callback that
            freezes weights at setup, or with another ``ScheduledPruning`` on the same weights.
    """

    capabilities = frozenset({"masks_weights"})
    _WARNING = PruningNoEffectWarning

    def __init__(
        self,
        amount: float = 0.5,
        initial_amount: float = 0.0,
        schedule: Literal["one_shot", "linear", "cubic", "exponential"] = "cubic",
        interval: Literal["step", "epoch"] = "step",
        start: int = 0,
        end: int | None = None,
        frequency: int = 1,
        criterion: Literal["magnitude", "random"] = "magnitude",
        scope: Literal["global", "layer"] = "global",
        modules: list[str] | None = None,
        exclude: list[str] | None = None,
        prune_head: bool = False,
        regularization: Literal["none", "l1", "l2"] = "none",
        regularization_strength: float = 0.0,
        make_permanent: bool = True,
        rewind: bool = False,
        seed: int = 0,
        verbose: int = 1,
        layer_amounts: dict[str, float] | str | None = None,
        monitor: str | None = None,
        monitor_mode: Literal["max", "min"] = "max",
        max_metric_drop: float | None = None,
    ) -> None:
        super().__init__(
            amount, initial_amount, schedule, interval, start, end, frequency, seed, verbose,
            layer_amounts, monitor, monitor_mode, max_metric_drop,
        )
        check_choice("criterion", criterion, CRITERIA)
        check_choice("scope", scope, SCOPES)
        self.modules = check_patterns("modules", modules)
        self.exclude = check_patterns("exclude", exclude)
        check_bool("prune_head", prune_head)
        check_choice("regularization", regularization, REGULARIZATIONS)
        check_number("regularization_strength", regularization_strength, low=0.0)
        check_bool("make_permanent", make_permanent)
        check_bool("rewind", rewind)
        self.criterion = criterion
        self.scope = scope
        self.prune_head = prune_head
        self.regularization = regularization
        self.regularization_strength = float(regularization_strength)
        self.make_permanent = make_permanent
        self.rewind = rewind
        if amount == 0.0:
            rank_zero_warn("ScheduledPruning(amount=0) prunes nothing", category=PruningNoEffectWarning)
        if regularization == "none" and regularization_strength > 0:
            rank_zero_warn(
                f"`regularization_strength={regularization_strength}` has no effect with `regularization='none'`",
                category=PruningNoEffectWarning,
            )
        if regularization != "none" and regularization_strength == 0:
            rank_zero_warn(
                f"`regularization={regularization!r}` has no effect with `regularization_strength=0`",
                category=PruningNoEffectWarning,
            )
        if rewind and schedule == "one_shot":
            rank_zero_warn(
                "`rewind=True` has no effect with `schedule='one_shot'`: its only event is at `start`, where the "
                "weights already have their `start` values",
                category=PruningNoEffectWarning,
            )
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self._names: list[str] = []
        self._params: dict[str, nn.Parameter] = {}
        self._masks: dict[str, Tensor] = {}  # runtime masks, in each weight's dtype and device (fast multiply)
        self._kept: dict[str, int] = {}  # entries each mask keeps
        self._pending: dict[str, Tensor] | None = None  # masks loaded from a checkpoint, not yet bound
        self._reset_progress()
        self._generator = torch.Generator().manual_seed(self.seed)
        self._rewind_state: dict[str, Tensor] | None = None
        self._rewind_t: int | None = None
        # id(optimizer) -> (its selected weights, their masks), both by name
        self._groups: dict[int, tuple[dict[str, nn.Parameter], dict[str, Tensor]]] = {}
        self._hooks: list[Any] = []
        self._hooked: tuple[int, ...] = ()
        self.sparsity = 0.0

    def accel_state_key(self) -> str:
        return self._generate_state_key(modules=self.modules, exclude=self.exclude, prune_head=self.prune_head)

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks, ``{"<module>.weight": bool tensor}`` (``True`` keeps); empty before fit and
        after fit when ``make_permanent=True``."""
        if self._pending is not None and not self._masks:
            return {n: m.clone() for n, m in self._pending.items()}
        return {n: m != 0 for n, m in self._masks.items()}

    def _technique_state(self) -> dict[str, Any]:
        masks = self._masks if self._masks else (self._pending or {})
        return {
            "sparsity": self.sparsity,
            "masks": {n: pack_mask(m) for n, m in masks.items()},
            "generator": self._generator.get_state(),
            "rewind_t": self._rewind_t,
            "rewind": None if self._rewind_state is None else {n: t.detach().cpu() for n, t in self._rewind_state.items()},
        }

    def _load_technique_state(self, state_dict: dict[str, Any]) -> None:
        self.sparsity = float(state_dict["sparsity"])
        self._generator.set_state(state_dict["generator"])
        self._rewind_t = state_dict["rewind_t"]
        self._rewind_state = state_dict["rewind"] if self.rewind else None
        self._pending = {n: unpack_mask(p) for n, p in state_dict["masks"].items()}
        self._masks, self._kept = {}, {}
        if self._params:  # loaded after the fit started (not the Trainer's order): bind right away
            self._bind_pending()

    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        if trainer.global_step == 0:
            # a fresh fit (resuming loads the checkpoint's state after this); a second `fit` of the same
            # Trainer continues where the first ended
            self._reset()
        self._names = list(prunable_parameters(pl_module, self.modules, self.exclude, prune_head=self.prune_head))
        if self._layer_amounts is not None:
            layers = [n[: -len(".weight")] for n in self._names]
            unknown = sorted(set(self._layer_amounts) - set(layers))
            if unknown:
                raise ValueError(
                    f"ScheduledPruning `layer_amounts` names {unknown[:5]}, which it does not prune; selected layers: "
                    f"{layers[:40]} (change `modules` / `exclude` / `prune_head`, or the names)"
                )
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(other, ScheduledPruning) and other is not self and other._names:
                shared = sorted(set(other._names) & set(self._names))
                if shared:
                    raise CompositionError(
                        f"ScheduledPruning cannot be combined with ScheduledPruning: both prune {shared[:5]}; "
                        "give them disjoint `modules`/`exclude`"
                    )

    def on_structure_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: AccelCallback) -> None:
        if not self._params:
            return
        params = dict(pl_module.named_parameters())
        for name, mask in self._masks.items():
            p = params.get(name)
            if p is None or p.shape != mask.shape:
                raise RuntimeError(
                    f"{type(source).__name__} changed {name!r} (now {None if p is None else tuple(p.shape)}, masked "
                    f"as {tuple(mask.shape)}); ScheduledPruning cannot keep its masks"
                )
        self._params = {n: params[n] for n in self._names}  # type: ignore[misc]
        self._masks = {n: m.to(device=self._params[n].device, dtype=self._params[n].dtype) for n, m in self._masks.items()}
        self._refresh_groups(trainer)

    # ------------------------------------------------------------------ fit
    def accel_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end = self._resolve_end(trainer)
        params = dict(pl_module.named_parameters())
        missing = [n for n in self._names if n not in params]
        if missing:
            raise RuntimeError(f"ScheduledPruning: selected weights {missing[:5]} are no longer parameters of the model")
        self._params = {n: params[n] for n in self._names}  # type: ignore[misc]
        if self._pending is not None:
            self._bind_pending()
        elif set(self._masks) == set(self._params):  # the same Trainer fits again (make_permanent=False)
            self._masks = {n: m.to(device=self._params[n].device, dtype=self._params[n].dtype) for n, m in self._masks.items()}
            self._kept = {n: count_kept(m.float()) for n, m in self._masks.items()}
        else:  # all kept until the first event; the regularization already acts through them
            self._masks = {n: torch.ones_like(p, memory_format=torch.contiguous_format) for n, p in self._params.items()}
            self._kept = {n: p.numel() for n, p in self._params.items()}
        if self.verbose >= 1:
            n = sum(p.numel() for p in self._params.values())
            rank_zero_info(
                f"ScheduledPruning: {len(self._params)} weights ({n:,} entries) to {self.amount:.0%} sparsity, "
                f"{self.schedule} schedule over {self.interval}s {self.start}..{self._end}, every {self.frequency}"
            )

    def accel_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_hooks(trainer)

    def _before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        self._ensure_hooks(trainer)

    def _ready(self) -> bool:
        return bool(self._params)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        group = self._groups.get(id(optimizer))
        if group is not None:
            regularize_grads_(group[0], self.regularization, self.regularization_strength)
            mask_grads_(group[0], group[1])  # pruned entries get no gradient, so no momentum either

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        group = self._groups.get(id(optimizer))
        if group is not None:
            apply_masks_(group[0], group[1])

    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self._masks:
            apply_masks_(self._params, self._masks)
        if self.verbose >= 1:
            rank_zero_info(f"ScheduledPruning: fit ended at {self.sparsity:.2%} sparsity of the selected weights")
        self._log_guard()
        if self.make_permanent:
            self._masks, self._kept, self._params, self._rewind_state, self._groups = {}, {}, {}, None, {}

    def accel_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _reached(self) -> float:
        return float(self.sparsity)

    # ------------------------------------------------------------------ internals
    def _bind_pending(self) -> None:
        assert self._pending is not None
        unknown = sorted(set(self._pending) - set(self._params))
        if unknown:
            raise ValueError(
                f"the checkpoint's ScheduledPruning masks cover {unknown[:5]}, which this callback does not select "
                f"(selected: {sorted(self._params)[:5]}...); use the `modules`/`exclude` of the run that saved it"
            )
        masks = {}
        for name, p in self._params.items():
            mask = self._pending.get(name)
            if mask is None:  # selected now, not masked then: nothing pruned yet
                mask = torch.ones(p.shape, dtype=torch.bool)
            if mask.shape != p.shape:
                raise ValueError(f"the checkpoint's mask of {name!r} has shape {tuple(mask.shape)}, the weight {tuple(p.shape)}")
            masks[name] = mask.to(device=p.device, dtype=p.dtype)
        self._masks = masks
        self._kept = {n: count_kept(m.float()) for n, m in masks.items()}
        self._pending = None
        if self._rewind_state is not None:
            self._rewind_state = {n: t.to(self._params[n].device) for n, t in self._rewind_state.items()}
        apply_masks_(self._params, self._masks)

    def _ensure_hooks(self, trainer: pl.Trainer) -> None:
        # optimizers can be swapped after on_fit_start (e.g. by an 8-bit optimizer callback): re-hook then
        ids = tuple(id(o) for o in trainer.optimizers)
        if ids == self._hooked:
            return
        self._remove_hooks()
        self._hooks = [o.register_step_post_hook(partial(ScheduledPruning._after_step, self)) for o in trainer.optimizers]
        self._hooked = ids
        self._refresh_groups(trainer)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._hooked = [], ()

    def _refresh_groups(self, trainer: pl.Trainer) -> None:
        self._groups = {}
        by_id = {id(p): n for n, p in self._params.items() if n in self._masks}
        for opt in trainer.optimizers:
            names = [by_id[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in by_id]
            self._groups[id(opt)] = ({n: self._params[n] for n in names}, {n: self._masks[n] for n in names})

    @torch.no_grad()
    def _prune_to(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int, target: float) -> None:
        if self.rewind and self._rewind_state is None:
            self._rewind_state = {n: p.detach().clone() for n, p in self._params.items()}
            self._rewind_t = t
        total = sum(p.numel() for p in self._params.values())
        pruned = total - sum(self._kept.values())
        per_layer = self.layer_targets(target)
        per_weight = None
        if per_layer is not None:
            per_weight = {n: per_layer.get(n[: -len(".weight")], target) for n in self._params}
            target = sum(per_weight[n] * p.numel() for n, p in self._params.items()) / max(total, 1)
        # Masks are recomputed when the target moved by at least _MIN_EVENT_GAP of the weights since the masks
        # were last computed, and always at `end`: a frequency-1 schedule then costs a fraction of an event
        # per step while every event stays within 0.1 point of its target (and exact at the end).
        if t < (self._end or 0) and round(target * total) - pruned < max(1, _MIN_EVENT_GAP * total):
            self._finish_event(trainer, t, target)
            return
        masks, kept = compute_masks_with_counts(
            self._params, target, self.criterion, self.scope, self._masks, self._generator, None, kept=self._kept,
            layer_amounts=per_weight,
        )
        masks, synced = broadcast_masks(masks)
        if synced:  # rank 0's masks: count them (other ranks may have chosen other layers)
            kept = {n: count_kept(m.float()) for n, m in masks.items()}
        pruned_more = kept != self._kept
        self._masks, self._kept = masks, kept
        apply_masks_(self._params, masks)
        self._zero_optimizer_state(trainer)
        if self.rewind and self._rewind_state is not None and pruned_more and t != self._rewind_t:
            for n, p in self._params.items():
                p.copy_(self._rewind_state[n] * masks[n])
        self._refresh_groups(trainer)
        self._finish_event(trainer, t, target)

    def _finish_event(self, trainer: pl.Trainer, t: int, target: float) -> None:
        total = sum(m.numel() for m in self._masks.values())
        self.sparsity = 1.0 - sum(self._kept.values()) / total if total else 0.0
        self._last_t = t
        metrics = {"pruning/sparsity": self.sparsity}
        if self.verbose >= 2:
            metrics.update({f"pruning/sparsity/{n}": 1.0 - self._kept[n] / m.numel() for n, m in self._masks.items()})
            rank_zero_info(f"ScheduledPruning: {self.interval} {t}: sparsity {self.sparsity:.2%} (target {target:.2%})")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _zero_optimizer_state(self, trainer: pl.Trainer) -> None:
        """Zero optimizer buffers (momentum, Adam moments) of pruned entries, so they restart from zero."""
        for opt in trainer.optimizers:
            for name, p in self._params.items():
                state = opt.state.get(p)
                if not state:
                    continue
                for value in state.values():
                    if isinstance(value, Tensor) and value.is_floating_point() and value.shape == p.shape:
                        value.mul_(self._masks[name].to(value.dtype))


class StructuredPruning(BasePruning):
    """Remove whole channels, neurons and attention heads during training, so the model gets physically
    smaller and faster, with torch-pruning's dependency graph deciding which layers shrink together.

    At every *event* of the schedule (each ``frequency`` epochs or steps from ``start``, and at ``end``) the
    least important units are removed until every prunable group (``scope="layer"``) or the model as a
    whole (``scope="global"``) reaches the schedule's target fraction of its *original* units; training
    continues in the same ``fit``. After an event the optimizer's parameters are re-bound in place and its
    state (momentum, Adam moments) sliced to the surviving channels, LR schedulers keep their progress, a
    DDP wrapper is rebuilt and compiled code is told to recompile (``on_structure_changed``).

    The pruning history is saved in the checkpoint: resuming with ``ckpt_path=`` into a freshly built model
    replays it before the weights load (:meth:`replay`), and :func:`lightning_accel.load_checkpoint` does the
    same for inference. Every event
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
        prune_heads: attention modules (``nn.MultiheadAttention``; Hugging Face BERT / RoBERTa / ViT self-attention;
            timm-style ``num_heads`` + fused ``qkv``; any module with an int ``num_heads`` / ``num_attention_heads`` and
            ``qkv`` or ``q``/``k``/``v`` Linears) lose whole heads, their head count (and a Hugging Face
            ``config.num_attention_heads``) updated (``True``), or the same head dimensions of every head, their head
            size updated (``False``), e.g. ``True``. Exclude an attention module to keep it. A module that looks like
            attention but has another layout is refused at setup, before training (``StructuredPruningError``).
        regularization_strength: group-sparsity regularization during training with torch-pruning's
            ``GroupNormPruner``, so unimportant groups fade before they are removed, ``>= 0``, e.g. ``1e-4``.
        optimizer_state: ``"slice"`` keeps the optimizer's statistics of surviving channels; ``"reset"``
            restarts them (as if the optimizer were rebuilt), e.g. ``"slice"``.
        seed: seed of ``importance="random"`` (the same channels on every rank and after a resume), e.g. ``0``.
        verbose: ``0`` only logs metrics, ``1`` adds a line per event and a summary at fit end, ``2`` adds the
            units left in every group, e.g. ``1``.
        layer_amounts: per-layer final amounts instead of one ``amount`` for all: ``{layer name: amount}`` or the
            path of a ``sensitivity.json`` written by :class:`~lightning_accel.SensitivityAnalysis` (its
            recommendation), e.g. ``"lightning_logs/version_0/sensitivity.json"``. Each layer follows the same
            schedule, its target scaled by the schedule's progress (``its amount * target(t) / amount``); layers not
            named keep ``amount``; ``scope`` is not used. Keys are group keys (the group's first pruned module, or the attention module: what
            ``SensitivityAnalysis(granularity="channels")`` writes); ``max_layer_amount`` still caps them; ``None``: one ``amount``.
        monitor: the validation metric of the accuracy guard, e.g. ``"val_acc"``; ``None``: no guard.
        monitor_mode: ``"max"`` if a higher ``monitor`` is better, ``"min"`` if lower is, e.g. ``"max"``.
        max_metric_drop: the guard pauses the schedule (no further pruning) while ``monitor`` is worse than its
            value at the schedule's start by more than this, until a validation is back within it, e.g. ``0.02``
            (see :class:`~lightning_accel.pruning.base.BasePruning`; the state is checkpointed, :attr:`guard`).

    Attributes:
        amount_pruned: the schedule target reached by the latest event.
        history: the recorded events (what :func:`lightning_accel.pruning.structured.replay_pruning_` replays).
        event_seconds: wall time of every event of this process (tracing, ranking, pruning, optimizer slicing,
            measuring); not checkpointed.

    Raises:
        ValueError: an argument is invalid (raised here, before any model or checkpoint is touched); at
            setup: the strategy shards parameters, or ``end`` is ``None`` and the training length is unknown;
            at resume: the checkpoint's history does not fit the model.
        StructuredPruningError: the model cannot be traced, or does not run once pruned, or (at setup) holds
            attention of an unknown layout; the message names the module and the ``exclude`` that avoids it, and
            the model is left unpruned.
    """

    capabilities = frozenset({"changes_shapes"})
    required_on_load: ClassVar[bool] = True
    _WARNING = StructuredPruningWarning

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
        layer_amounts: dict[str, float] | str | None = None,
        monitor: str | None = None,
        monitor_mode: Literal["max", "min"] = "max",
        max_metric_drop: float | None = None,
    ) -> None:
        super().__init__(
            amount, initial_amount, schedule, interval, start, end, frequency, seed, verbose,
            layer_amounts, monitor, monitor_mode, max_metric_drop,
        )
        check_choice("importance", importance, IMPORTANCES)
        check_choice("scope", scope, STRUCTURED_SCOPES)
        check_number("max_layer_amount", max_layer_amount, low=0.0, high=1.0, low_inclusive=False)
        self.exclude = check_patterns("exclude", exclude)
        check_int("round_to", round_to, low=1, allow_none=True)
        check_bool("prune_heads", prune_heads)
        check_number("regularization_strength", regularization_strength, low=0.0)
        check_choice("optimizer_state", optimizer_state, ("slice", "reset"))
        self.importance = importance
        self.scope = scope
        self.max_layer_amount = float(max_layer_amount)
        self.round_to = round_to
        self.prune_heads = prune_heads
        self.regularization_strength = float(regularization_strength)
        self.optimizer_state = optimizer_state
        if amount == 0.0:
            rank_zero_warn("StructuredPruning(amount=0) removes nothing", category=StructuredPruningWarning)
        elif amount > self.max_layer_amount and layer_amounts is None:
            rank_zero_warn(
                f"StructuredPruning: `amount`={amount} is above `max_layer_amount`={self.max_layer_amount}, which caps every "
                f"group: at most {self.max_layer_amount:.0%} of each group's units are removed (raise `max_layer_amount` "
                "to remove more)",
                category=StructuredPruningWarning,
            )
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self.amount_pruned = 0.0
        self.history: list[dict[str, Any]] = []
        self._reset_progress()
        self._original: dict[str, int] | None = None
        self._base: tuple[int, int] | None = None  # MACs, params of the unpruned model
        self._shapes: dict[str, list[int]] = {}
        self._grad_sum: dict[str, torch.Tensor] = {}
        self._grad_steps = 0
        self._example: Any = None
        self._recorder = ForwardRecorder()
        self._regularizer: Any = None
        self.metrics: dict[str, float] = {}
        self.event_seconds: list[float] = []
        self._units_left: dict[str, int] = {}

    @property
    def units_removed(self) -> float:
        """The fraction of the prunable units (channels, neurons, heads) really removed so far, which
        ``max_layer_amount`` and ``round_to`` can hold below the scheduled ``amount_pruned``."""
        if not self._original:
            return 0.0
        left = sum(self._units_left.get(k, n) for k, n in self._original.items())
        return 1.0 - left / max(sum(self._original.values()), 1)

    def _technique_state(self) -> dict[str, Any]:
        return {
            "amount_pruned": self.amount_pruned,
            "original": self._original,
            "base": None if self._base is None else list(self._base),
            "history": self.history,
            "shapes": self._shapes,
            "grad_sum": {n: g.detach().cpu() for n, g in self._grad_sum.items()},
            "grad_steps": self._grad_steps,
            "units_left": self._units_left,
        }

    def _load_technique_state(self, state_dict: dict[str, Any]) -> None:
        self.amount_pruned = float(state_dict["amount_pruned"])
        self._original = None if state_dict["original"] is None else dict(state_dict["original"])
        self._base = None if state_dict["base"] is None else (int(state_dict["base"][0]), int(state_dict["base"][1]))
        self.history = list(state_dict["history"])
        self._shapes = dict(state_dict["shapes"])
        self._grad_sum = dict(state_dict["grad_sum"])
        self._grad_steps = int(state_dict["grad_steps"])
        self._units_left = dict(state_dict.get("units_left") or {})  # absent before 2026-12

    # ------------------------------------------------------------------ replay
    @staticmethod
    def replay(model: nn.Module, state: dict[str, Any]) -> None:
        """Re-apply the pruning history of a ``StructuredPruning`` state to ``model`` (an unpruned or already
        pruned instance), without tracing; validated on meta tensors first, so a history that does not fit
        raises ``ValueError`` and leaves the model untouched."""
        replay_pruning_(model, state.get("history", []), shapes=state.get("shapes"))

    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_strategy(trainer)
        if stage == "fit":
            check_attention_layouts(pl_module, self.exclude)  # an unknown attention layout: refused before training
            self._reset()  # a fresh fit; resuming loads the checkpoint's state after this

    def accel_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._recorder.detach()
        self._example = None
        self._regularizer = None

    def _reached(self) -> float:
        return float(self.amount_pruned)

    def structure_settles_at(self, trainer: pl.Trainer) -> int | None:
        """The global step of the schedule's last event (``end``): step events run when ``global_step`` reaches it,
        epoch events before epoch ``end``'s first step (``end`` times the optimizer steps of an epoch)."""
        if self.amount == 0.0:
            return None
        end = self._end if self._end is not None else self.end
        if end is None:
            return STRUCTURE_UNKNOWN
        if self.interval == "step":
            return int(end)
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:
            return STRUCTURE_UNKNOWN  # an iterable dataset of unknown length: epochs have no known step count
        return int(end) * -(-batches // max(1, trainer.accumulate_grad_batches))

    # ------------------------------------------------------------------ when to prune
    def accel_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end = self._resolve_end(trainer)
        self._recorder = ForwardRecorder()  # the first forward's arguments, for batches that are not tensors
        if getattr(pl_module, "example_input_array", None) is None:
            self._recorder.attach(pl_module)
        if self.verbose >= 1:
            rank_zero_info(
                f"StructuredPruning: to {self.amount:.0%} of the {'channels and heads' if self.prune_heads else 'channels'} "
                f"({self.scope} scope, {self.importance} importance), {self.schedule} schedule over "
                f"{self.interval}s {self.start}..{self._end}, every {self.frequency}"
            )

    def _before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if self._example is None:
            self._example = self._recorder.example
        if self._example is None:
            # before the first forward: a tensor batch gives the example now; another batch waits for the call
            waited = trainer.global_step > 0 or trainer.current_epoch > 0
            self._example = example_from_batch(pl_module, batch, "StructuredPruning", StructuredPruningError, strict=waited)

    def _ready(self) -> bool:
        return self._example is not None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.importance == "taylor" and self.amount_pruned < self.amount:
            self._accumulate_grads(pl_module)
        if self.regularization_strength > 0 and self._example is not None and self.amount_pruned < self.amount:
            if self._regularizer is None:
                self._regularizer = build_group_regularizer(
                    pl_module, self._example, self.regularization_strength, exclude=self.exclude, prune_heads=self.prune_heads
                )
            self._regularizer.regularize(pl_module)

    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_guard()
        if self.verbose >= 1 and self._base is not None and self.metrics:
            rank_zero_info(
                f"StructuredPruning: fit ended at {self.amount_pruned:.0%} scheduled, {self.units_removed:.1%} of the units "
                f"removed: MACs {self._base[0]:,} -> "
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
    def _prune_to(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int, target: float) -> None:
        started = time.perf_counter()
        if self._original is not None and target <= self.amount_pruned + 1e-12:
            self._last_t = t  # nothing more to remove at this event
            return
        graph = build_pruning_graph(pl_module, self._example, exclude=self.exclude, prune_heads=self.prune_heads)
        per_group = self.layer_targets(target)
        if per_group is not None:
            unknown = sorted(set(per_group) - set(self._original or graph.unit_counts()))
            if unknown:
                raise ValueError(
                    f"StructuredPruning `layer_amounts` names {unknown[:5]}, which are not prunable groups of "
                    f"{type(pl_module).__name__}; groups: {sorted(self._original or graph.unit_counts())[:40]} (use "
                    "SensitivityAnalysis(granularity='channels') for group keys)"
                )
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
                    amounts=per_group,
                )
        plan = trainer.strategy.broadcast(plan, src=0)  # every rank removes the same channels
        assert plan is not None
        result = apply_pruning_plan_(graph, plan)
        self._last_t = t
        self.amount_pruned = max(self.amount_pruned, target)
        self._units_left.update(result.units)
        if result.ops:
            dropped: list[str] = []
            for optimizer in trainer.optimizers:
                dropped += slice_optimizer_(optimizer, result.slices, reset=self.optimizer_state == "reset")
            if dropped:
                rank_zero_warn(
                    f"StructuredPruning could not slice the optimizer state of {len(dropped)} parameters "
                    f"({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}): it is not shaped like the "
                    "parameter (e.g. per-tensor 8-bit state); their statistics restart",
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
            "pruning/units_removed": self.units_removed,
            "pruning/event_seconds": seconds,
        }
        if self.verbose >= 1 and result.ops:
            left = f"; units left {result.units}" if self.verbose >= 2 else ""
            rank_zero_info(
                f"StructuredPruning: {self.interval} {t}: {self.amount_pruned:.0%} scheduled, {self.units_removed:.1%} of the "
                f"units removed, MACs {self._base[0]:,} -> "
                f"{macs:,} ({self.metrics['pruning/macs_ratio']:.2f}x fewer), params {n_params:,} in {seconds:.2f} s{left}"
            )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=trainer.global_step)

    def _rebuild_ddp(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap the pruned module in a new ``DistributedDataParallel``: the old one's reducer holds the old
        parameters (the same way ``DDPStrategy.setup`` built it)."""
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel) and hasattr(strategy, "configure_ddp"):
            strategy.model = pl_module
            reconfigure_ddp(strategy)

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


def load_pruned(
    model: nn.Module | type,
    checkpoint: str | Path | dict[str, Any],
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    **init_kwargs: Any,
) -> nn.Module:
    """Load a checkpoint written by a run with :class:`StructuredPruning` into a plain model, for inference.

    Kept for compatibility: the same as :func:`lightning_accel.load_checkpoint`, which replays every recorded
    lightning-accel change (pruning history, quantized layers, adapters) before loading the weights.
    ``LightningModule.load_from_checkpoint`` runs no callbacks and fails on the pruned shapes.

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
