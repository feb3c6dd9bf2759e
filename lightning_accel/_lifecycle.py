"""The one owner of how lightning-accel callbacks meet: pipeline order, capabilities and conflicts, replay
before checkpoint weights load, and clean-up.

Every lightning-accel callback subclasses :class:`AccelCallback` and declares

* its ``stage``, its place in the pipeline: ``teacher`` -> ``structure`` -> ``quantization`` -> ``optimizer`` ->
  ``precision`` -> ``compile`` -> ``measurement`` -> ``orchestration`` (a planner that runs the others, last:
  it decides at fit start after every other callback set up, and reads the report at fit end) (:data:`STAGES`);
* its ``capabilities``, what it does to the model or the training (:data:`CAPABILITIES`), from which conflicts
  are decided (:func:`find_conflict`), never from class names;
* ``required_on_load`` and a static ``replay(model, state)`` when its change (pruned shapes, quantized layers,
  adapters) must exist before a checkpoint's weights can load.

Lightning calls a callback hook on every callback in the order of ``trainer.callbacks``, which stays the order
the user gave. The hooks whose order matters between techniques are therefore *final* in :class:`AccelCallback`:
the first lightning-accel callback of the list to receive one runs the matching ``accel_*`` method of every
lightning-accel callback in pipeline order (``accel_teardown`` in reverse order), and the others skip it.

=====================  ===============================================  ================
Lightning hook         dispatched to (pipeline order)                   order
=====================  ===============================================  ================
``setup``              ``accel_before_setup``, then ``accel_setup``     pipeline
``on_fit_start``       ``accel_fit_start``                              pipeline
``on_train_start``     ``accel_train_start``                            pipeline
``on_fit_end``         ``accel_fit_end``                                pipeline
``teardown``           ``accel_teardown``                               reverse
``on_exception``       ``accel_teardown`` (of every callback set up)    reverse
``on_save_checkpoint`` ``accel_save_checkpoint``; writes the manifest   pipeline
=====================  ===============================================  ================

While a Trainer call runs, the owner puts one stand-in for ``pl_module.on_load_checkpoint`` on the module:
Lightning calls it with the whole checkpoint right before it loads the module's ``state_dict`` (for ``fit``,
``validate``, ``test`` and ``predict`` alike), and it replays the checkpoint's recorded changes
(:func:`lightning_accel.checkpoint.replay_checkpoint`, the same path :func:`lightning_accel.load_checkpoint`
uses) before calling the module's own hook. It is removed when the outermost Trainer call ends, or fails.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch import Callback
from torch import nn

from lightning_accel._compat import callbacks_being_validated
from lightning_accel._vocabulary import CAPABILITIES, EXCLUSIVE, INCOMPATIBLE, STAGES, register_callback
from lightning_accel.checkpoint import replay_checkpoint, write_manifest
from lightning_accel.errors import CompositionError

__all__ = [
    "CAPABILITIES",
    "STAGES",
    "AccelCallback",
    "CompositionError",
    "ReplayCheckpoint",
    "accel_callbacks",
    "detach_pipeline_hooks",
    "find_conflict",
    "notify_structure_changed",
    "same_output_files",
    "STRUCTURE_UNKNOWN",
    "structure_schedule",
    "structure_settled_step",
]

#: what :meth:`AccelCallback.structure_settles_at` returns for a change at a step it cannot tell in advance
STRUCTURE_UNKNOWN = -1

class AccelCallback(Callback):
    """Base of every lightning-accel callback: its place in the pipeline, its capabilities, its replay.

    Subclasses implement the ``accel_*`` methods instead of the Lightning hooks they stand for (see the module
    docstring): overriding ``setup``, ``teardown``, ``on_fit_start``, ``on_train_start``, ``on_fit_end``,
    ``on_exception`` or ``on_save_checkpoint`` raises ``TypeError`` at class creation. Every other Lightning
    hook is overridden as usual.

    Attributes:
        stage: place in the pipeline, one of :data:`STAGES`.
        capabilities: what the callback does, a subset of :data:`CAPABILITIES`; a property where it depends on
            the arguments (``Quantization(when="setup")`` freezes weights, ``when="fit_end"`` does not).
        required_on_load: the callback's change must exist before a checkpoint's weights load; it then
            implements ``replay(model, state)``, a static method re-creating the change from its own
            ``state_dict()`` on a freshly built model.
        accel_name: the name checkpoints record for this class (``"myproject.MyPruning"``); a user's subclass may
            declare one so that moving its file breaks no checkpoint. Default: ``lightning_accel.<ClassName>``
            for the package's classes, the module path for others.
    """

    stage: ClassVar[str] = "measurement"
    accel_name: ClassVar[str | None] = None
    capabilities: ClassVar[frozenset[str]] = frozenset()
    required_on_load: ClassVar[bool] = False

    _FINAL: ClassVar[dict[str, str]] = {
        "setup": "accel_setup (or accel_before_setup)",
        "teardown": "accel_teardown",
        "on_fit_start": "accel_fit_start",
        "on_train_start": "accel_train_start",
        "on_fit_end": "accel_fit_end",
        "on_exception": "accel_teardown",
        "on_save_checkpoint": "accel_save_checkpoint",
    }

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, instead in AccelCallback._FINAL.items():
            if name in cls.__dict__:
                raise TypeError(
                    f"{cls.__name__} overrides `{name}`, which the lightning-accel pipeline dispatches in pipeline "
                    f"order; implement `{instead}` instead"
                )
        if cls.stage not in STAGES:
            raise TypeError(f"{cls.__name__}.stage must be one of {', '.join(map(repr, STAGES))}; got {cls.stage!r}")
        caps = cls.__dict__.get("capabilities")
        if isinstance(caps, frozenset) and not caps <= set(CAPABILITIES):
            raise TypeError(f"{cls.__name__}.capabilities has unknown entries {sorted(caps - set(CAPABILITIES))}")
        if cls.required_on_load and not callable(getattr(cls, "replay", None)):
            raise TypeError(f"{cls.__name__} sets required_on_load but has no static `replay(model, state)`")
        register_callback(cls)

    # ------------------------------------------------------------------ what subclasses implement
    def accel_before_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before any callback of the pipeline sets up: see the model as the user built it (a teacher copy,
        a baseline measurement)."""

    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Per-callback set-up (module swaps, plugins), in pipeline order."""

    def accel_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_fit_start``, in pipeline order."""

    def accel_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_train_start``, in pipeline order."""

    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_fit_end``, in pipeline order: structure is final before quantization, quantization before the
        report measures."""

    def accel_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Undo what this callback attached for the Trainer call (hooks, plugins, compiled code), in reverse
        pipeline order; also called when the call fails."""

    def accel_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """``on_save_checkpoint``, in pipeline order."""

    def accel_children(self, trainer: pl.Trainer) -> list[AccelCallback]:
        """Callbacks this one runs through the pipeline (a planner such as :class:`~lightning_accel.AutoCompress`
        runs pruning, quantization and the report as ordinary callbacks): asked once per Trainer call, before any
        ``setup``, and put into ``trainer.callbacks`` right after this one unless already there. They are then
        members of the pipeline like the user's own: ordered, checked for conflicts, checkpointed (under their
        ``state_key``) and resumed. Raise :class:`~lightning_accel.errors.CompositionError` for a user callback
        that clashes with them."""
        return []

    def conflicts_with(self, other: AccelCallback) -> str | None:
        """A reason, beyond the capability rules, why ``self`` cannot run beside ``other``; ``None`` if it can."""
        return None

    def on_structure_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: AccelCallback) -> None:
        """Called after ``source`` changed the model's structure mid-fit (shapes, modules): e.g. compiled code is
        rebuilt once, bookkeeping keyed by parameters is refreshed."""

    def structure_settles_at(self, trainer: pl.Trainer) -> int | None:
        """The global step from which this callback no longer changes, during the fit, what the model's forward
        computes structurally (shapes, modules, the code paths a compiler traces; not weight values): asked at
        ``on_train_start``, when the training length is known. ``None``: it changes nothing during training (changes
        at setup or after the fit do not count); :data:`STRUCTURE_UNKNOWN`: it does, at steps it cannot tell."""
        return None

    # ------------------------------------------------------------------ the checkpoint key
    @property
    def state_key(self) -> str:
        """Where a checkpoint keeps this callback's state (``checkpoint["callbacks"][state_key]``): its
        :meth:`accel_state_key`, the same in every run, so a resumed fit finds its state.

        Two callbacks of one key in a Trainer would overwrite each other's state. ``Trainer.__init__`` reads the
        key of each stateful callback to refuse that; read there, this raises :class:`CompositionError` naming both
        callbacks and what to do (instead of Lightning's generic "more than one stateful callback" error).
        """
        key = self.accel_state_key()
        callbacks = callbacks_being_validated()
        if callbacks is not None:
            same = [i for i, cb in enumerate(callbacks) if AccelCallback._stable_key(cb) == key]
            if len(same) > 1 and any(callbacks[i] is self for i in same):
                name = type(self).__name__
                varies = key != type(self).__qualname__
                raise CompositionError(
                    f"callbacks[{same[0]}] and callbacks[{same[1]}] are both {name} and would keep their state under "
                    f"the same checkpoint key {key!r}: keep one {name} (give it the settings you need)"
                    + (", or make them differ in the arguments that key is built from" if varies else "")
                    + ", or run the second one in another fit of the same model"
                )
        return key

    def accel_state_key(self) -> str:
        """The checkpoint key of this callback's state, stable across runs: the class name. A subclass that can run
        beside another instance of itself builds it from the arguments that tell them apart
        (``self._generate_state_key(modules=self.modules)``); changing it makes older checkpoints' state unfindable."""
        return type(self).__qualname__

    @staticmethod
    def _stable_key(cb: Any) -> str | None:
        """The key ``cb`` keeps its state under, without the duplicate check (``None``: not ours)."""
        if not isinstance(cb, AccelCallback):
            return None
        if type(cb).state_key is AccelCallback.state_key:
            return cb.accel_state_key()
        return str(cb.state_key)  # a subclass with its own `state_key` property

    # ------------------------------------------------------------------ the final Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _dispatch_group(self, trainer):
            _insert_children(trainer)
        group = _dispatch_group(self, trainer)
        if not group:
            return
        _check_conflicts(group)
        run = _run_state(trainer)
        run.calls.append(group)
        run.install_replay(pl_module)
        for cb in group:
            cb.accel_before_setup(trainer, pl_module, stage)
        for cb in group:
            cb.accel_setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for cb in _dispatch_group(self, trainer):
            cb.accel_fit_start(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for cb in _dispatch_group(self, trainer):
            cb.accel_train_start(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for cb in _dispatch_group(self, trainer):
            cb.accel_fit_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        group = _dispatch_group(self, trainer)
        if not group:
            return
        write_manifest(checkpoint, group, pl_module)
        for cb in group:
            cb.accel_save_checkpoint(trainer, pl_module, checkpoint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _dispatch_group(self, trainer):
            _run_state(trainer).end_call(trainer, pl_module, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if _dispatch_group(self, trainer):
            _run_state(trainer).abort(trainer, pl_module)


class ReplayCheckpoint(AccelCallback):
    """Lets a Trainer without any other lightning-accel callback evaluate a compressed checkpoint.

    ``Trainer.validate/test/predict/fit(ckpt_path=...)`` replays a checkpoint's recorded changes (pruned shapes,
    quantized layers, adapters, fake quantization) before its weights load whenever a lightning-accel callback is
    in the Trainer. A plain ``pl.Trainer()`` has none, so a compressed checkpoint fails there with torch's
    ``size mismatch`` / ``Unexpected key(s)`` error. This callback does nothing else: add it to evaluation-only
    Trainers (it changes no model that has no compressed checkpoint to load).

    Example::

        pl.Trainer(callbacks=[lightning_accel.ReplayCheckpoint()]).validate(model, dm, ckpt_path="last.ckpt")
    """

    stage = "measurement"


def accel_callbacks(trainer: pl.Trainer) -> list[AccelCallback]:
    """The trainer's lightning-accel callbacks in pipeline order (list order within a stage)."""
    return _in_pipeline_order(cb for cb in trainer.callbacks if isinstance(cb, AccelCallback))  # type: ignore[attr-defined]


def notify_structure_changed(trainer: pl.Trainer, pl_module: pl.LightningModule, source: AccelCallback) -> None:
    """Tell every other lightning-accel callback that ``source`` changed the model's structure."""
    for cb in accel_callbacks(trainer):
        if cb is not source:
            cb.on_structure_changed(trainer, pl_module, source)


def structure_schedule(trainer: pl.Trainer) -> dict[str, int]:
    """``{callback class name: structure_settles_at(trainer)}`` of the callbacks that change the model's structure
    during the fit (a value of :data:`STRUCTURE_UNKNOWN` for those that cannot tell when), in pipeline order."""
    out: dict[str, int] = {}
    for cb in accel_callbacks(trainer):
        step = cb.structure_settles_at(trainer)
        if step is not None:
            name = type(cb).__name__
            out[name] = STRUCTURE_UNKNOWN if STRUCTURE_UNKNOWN in (step, out.get(name)) else max(int(step), out.get(name, 0))
    return out


def structure_settled_step(trainer: pl.Trainer) -> int | None:
    """The global step from which no callback of ``trainer`` changes the model's structure any more: ``None`` when none
    changes it during the fit, :data:`STRUCTURE_UNKNOWN` when one cannot tell when it does."""
    steps = list(structure_schedule(trainer).values())
    if not steps:
        return None
    return STRUCTURE_UNKNOWN if STRUCTURE_UNKNOWN in steps else max(steps)


def detach_pipeline_hooks(module: nn.Module) -> None:
    """Remove from ``module`` what the pipeline put on it for a Trainer call (the ``on_load_checkpoint``
    stand-in): for a copy of the model (a distillation teacher) that must not replay the student's checkpoints."""
    if isinstance(module.__dict__.get("on_load_checkpoint"), _ReplayBeforeLoad):
        del module.__dict__["on_load_checkpoint"]


def find_conflict(a: AccelCallback, b: AccelCallback) -> str | None:
    """Why ``a`` and ``b`` cannot run together, from their capabilities (then their own ``conflicts_with``)."""
    caps_a, caps_b = frozenset(a.capabilities), frozenset(b.capabilities)
    for cap in sorted(caps_a & caps_b):
        if cap in EXCLUSIVE:
            return EXCLUSIVE[cap]
    for pair, reason in INCOMPATIBLE.items():
        x, y = sorted(pair)
        if (x in caps_a and y in caps_b) or (y in caps_a and x in caps_b):
            return reason
    return a.conflicts_with(b) or b.conflicts_with(a)


def same_output_files(a: AccelCallback, b: AccelCallback) -> str | None:
    """Why two measuring callbacks (``"measures"``) cannot run together: both write ``<filename>.json`` / ``.png``
    into the same ``output_dir``; ``None`` otherwise (for their ``conflicts_with``)."""
    if (
        b is not a
        and "measures" in getattr(b, "capabilities", frozenset())
        and getattr(b, "filename", None) == getattr(a, "filename", None)
        and getattr(b, "output_dir", None) == getattr(a, "output_dir", None)
    ):
        return f"both write {getattr(a, 'filename', None)}.json / .png into the same directory; give one another `filename`"
    return None


# ---------------------------------------------------------------------- internals
def _in_pipeline_order(callbacks: Iterable[AccelCallback]) -> list[AccelCallback]:
    return sorted(callbacks, key=lambda cb: STAGES.index(cb.stage))  # sorted() is stable: list order per stage


def _dispatch_group(cb: AccelCallback, trainer: pl.Trainer) -> list[AccelCallback]:
    """The callbacks ``cb`` dispatches a hook to: all of the pipeline if ``cb`` leads it (is the first
    lightning-accel callback in ``trainer.callbacks``), none if another one does. A callback that is not in
    ``trainer.callbacks`` (a hook called by hand) dispatches to itself alone."""
    members = [c for c in trainer.callbacks if isinstance(c, AccelCallback)]  # type: ignore[attr-defined]
    if not any(c is cb for c in members):
        return [cb]
    return _in_pipeline_order(members) if members[0] is cb else []


def _insert_children(trainer: pl.Trainer) -> None:
    """Put every callback's :meth:`AccelCallback.accel_children` into ``trainer.callbacks`` right after it (once).
    They land after the leader, the first lightning-accel callback, whose ``setup`` Lightning is calling: the loop
    over ``trainer.callbacks`` then reaches them as non-leaders, and the leader stays the leader."""
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
    for parent in [c for c in callbacks if isinstance(c, AccelCallback)]:
        children = [c for c in parent.accel_children(trainer) if not any(c is x for x in callbacks)]
        at = next(i for i, c in enumerate(callbacks) if c is parent) + 1
        callbacks[at:at] = children


def _check_conflicts(group: list[AccelCallback]) -> None:
    for i, a in enumerate(group):
        for b in group[i + 1 :]:
            reason = find_conflict(a, b)
            if reason:
                raise CompositionError(f"{type(a).__name__} cannot be combined with {type(b).__name__}: {reason}")


class _ReplayBeforeLoad:
    """Stands in for a module's ``on_load_checkpoint`` during a Trainer call: replays the checkpoint's recorded
    changes, then calls the module's own hook, right before Lightning loads the weights."""

    def __init__(self, module: nn.Module, inner: Any, had_instance_attr: bool) -> None:
        self.module = weakref.ref(module)
        self.inner = inner
        self.had_instance_attr = had_instance_attr

    def __call__(self, checkpoint: dict[str, Any]) -> Any:
        module = self.module()
        if module is not None:
            replay_checkpoint(module, checkpoint)
        return self.inner(checkpoint)


class _RunState:
    """What the owner holds for one Trainer between ``setup`` and ``teardown`` (calls can nest: a callback may
    run ``trainer.validate`` from ``on_fit_end``)."""

    def __init__(self) -> None:
        self.calls: list[list[AccelCallback]] = []
        self.hook: _ReplayBeforeLoad | None = None
        self.module: weakref.ReferenceType[nn.Module] | None = None

    def install_replay(self, module: nn.Module) -> None:
        if self.hook is not None:
            return
        current = module.__dict__.get("on_load_checkpoint")
        self.hook = _ReplayBeforeLoad(module, module.on_load_checkpoint, current is not None)  # type: ignore[attr-defined]
        self.module = weakref.ref(module)
        module.on_load_checkpoint = self.hook  # type: ignore[assignment]

    def end_call(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        group = self.calls.pop() if self.calls else []
        for cb in reversed(group):
            cb.accel_teardown(trainer, pl_module, stage)
        if not self.calls:
            self._remove_replay()
            _RUNS.pop(trainer, None)

    def abort(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = getattr(trainer.state.fn, "value", None) or "fit"
        try:
            while self.calls:
                for cb in reversed(self.calls.pop()):
                    cb.accel_teardown(trainer, pl_module, stage)
        finally:
            self._remove_replay()
            _RUNS.pop(trainer, None)

    def _remove_replay(self) -> None:
        module = self.module() if self.module is not None else None
        hook: _ReplayBeforeLoad | None = self.hook
        self.hook, self.module = None, None
        if module is None or hook is None or id(module.__dict__.get("on_load_checkpoint")) != id(hook):
            return
        if hook.had_instance_attr:
            module.on_load_checkpoint = hook.inner  # type: ignore[method-assign]
        else:
            del module.__dict__["on_load_checkpoint"]


_RUNS: weakref.WeakKeyDictionary[pl.Trainer, _RunState] = weakref.WeakKeyDictionary()


def _run_state(trainer: pl.Trainer) -> _RunState:
    run = _RUNS.get(trainer)
    if run is None:
        run = _RUNS[trainer] = _RunState()
    return run
