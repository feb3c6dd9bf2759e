"""When the Trainer compiles: the :class:`TorchCompile` callback over :mod:`lightning_accel.compile.core`.

    from lightning_accel import TorchCompile
    trainer = Trainer(callbacks=[TorchCompile()])                       # the whole LightningModule
    trainer = Trainer(callbacks=[TorchCompile(modules=["blocks.*"])])   # regional: one graph for all blocks
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._lifecycle import STRUCTURE_UNKNOWN, AccelCallback, accel_callbacks, structure_schedule
from lightning_accel._validate import check_bool, check_choice, check_patterns
from lightning_accel.compile.core import (
    FALLBACKS,
    CompileCache,
    CompileFallbackWarning,
    CompileNoEffectWarning,
    CompileWatch,
    Mode,
    RecompilationWarning,
    check_compile_args,
    compile_,
    compile_optimizer_,
    compile_targets,
    default_cache_dir,
    reset_compiled_,
    uncompile_,
    uncompile_optimizer_,
)

__all__ = ["STAGES", "WHEN", "TorchCompile"]

Stage = Literal["fit", "validate", "test", "predict"]
STAGES: tuple[str, ...] = ("fit", "validate", "test", "predict")
When = Literal["settled", "start"]
WHEN: tuple[str, ...] = ("settled", "start")
#: TORCHINDUCTOR_CACHE_DIR as the user set it (inductor sets it itself at its first compilation)
_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
#: recompilations of one kind (e.g. shape changes) after which one RecompilationWarning names the cause
REPEATED_RECOMPILES = 3


class TorchCompile(AccelCallback):
    """Compile the LightningModule (or regions of it) in place with ``torch.compile``, after every other
    technique changed the model, in a way that survives DDP wrapping and keeps checkpoints portable.

    When: with ``when="settled"`` (the default) the fit runs eagerly while another callback still changes the
    model's structure (``StructuredPruning`` events, the start of ``QuantizationAwareTraining``'s fake quantization
    and the freezing of its observers: each callback's ``structure_settles_at``) and compiles once, at the first
    training step after the last scheduled change, so no change costs a recompilation; a fit whose structure never
    settles before its end stays eager, and one with a change at a step nobody can tell compiles at the start.
    With ``when="start"``, and whenever no callback changes the structure, compilation starts in
    ``on_train_start`` (after the strategy moved the model and DDP wrapped it: the compiled code is attached to the
    module itself, so the wrapper keeps calling it; after the sanity check and the model summary's example forward,
    so neither compiles a graph used once). A ``validate``/``test``/``predict`` run listed in ``stages`` compiles
    at its start. Compiled code is removed at ``teardown``. The distillation teacher of ``KnowledgeDistillation``
    is compiled too (for inference: it runs under ``no_grad`` in eval mode), and QAT's fake quantization is part of
    the compiled model once it is active. The log says when compilation happened and why then.

    Reuse: inductor's caches of compiled code (the FX graph cache and the AOTAutograd cache) are kept in
    ``cache_dir`` (default ``~/.cache/lightning_accel/compile``), so a resumed fit (``ckpt_path=``), a second run of
    the same configuration and a second ``make demo`` load compiled graphs instead of compiling them; the log says
    whether the cache was hit (``compile/cache_hits``, ``compile/cache_misses``). Checkpoint keys
    never contain ``_orig_mod.``: a checkpoint of a compiled run loads into an uncompiled model and back.
    ``training_step`` calls ``self(x)``, which is what is compiled (or the ``modules`` it calls).

    Logged (``self.log`` from the callback): ``compile/first_step_s`` (wall time of the first training step of
    the process, compilation included: a fit resumed from a checkpoint times its own first step, and its summary says
    it resumed), ``compile/compile_time_s``, ``compile/graphs`` (FX graphs captured: the proof that
    something was compiled), ``compile/recompiles`` and ``compile/graph_breaks``. Recompilations of one kind
    repeated ``3`` times give one :class:`RecompilationWarning` naming the cause; a structural change
    announced by another callback (``notify_structure_changed``, e.g. ``StructuredPruning``) drops the stale
    compiled code and its recompilation is counted apart. Pipeline stage ``compile``: after every technique that changes the model.

    Example::

        TorchCompile()                                      # inductor, whole model, once the structure settled
        TorchCompile(modules=["blocks.*"], dynamic=False, compile_optimizer=True)
        TorchCompile(when="start", cache_dir="lightning_logs/compile_cache")

    Args:
        mode: ``"default"``, ``"reduce-overhead"``, ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``,
            e.g. ``"max-autotune"`` (inductor only).
        fullgraph: require a single graph per compiled module, e.g. ``True`` (a graph break then fails, and
            ``fallback`` decides what happens).
        dynamic: ``None`` (specialize, then generalize a dimension that changes), ``True`` (shape-generic from the
            start, e.g. for a varying last batch) or ``False`` (specialize on every shape).
        backend: a ``torch.compile`` backend, e.g. ``"inductor"``, ``"aot_eager"``, ``"eager"``.
        options: inductor options, e.g. ``{"epilogue_fusion": False}`` (``None``: none).
        modules: regional compilation: qualified- or class-name glob patterns, each outermost match compiled on
            its own, e.g. ``["blocks.*"]``; identical blocks reuse the compiled code (``None``: the whole model).
        compile_optimizer: also compile the optimizers' update step, e.g. ``True``.
        stages: the Trainer functions that compile, e.g. ``["fit", "test"]`` (``None``: ``["fit"]``, whose
            validation loop is compiled too).
        fallback: ``"eager"``: when compilation fails, warn with the reason and continue eagerly; ``"raise"``.
        when: ``"settled"``: compile after the last scheduled structural change of another callback (eager until
            then); ``"start"``: compile at the start of training and recompile after every change, e.g. ``"start"``.
        cache_dir: folder of the compile caches reused across runs, e.g. ``"lightning_logs/compile_cache"``;
            ``None``: ``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``$LIGHTNING_ACCEL_COMPILE_CACHE``, else
            ``~/.cache/lightning_accel/compile``.
        compile_teacher: also compile the teacher of a ``KnowledgeDistillation`` callback, e.g. ``False``.

    Raises:
        ValueError: a bad argument (raised here, before any model is touched).
        CompositionError: at ``setup``, a second ``TorchCompile``, or ``compile_optimizer=True`` beside
            ``EightBitOptimizer`` (bitsandbytes' fused 8-bit step cannot be traced).
        NoMatchError: at ``setup``, a ``modules`` pattern matches no submodule.
    """

    stage: ClassVar[str] = "compile"
    capabilities: ClassVar[frozenset[str]] = frozenset({"compiles"})

    def __init__(
        self,
        mode: Mode = "default",
        fullgraph: bool = False,
        dynamic: bool | None = None,
        backend: str = "inductor",
        options: dict[str, Any] | None = None,
        modules: list[str] | None = None,
        compile_optimizer: bool = False,
        stages: list[Stage] | None = None,
        fallback: Literal["eager", "raise"] = "eager",
        when: When = "settled",
        cache_dir: str | None = None,
        compile_teacher: bool = True,
    ) -> None:
        self._kwargs = check_compile_args(mode, fullgraph, dynamic, backend, options)
        check_patterns("modules", modules)
        check_bool("compile_optimizer", compile_optimizer)
        if stages is None:
            stages = ["fit"]
        if isinstance(stages, str) or not isinstance(stages, (list, tuple)) or not stages:
            raise ValueError(f"`stages` must be a non-empty list of {', '.join(map(repr, STAGES))}; got {stages!r}")
        for s in stages:
            check_choice("stages", s, STAGES)
        if len(set(stages)) != len(stages):
            raise ValueError(f"`stages` must not repeat a stage; got {list(stages)!r}")
        check_choice("fallback", fallback, FALLBACKS)
        check_choice("when", when, WHEN)
        if cache_dir is not None and (not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir).strip()):
            raise ValueError(f"`cache_dir` must be None or a folder path like 'lightning_logs/compile_cache'; got {cache_dir!r}")
        check_bool("compile_teacher", compile_teacher)
        self.when = when
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.compile_teacher = compile_teacher
        self.mode = mode
        self.fullgraph = fullgraph
        self.dynamic = dynamic
        self.backend = backend
        self.options = dict(options) if options else None
        self.modules = list(modules) if modules else None
        self.compile_optimizer = compile_optimizer
        self.stages = list(stages)
        self.fallback = fallback
        # progress (checkpointed)
        self._graphs = 0
        self._recompiles = 0
        self._graph_breaks = 0
        self._compile_time_s = 0.0
        self._first_step_s: float | None = None  # the first step of the fit's first process (a resume keeps it)
        self._structure_changes = 0
        self._structure_recompiles = 0
        self._fallbacks: dict[str, str] = {}
        self._warned: list[str] = []
        self._reasons: list[str] = []
        self._compiled_at: int | None = None  # global step of the latest compilation of a fit
        self._why = ""
        self._cache_counts: dict[str, int] = {}
        # per run
        self._compile_at: int | None = None  # a fit waits for this step (the structure settles) to compile
        self._eager_changes = 0
        self._cache: CompileCache | None = None
        self._teachers: list[nn.Module] = []
        self._teacher_compiled = False
        self._watch: CompileWatch | None = None
        self._active_fn: str | None = None
        self._compiled: list[str] = []
        self._compiled_optimizers: list[torch.optim.Optimizer] = []
        self._first_t0: float | None = None
        self._timed_first = False
        self._resumed = False  # this process continues a fit whose first step was timed by another one
        self._resumed_at: int | None = None  # the global step it resumed at
        self._resumed_first_step_s: float | None = None  # this process's own first step after resuming
        self._structure_window: str | None = None  # "pending" -> "open" (one training step) -> None
        self._kinds: Counter = Counter()
        self._no_effect_checked = False
        self._logged: dict[str, float] = {}

    # -- composition ---------------------------------------------------------------------------------------
    def conflicts_with(self, other: AccelCallback) -> str | None:
        if self.compile_optimizer and "owns_optimizer" in other.capabilities:
            return "`compile_optimizer=True` cannot trace an optimizer another callback swaps in (e.g. bitsandbytes' fused 8-bit step); set it to false"
        return None

    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _unwrap_optimized_children(pl_module)
        if self.modules is not None:
            compile_targets(pl_module, self.modules)  # a pattern that matches nothing fails now, not mid-fit

    # -- when to compile -----------------------------------------------------------------------------------
    def accel_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the strategy set up (DDP wrapped the model, optimizers built and restored) and after the sanity
        # check and ModelSummary's example forward, which would otherwise each compile a graph used once
        if self._resumed and self._resumed_at is None:
            self._resumed_at = trainer.global_step  # the checkpoint's step
        if "fit" not in self.stages or self._active_fn is not None:
            return
        self._compile_at, self._eager_changes, self._teacher_compiled = None, 0, False
        step, why = self._plan(trainer)
        if step is None:
            self._activate(trainer, pl_module, "fit", why)
            return
        self._compile_at, self._why = step, why
        rank_zero_info(f"TorchCompile: training eagerly until step {step}: {why}")

    def _plan(self, trainer: pl.Trainer) -> tuple[int | None, str]:
        """``(step to compile at, None for now; why)``."""
        if self.when == "start":
            return None, "compiling at the start of training (`when='start'`)"
        schedule = structure_schedule(trainer)
        if not schedule:
            return None, "no callback changes the model's structure during the fit"
        unknown = [n for n, s in schedule.items() if s == STRUCTURE_UNKNOWN]
        if unknown:
            return None, (
                f"{', '.join(unknown)} change(s) the structure at steps not known in advance: compiling now, "
                "recompiling after each change"
            )
        settle = max(schedule.values())
        who = ", ".join(f"{n} at step {s}" for n, s in schedule.items())
        step = trainer.global_step
        if settle <= step:
            return None, f"the structure settled before step {step} ({who})"
        total = trainer.estimated_stepping_batches
        if isinstance(total, (int, float)) and total != float("inf") and settle >= total:
            return settle, f"the structure changes until the end of training ({who}; {int(total)} steps): the fit stays eager"
        return settle, f"after the last scheduled structural change ({who})"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_activate_eval(trainer, pl_module, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_activate_eval(trainer, pl_module, "test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_activate_eval(trainer, pl_module, "predict")

    def _maybe_activate_eval(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fn: str) -> None:
        if trainer.state.fn == fn and fn in self.stages and self._active_fn is None:
            self._activate(trainer, pl_module, fn)

    def _activate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fn: str, why: str = "") -> None:
        failed_before = {k: v for k, v in self._fallbacks.items() if not k.startswith(("optimizer", "teacher"))}
        if failed_before:
            rank_zero_info(f"TorchCompile: not compiling; compilation failed earlier in this run: {failed_before}")
            return
        self._active_fn = fn
        self._compile_at = None
        if self.backend == "inductor" and self._cache is None:
            self._cache = CompileCache(self._cache_folder()).open()
        self._watch = CompileWatch().start()
        kw = dict(self._kwargs)
        self._compiled = compile_(
            pl_module,
            self.modules,
            mode=self.mode,
            fullgraph=kw["fullgraph"],
            dynamic=kw["dynamic"],
            backend=kw["backend"],
            options=self.options,
            fallback=self.fallback,  # type: ignore[arg-type]
            on_fallback=self._on_fallback,
        )
        if fn == "fit" and self.compile_optimizer:
            self._compile_optimizers(trainer)
        if fn == "fit" and self.compile_teacher:
            self._compile_teachers(trainer)
        what = "the whole model" if self._compiled == [""] else f"{len(self._compiled)} region(s): {', '.join(self._compiled)}"
        extra = (" and the optimizer step" if self._compiled_optimizers else "") + (" and the teacher" if self._teachers else "")
        when = f"at step {trainer.global_step}" if fn == "fit" else f"for {fn}"
        if fn == "fit":
            self._compiled_at, self._why = int(trainer.global_step), why or self._why
        cache = f"; cache {self._cache.directory}" if self._cache is not None else ""
        rank_zero_info(
            f"TorchCompile: compiling {what}{extra} {when} (backend={self.backend!r}, mode={self.mode!r}, "
            f"dynamic={self.dynamic}){': ' + why if why else ''}{cache}"
        )

    def _cache_folder(self) -> str | None:
        if self.cache_dir is not None:
            return self.cache_dir
        if _USER_INDUCTOR_CACHE:
            return None  # the user's own choice
        return str(default_cache_dir())

    def _compile_teachers(self, trainer: pl.Trainer) -> None:
        for cb in accel_callbacks(trainer):
            teacher = getattr(cb, "teacher_model", None) if cb is not self else None
            if not isinstance(teacher, nn.Module) or any(teacher is t for t in self._teachers) or "teacher" in self._fallbacks:
                continue
            compile_(
                teacher,
                None,
                mode=self.mode,
                fullgraph=self.fullgraph,
                dynamic=self.dynamic,
                backend=self.backend,
                options=self.options,
                fallback=self.fallback,  # type: ignore[arg-type]
                on_fallback=lambda name, reason: self._on_fallback("teacher", reason),
                key="teacher",  # its own compiled code: its no-grad graphs are no recompilations of the student
            )
            self._teachers.append(teacher)
            self._teacher_compiled = True

    def _compile_optimizers(self, trainer: pl.Trainer) -> None:
        if "optimizer" in self._fallbacks:
            return
        for opt in trainer.optimizers:
            if any(opt is o for o in self._compiled_optimizers):
                continue
            if isinstance(opt, torch.optim.LBFGS):
                rank_zero_warn("TorchCompile: `compile_optimizer` skips LBFGS (it calls its closure several times)", category=CompileNoEffectWarning)
                continue
            compile_optimizer_(opt, **self._optimizer_kwargs(), on_fallback=self._on_fallback)
            self._compiled_optimizers.append(opt)

    def _optimizer_kwargs(self) -> dict[str, Any]:
        return dict(
            mode=self.mode,
            fullgraph=self.fullgraph,
            dynamic=self.dynamic,
            backend=self.backend,
            options=self.options,
            fallback=self.fallback,
        )

    def _on_fallback(self, name: str, reason: str) -> None:
        key = "optimizer" if name.startswith("optimizer") else (name or "<model>")
        self._fallbacks[key] = reason
        where = name if name.startswith(("optimizer", "teacher")) else (repr(name) if name else "the model")
        rank_zero_warn(f"TorchCompile: compilation of {where} failed: {reason}; continuing in eager mode", category=CompileFallbackWarning)

    # -- measuring -----------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._compile_at is not None and self._active_fn is None and trainer.global_step >= self._compile_at:
            self._activate(trainer, pl_module, "fit", self._why)
        if self._active_fn == "fit" and not self._timed_first:
            self._first_t0 = time.perf_counter()
        if self._structure_window == "pending":
            self._structure_window = "open"  # closes after this step: its recompilation is the expected one

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._active_fn != "fit" or self._watch is None:
            return
        if not self._timed_first and self._first_t0 is not None:
            elapsed = time.perf_counter() - self._first_t0
            if self._resumed:
                self._resumed_first_step_s = elapsed
            else:
                self._first_step_s = elapsed
            self._timed_first = True
        self._poll()
        if self._structure_window == "open":
            self._structure_window = None
        if not self._no_effect_checked:
            self._no_effect_checked = True
            if self._watch.graphs == 0 and not self._fallbacks:
                rank_zero_warn(
                    "TorchCompile: nothing was compiled during the first training step: "
                    + (
                        "`training_step` does not seem to call `self(...)`; compile the submodules it calls with "
                        "`modules=[...]`"
                        if self._compiled == [""]
                        else f"the compiled modules {self._compiled} were not called"
                    ),
                    category=CompileNoEffectWarning,
                )
        values = self._values()
        if values != self._logged or trainer.global_step % max(1, getattr(trainer, "log_every_n_steps", 50)) == 0:
            self._logged = values  # self.log costs ~0.1 ms a call: log when something changed, else at the log interval
            for k, v in values.items():
                pl_module.log(k, v, on_step=True, on_epoch=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._poll()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._poll()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._poll()

    def _poll(self) -> None:
        if self._watch is None:
            return
        graphs, breaks, time_s = self._watch.graphs, sum(self._watch.graph_breaks.values()), self._watch.compile_time_s
        new = self._watch.poll()
        self._graphs += self._watch.graphs - graphs
        self._graph_breaks += sum(self._watch.graph_breaks.values()) - breaks
        self._compile_time_s += self._watch.compile_time_s - time_s
        for rec in new:
            if self._structure_window:
                self._structure_recompiles += 1
                continue
            self._recompiles += 1
            if len(self._reasons) < 20:
                self._reasons.append(f"{rec.function}: {rec.reason.splitlines()[0][:200]}")
            kind, hint = _classify(rec.reason)
            self._kinds[kind] += 1
            if self._kinds[kind] >= REPEATED_RECOMPILES and kind not in self._warned:
                self._warned.append(kind)
                rank_zero_warn(
                    f"TorchCompile: {rec.function!r} was recompiled {self._kinds[kind]} times because of {kind} "
                    f"(last guard failure: {rec.reason.splitlines()[0][:200]}). {hint}",
                    category=RecompilationWarning,
                )
        for failure in self._watch.failures:
            if "recompile" in failure.lower() and "limit" in failure.lower() and "recompile limit" not in self._warned:
                self._warned.append("recompile limit")
                rank_zero_warn(
                    f"TorchCompile: TorchDynamo hit its recompile limit ({failure[:200]}); the affected code now runs "
                    "eagerly. Set `dynamic=True` or keep input shapes constant.",
                    category=RecompilationWarning,
                )
        self._watch.failures.clear()

    def _values(self) -> dict[str, float]:
        values = {
            "compile/graphs": float(self._graphs),
            "compile/recompiles": float(self._recompiles),
            "compile/graph_breaks": float(self._graph_breaks),
            "compile/compile_time_s": float(self._compile_time_s),
        }
        if self._own_first_step_s is not None:
            values["compile/first_step_s"] = float(self._own_first_step_s)
        if self._compiled_at is not None:
            values["compile/compiled_at_step"] = float(self._compiled_at)
        if self._cache is not None:
            values["compile/cache_hits"] = float(self._cache.hits)
            values["compile/cache_misses"] = float(self._cache.misses)
        return values

    @property
    def _own_first_step_s(self) -> float | None:
        """The first training step of this process: after a resume, its own (not the first run's)."""
        return self._resumed_first_step_s if self._resumed else self._first_step_s

    @property
    def stats(self) -> dict[str, Any]:
        """Counters of this callback (across resumes): graphs, recompiles, graph breaks, times, fallbacks;
        ``first_step_s`` is this process's first training step (after a resume: its own, ``resumed_at_step`` says
        where it resumed, ``first_run_first_step_s`` is the first run's)."""
        return {
            "graphs": self._graphs,
            "recompiles": self._recompiles,
            "graph_breaks": self._graph_breaks,
            "compile_time_s": self._compile_time_s,
            "first_step_s": self._own_first_step_s,
            "first_run_first_step_s": self._first_step_s,
            "resumed_at_step": self._resumed_at,
            "structure_changes": self._structure_changes,
            "structure_recompiles": self._structure_recompiles,
            "fallbacks": dict(self._fallbacks),
            "compiled": list(self._compiled),
            "recompile_reasons": list(self._reasons),
            "compiled_at_step": self._compiled_at,
            "compile_reason": self._why,
            "eager_structure_changes": self._eager_changes,
            "teacher_compiled": self._teacher_compiled,
            "cache_dir": self._cache.directory if self._cache is not None else None,
            "cache": dict(self._cache.counts) if self._cache is not None else dict(self._cache_counts),
        }

    # -- structure changes -----------------------------------------------------------------------------------
    def on_structure_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: AccelCallback) -> None:
        if self._active_fn is None:
            self._eager_changes += 1  # nothing compiled yet: nothing to redo
            return
        self._poll()
        self._structure_changes += 1
        reset_compiled_(pl_module)
        # compilations until the end of the next training step (validation included) are the expected ones
        self._structure_window = "pending"
        if self._active_fn == "fit" and self.compile_optimizer:
            self._compile_optimizers(trainer)  # an optimizer rebuilt for the new parameters

    # -- end of a run --------------------------------------------------------------------------------------
    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active_fn != "fit":
            if self._compile_at is not None:
                rank_zero_info(f"TorchCompile: nothing compiled: the fit ended before step {self._compile_at} ({self._why})")
            return
        self._poll()
        own = f"{self._own_first_step_s:.2f} s" if self._own_first_step_s is not None else "n/a"
        if self._resumed:
            earlier = f"{self._first_step_s:.2f} s" if self._first_step_s is not None else "n/a"
            first = f"first step after resuming at step {self._resumed_at}: {own} (the first run's first step: {earlier})"
        else:
            first = f"first step {own}"
        rank_zero_info(f"TorchCompile: compiled at step {self._compiled_at}: {self._why}")
        if self._cache is not None:
            rank_zero_info(f"TorchCompile: {self._cache.describe()}")
        rank_zero_info(
            f"TorchCompile: {first}, compile time {self._compile_time_s:.2f} s, {self._graphs} graph(s), "
            f"{self._recompiles} recompilation(s), {self._graph_breaks} graph break(s)"
            + (f", {self._structure_changes} structural change(s)" if self._structure_changes else "")
            + (f", fell back to eager: {self._fallbacks}" if self._fallbacks else "")
        )

    def accel_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._poll()
        uncompile_(pl_module)
        for opt in self._compiled_optimizers:
            uncompile_optimizer_(opt)
        self._compiled_optimizers = []
        for teacher in self._teachers:
            uncompile_(teacher)
        self._teachers = []
        if self._cache is not None:
            self._cache.close()
            self._cache_counts = self._cache.counts
            self._cache = None
        self._compile_at = None
        self._compiled = []
        self._watch = None
        self._active_fn = None
        self._structure_window = None
        self._no_effect_checked = False

    # -- checkpoints ---------------------------------------------------------------------------------------
    def accel_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict")
        if sd and any("_orig_mod." in k for k in sd):  # a torch.compile wrapper someone added after setup
            checkpoint["state_dict"] = type(sd)((k.replace("_orig_mod.", ""), v) for k, v in sd.items())

    def state_dict(self) -> dict[str, Any]:
        return {
            "graphs": self._graphs,
            "recompiles": self._recompiles,
            "graph_breaks": self._graph_breaks,
            "compile_time_s": self._compile_time_s,
            "first_step_s": self._first_step_s,
            "structure_changes": self._structure_changes,
            "structure_recompiles": self._structure_recompiles,
            "fallbacks": dict(self._fallbacks),
            "warned": list(self._warned),
            "recompile_kinds": dict(self._kinds),
            "recompile_reasons": list(self._reasons),
            "compiled_at_step": self._compiled_at,
            "compile_reason": self._why,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._graphs = int(state_dict.get("graphs", 0))
        self._recompiles = int(state_dict.get("recompiles", 0))
        self._graph_breaks = int(state_dict.get("graph_breaks", 0))
        self._compile_time_s = float(state_dict.get("compile_time_s", 0.0))
        self._first_step_s = state_dict.get("first_step_s")
        # a fit resumed in another process compiles (or loads from the cache) again: time its own first step
        self._resumed = self._first_step_s is not None
        self._timed_first = False
        self._resumed_at = None
        self._resumed_first_step_s = None
        self._structure_changes = int(state_dict.get("structure_changes", 0))
        self._structure_recompiles = int(state_dict.get("structure_recompiles", 0))
        self._fallbacks = dict(state_dict.get("fallbacks", {}))
        self._warned = list(state_dict.get("warned", []))
        self._kinds = Counter(state_dict.get("recompile_kinds", {}))
        self._reasons = list(state_dict.get("recompile_reasons", []))
        self._compiled_at = state_dict.get("compiled_at_step")
        self._why = str(state_dict.get("compile_reason", ""))


def _classify(reason: str) -> tuple[str, str]:
    """A recompilation's cause in words, and what to do about it."""
    r = reason.lower()
    if "size mismatch" in r or "stride mismatch" in r or "dimensionality" in r:
        return (
            "a changing input shape",
            "Set `dynamic=True`, or keep batch shapes constant (e.g. drop the last incomplete batch).",
        )
    if "training" in r:
        return ("switching between train and eval mode", "This is expected once per direction.")
    if "grad_mode" in r or "requires_grad" in r:
        return ("a change of gradient mode", "This is expected once per mode (training vs. no_grad).")
    if "dtype" in r:
        return ("a changing dtype", "Keep input dtypes (and the autocast state) constant.")
    if "autocast" in r or "global state" in r:
        return ("a change of global state (autocast, grad mode, ...)", "Keep the global state constant across calls.")
    if "id(" in r or "___check_obj_id" in r or "type(" in r:
        return ("a changing Python object", "A module or value the compiled code reads is replaced between calls.")
    if "==" in r:
        return ("a changing Python value", "A Python number or flag the compiled code reads changes between calls.")
    return ("a failed guard", "Run with TORCH_LOGS=recompiles to see every guard failure.")


def _unwrap_optimized_children(model: nn.Module) -> list[str]:
    """Replace ``torch.compile(...)`` wrappers inside ``model`` by the module they wrap (keys lose ``_orig_mod.``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    found = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, OptimizedModule):
                setattr(parent, child_name, child._orig_mod)
                found.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if found:
        rank_zero_warn(
            f"TorchCompile: unwrapped torch.compile wrapper(s) {found} (their `_orig_mod.` prefix would leak into "
            "checkpoint keys); TorchCompile compiles in place instead. Use `modules=[...]` to compile only them.",
            category=CompileNoEffectWarning,
        )
    return found
