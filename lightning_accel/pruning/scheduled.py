"""When the Trainer prunes: :class:`ScheduledPruning`, gradual unstructured pruning on a schedule.

What pruning *does* lives in :mod:`lightning_accel.pruning.unstructured`; this callback decides when to call
it, keeps the masks and the schedule's progress in its ``state_dict`` and logs. No module hooks and no
parametrizations: masks are multiplied into the weights in place right after every optimizer step (an
optimizer step post-hook) and into the gradients right before it, so the model's code, its ``state_dict``
keys and any ``torch.compile``-d graph stay untouched.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_accel._compose import AccelCallback, CompositionError
from lightning_accel._validate import check_bool, check_choice, check_int, check_number, check_patterns
from lightning_accel.pruning.unstructured import (
    CRITERIA,
    REGULARIZATIONS,
    SCOPES,
    _compute_masks,
    _count,
    apply_masks_,
    mask_grads_,
    prunable_parameters,
    regularize_grads_,
)
from lightning_accel.schedules import check_schedule_args, is_event, sparsity_at

__all__ = ["PruningNoEffectWarning", "ScheduledPruning"]

_STATE_VERSION = 1
_MIN_EVENT_GAP = 1e-3  # fraction of the selected weights: smaller steps of the schedule wait for the next event
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


class PruningNoEffectWarning(UserWarning):
    """A pruning setting has no effect (e.g. ``amount=0``, a regularization of strength 0, or a schedule
    that starts after training ends)."""


class ScheduledPruning(AccelCallback):
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

    order: ClassVar[int] = 10

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
    ) -> None:
        super().__init__()
        check_schedule_args(
            amount=amount, initial_amount=initial_amount, schedule=schedule, interval=interval,
            start=start, end=end, frequency=frequency, intervals=("step", "epoch"),
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
        check_int("seed", seed)
        check_choice("verbose", verbose, (0, 1, 2))
        self.amount = float(amount)
        self.initial_amount = float(initial_amount)
        self.schedule = schedule
        self.interval = interval
        self.start = start
        self.end = end
        self.frequency = frequency
        self.criterion = criterion
        self.scope = scope
        self.prune_head = prune_head
        self.regularization = regularization
        self.regularization_strength = float(regularization_strength)
        self.make_permanent = make_permanent
        self.rewind = rewind
        self.seed = seed
        self.verbose = verbose
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
        self._last_t: int | None = None
        self._end: int | None = None
        self._loaded_end: int | None = None
        self._generator = torch.Generator().manual_seed(self.seed)
        self._rewind_state: dict[str, Tensor] | None = None
        self._rewind_t: int | None = None
        # id(optimizer) -> (its selected weights, their masks), both by name
        self._groups: dict[int, tuple[dict[str, nn.Parameter], dict[str, Tensor]]] = {}
        self._hooks: list[Any] = []
        self._hooked: tuple[int, ...] = ()
        self.sparsity = 0.0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules, exclude=self.exclude, prune_head=self.prune_head)

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks, ``{"<module>.weight": bool tensor}`` (``True`` keeps); empty before fit and
        after fit when ``make_permanent=True``."""
        if self._pending is not None and not self._masks:
            return {n: m.clone() for n, m in self._pending.items()}
        return {n: m != 0 for n, m in self._masks.items()}

    def state_dict(self) -> dict[str, Any]:
        masks = self._masks if self._masks else (self._pending or {})
        return {
            "version": _STATE_VERSION,
            "last_t": self._last_t,
            "end": self._end if self._end is not None else self._loaded_end,
            "sparsity": self.sparsity,
            "masks": {n: _pack(m) for n, m in masks.items()},
            "generator": self._generator.get_state(),
            "rewind_t": self._rewind_t,
            "rewind": None if self._rewind_state is None else {n: t.detach().cpu() for n, t in self._rewind_state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"ScheduledPruning state version {version!r} is not supported (expected {_STATE_VERSION})")
        self._last_t = state_dict["last_t"]
        self._loaded_end = state_dict["end"]
        self.sparsity = float(state_dict["sparsity"])
        self._generator.set_state(state_dict["generator"])
        self._rewind_t = state_dict["rewind_t"]
        self._rewind_state = state_dict["rewind"] if self.rewind else None
        self._pending = {n: _unpack(p) for n, p in state_dict["masks"].items()}
        self._masks, self._kept = {}, {}
        if self._params:  # loaded after the fit started (not the Trainer's order): bind right away
            self._bind_pending()

    # ------------------------------------------------------------------ composition
    def conflicts_with(self, other: AccelCallback) -> str | None:
        name = type(other).__name__
        if name == "StructuredPruning":
            return (
                "structured pruning removes channels and changes the weight shapes that unstructured masks are "
                "kept for; use one pruning callback per model"
            )
        if "Quant" in name and getattr(other, "when", None) == "setup":
            return (
                "weights quantized at setup are frozen integers that cannot be pruned; prune first and quantize "
                "at the end (a `when` other than 'setup'), or drop one of them"
            )
        return None

    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in _UNSUPPORTED_STRATEGIES):
            raise ValueError(
                f"ScheduledPruning supports single-device and DDP strategies; got {strategy}, which shards or "
                "flattens parameters"
            )
        if trainer.global_step == 0:
            # a fresh fit (resuming loads the checkpoint's state after this); a second `fit` of the same
            # Trainer continues where the first ended
            self._reset()
        self._names = list(prunable_parameters(pl_module, self.modules, self.exclude, prune_head=self.prune_head))
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
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
            self._kept = {n: _count(m.float()) for n, m in self._masks.items()}
        else:  # all kept until the first event; the regularization already acts through them
            self._masks = {n: torch.ones_like(p, memory_format=torch.contiguous_format) for n, p in self._params.items()}
            self._kept = {n: p.numel() for n, p in self._params.items()}
        if self.verbose >= 1:
            n = sum(p.numel() for p in self._params.values())
            rank_zero_info(
                f"ScheduledPruning: {len(self._params)} weights ({n:,} entries) to {self.amount:.0%} sparsity, "
                f"{self.schedule} schedule over {self.interval}s {self.start}..{self._end}, every {self.frequency}"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_hooks(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._ensure_hooks(trainer)
        if self.interval == "step":
            self._maybe_prune(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.interval == "step":  # after the step: reaches the event at `end` after the very last step too
            self._maybe_prune(trainer, trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._ensure_hooks(trainer)
            self._maybe_prune(trainer, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._maybe_prune(trainer, trainer.current_epoch + 1)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        group = self._groups.get(id(optimizer))
        if group is not None:
            regularize_grads_(group[0], self.regularization, self.regularization_strength)
            mask_grads_(group[0], group[1])  # pruned entries get no gradient, so no momentum either

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        group = self._groups.get(id(optimizer))
        if group is not None:
            apply_masks_(group[0], group[1])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self._masks:
            apply_masks_(self._params, self._masks)
        if self.verbose >= 1:
            rank_zero_info(f"ScheduledPruning: fit ended at {self.sparsity:.2%} sparsity of the selected weights")
        if self.make_permanent:
            self._masks, self._kept, self._params, self._rewind_state, self._groups = {}, {}, {}, None, {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ internals
    def _resolve_end(self, trainer: pl.Trainer) -> int:
        if self.end is not None:
            end = self.end
        elif self._loaded_end is not None:
            end = self._loaded_end  # the resumed run keeps the schedule it started with
        elif self.interval == "step":
            total = trainer.estimated_stepping_batches
            if total == float("inf") or total is None or total < 0:
                raise ValueError(
                    "ScheduledPruning `end=None` needs a known training length (max_epochs or max_steps); set `end`"
                )
            end = int(total)
        else:
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                raise ValueError(
                    "ScheduledPruning `end=None` with `interval='epoch'` needs `max_epochs`; set `end`"
                )
            end = int(trainer.max_epochs)
        if end < self.start:
            rank_zero_warn(
                f"ScheduledPruning `start={self.start}` is after the end of training ({end} {self.interval}s): "
                "nothing will be pruned",
                category=PruningNoEffectWarning,
            )
        return end

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
        self._kept = {n: _count(m.float()) for n, m in masks.items()}
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

    def _maybe_prune(self, trainer: pl.Trainer, t: int) -> None:
        if self._end is None or not self._params:
            return
        if self._last_t is not None and t <= self._last_t:
            return
        if not is_event(t, start=self.start, end=self._end, frequency=self.frequency):
            return
        self._prune(trainer, t)

    @torch.no_grad()
    def _prune(self, trainer: pl.Trainer, t: int) -> None:
        target = sparsity_at(
            t, schedule=self.schedule, initial=self.initial_amount, final=self.amount, start=self.start, end=self._end or 0
        )
        if self.rewind and self._rewind_state is None:
            self._rewind_state = {n: p.detach().clone() for n, p in self._params.items()}
            self._rewind_t = t
        total = sum(p.numel() for p in self._params.values())
        pruned = total - sum(self._kept.values())
        # Masks are recomputed when the target moved by at least _MIN_EVENT_GAP of the weights since the masks
        # were last computed, and always at `end`: a frequency-1 schedule then costs a fraction of an event
        # per step while every event stays within 0.1 point of its target (and exact at the end).
        if t < (self._end or 0) and round(target * total) - pruned < max(1, _MIN_EVENT_GAP * total):
            self._finish_event(trainer, t, target)
            return
        masks, kept = _compute_masks(
            self._params, target, self.criterion, self.scope, self._masks, self._generator, None, kept=self._kept
        )
        masks, synced = _broadcast_masks(masks)
        if synced:  # rank 0's masks: count them (other ranks may have chosen other layers)
            kept = {n: _count(m.float()) for n, m in masks.items()}
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


def _broadcast_masks(masks: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Rank 0's masks on every rank (one collective on the masks' device), and whether a broadcast happened
    (not without a process group of 2 or more)."""
    dist = torch.distributed
    if not masks or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return masks, False
    names = list(masks)
    flat = torch.cat([masks[n].reshape(-1).to(torch.uint8) for n in names])
    dist.broadcast(flat, src=0)
    parts = flat.split([masks[n].numel() for n in names])
    return {n: part.reshape(masks[n].shape).to(masks[n].dtype) for n, part in zip(names, parts)}, True


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack(mask: Tensor) -> dict[str, Any]:
    """A mask as 1 bit per entry (a fp32 weight's mask costs 1/32 of the weight in the checkpoint)."""
    flat = (mask.detach().reshape(-1) != 0).cpu().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    packed = (flat.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)
    return {"shape": list(mask.shape), "bits": packed}


def _unpack(packed: dict[str, Any]) -> Tensor:
    shape = torch.Size(packed["shape"])
    bits = packed["bits"].to(torch.uint8).unsqueeze(1).bitwise_and(_BITS).ne(0).reshape(-1)
    return bits[: shape.numel()].reshape(shape)
