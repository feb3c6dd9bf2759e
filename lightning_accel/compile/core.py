"""``torch.compile`` in place, whole-model or regional, with an eager fallback and visible recompilations.

The pure core of :class:`lightning_accel.TorchCompile` (the callback is in :mod:`lightning_accel.compile.callbacks`):

* :func:`compile_` compiles a model, or each submodule matching ``modules`` (regional compilation: identical
  blocks reuse one compiled graph), **in place**: the compiled code is attached to the module itself
  (as ``nn.Module.compile`` does), so ``state_dict`` keys never gain ``_orig_mod.``, a wrapper such as
  ``DistributedDataParallel`` built around the model keeps calling the compiled code, and
  :func:`uncompile_` restores plain eager modules.
* Modules whose ``forward`` is defined inside ``torch`` (``nn.Sequential``, ``nn.TransformerEncoderLayer``,
  ...) are compiled through a small entry function of ours: ``nn.Sequential(...).compile()`` compiles
  nothing, because TorchDynamo skips every frame that lives in ``torch.nn`` when it is the *first* frame
  it sees (it only inlines them from user code), and every frame of a container of ``torch.nn`` layers
  does live there.
* On a compiler error (a failing backend, a graph break under ``fullgraph=True``, ...) the module warns
  with the reason and continues eagerly (``fallback="eager"``) or re-raises (``fallback="raise"``).
* :func:`compile_optimizer_` compiles an optimizer's update; :class:`CompileWatch` counts what TorchDynamo
  compiled (graphs, recompilations with their reasons, graph breaks, compile time).
"""

from __future__ import annotations

import os
import time
import types
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_accel._compat import (
    compile_cache_counters,
    compile_caches_enabled,
    inductor_cache_dir,
    set_inductor_cache_dir,
)
from lightning_accel._select import select_modules
from lightning_accel._validate import check_bool, check_choice, check_patterns
from lightning_accel.errors import CompileFallbackWarning, CompileNoEffectWarning, RecompilationWarning  # noqa: F401 (public here too)

__all__ = [
    "CACHE_ENV",
    "FALLBACKS",
    "CompileCache",
    "default_cache_dir",
    "MODES",
    "CompileFallbackWarning",
    "CompileNoEffectWarning",
    "CompileWatch",
    "RecompilationWarning",
    "check_compile_args",
    "compile_",
    "compile_optimizer_",
    "compile_targets",
    "compiled_modules",
    "is_compiled",
    "reset_compiled_",
    "uncompile_",
    "uncompile_optimizer_",
]

Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
Fallback = Literal["eager", "raise"]
FALLBACKS: tuple[str, ...] = ("eager", "raise")


def _compiler_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
def check_compile_args(
    mode: str = "default",
    fullgraph: bool = False,
    dynamic: bool | None = None,
    backend: str = "inductor",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate ``torch.compile`` arguments and return the keyword arguments to pass to it.

    Raises:
        ValueError: an unknown ``mode`` or ``backend``, an unknown inductor option, ``options`` or a
            non-default ``mode`` with a backend other than ``"inductor"``, or a wrong type.
    """
    check_choice("mode", mode, MODES)
    check_bool("fullgraph", fullgraph)
    if dynamic is not None and not isinstance(dynamic, bool):
        raise ValueError(f"`dynamic` must be None, true or false; got {dynamic!r}")
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"`backend` must be the name of a torch.compile backend like 'inductor'; got {backend!r}")
    import torch._dynamo

    known = sorted(set(torch._dynamo.list_backends(exclude_tags=())))
    if backend not in known:
        raise ValueError(f"`backend` must be one of {', '.join(map(repr, known))}; got {backend!r}")
    if options is not None:
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise ValueError(f"`options` must be None or a dict of inductor options like {{'max_autotune': True}}; got {options!r}")
        if backend != "inductor":
            raise ValueError(f"`options` only applies to backend='inductor'; got backend={backend!r} with options={options!r}")
        import torch._inductor

        allowed = set(torch._inductor.list_options())
        unknown = sorted(k for k in options if k not in allowed)
        if unknown:
            raise ValueError(
                f"`options` has unknown inductor option(s) {unknown}; see torch._inductor.list_options() "
                f"(e.g. 'max_autotune', 'epilogue_fusion', 'triton.cudagraphs')"
            )
    if mode != "default" and backend != "inductor":
        raise ValueError(f"`mode` {mode!r} only applies to backend='inductor'; got backend={backend!r}")
    kwargs: dict[str, Any] = {"fullgraph": fullgraph, "dynamic": dynamic, "backend": backend}
    if options:  # torch.compile accepts either mode or options: a mode becomes its option set
        opts = dict(options)
        if mode != "default":
            import torch._inductor

            opts = {**torch._inductor.list_mode_options(mode, dynamic), **opts}
        kwargs["options"] = opts
    elif mode != "default":
        kwargs["mode"] = mode
    return kwargs


# ---------------------------------------------------------------------------------------------------------
# Compiling modules in place
# ---------------------------------------------------------------------------------------------------------
class _CompiledCall:
    """A module's ``_compiled_call_impl``: the compiled callable, with the eager fallback around it."""

    def __init__(
        self,
        module: nn.Module,
        name: str,
        fn: Callable[..., Any],
        codes: list[types.CodeType],
        fallback: str,
        on_fallback: Callable[[str, str], None] | None,
    ) -> None:
        self.module = module
        self.name = name
        self.fn = fn
        self.codes = codes
        self.fallback = fallback
        self.on_fallback = on_fallback

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.fn(*args, **kwargs)
        except _compiler_errors() as err:
            if self.fallback == "raise":
                raise
            reason = _first_line(err)
            self.module._compiled_call_impl = None
            where = repr(self.name) if self.name else f"the model ({type(self.module).__name__})"
            if self.on_fallback is not None:
                self.on_fallback(self.name, reason)
            else:
                warnings.warn(
                    f"torch.compile failed for {where}: {reason}; continuing in eager mode",
                    CompileFallbackWarning,
                    stacklevel=2,
                )
        return self.module._call_impl(*args, **kwargs)


def _first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(err).__name__


_REGION_CODES: dict[tuple[type, str], types.CodeType] = {}


def _region_entry(module: nn.Module, key: str = "") -> tuple[Callable[..., Any], types.CodeType]:
    """A function of ours that calls ``module``: TorchDynamo traces it and inlines the ``torch.nn`` frames.

    All modules of one class share one code object (so identical blocks share compiled graphs), and
    different classes get different ones (so they do not share one cache and its recompile limit); so do
    different ``key`` s (a distillation teacher of the student's class keeps its own inference graphs).
    """

    def compiled_region(*args: Any, **kwargs: Any) -> Any:
        return module._call_impl(*args, **kwargs)

    cls = type(module)
    code = _REGION_CODES.get((cls, key))
    if code is None:
        name = f"compiled_{key + '_' if key else ''}{cls.__name__}"
        base = compiled_region.__code__
        if hasattr(base, "co_qualname"):  # Python >= 3.11
            code = base.replace(co_name=name, co_qualname=name)  # type: ignore[call-arg]
        else:
            code = base.replace(co_name=name)
        _REGION_CODES[(cls, key)] = code
    fn = types.FunctionType(code, compiled_region.__globals__, code.co_name, None, compiled_region.__closure__)
    return fn, code


def _forward_in_torch(module: nn.Module) -> bool:
    return (getattr(type(module).forward, "__module__", "") or "").startswith("torch.")


def compile_targets(model: nn.Module, modules: list[str] | None = None) -> dict[str, nn.Module]:
    """The modules :func:`compile_` compiles: ``{"": model}``, or the outermost submodules matching ``modules``.

    Raises:
        NoMatchError: a pattern of ``modules`` matches no submodule.
    """
    if modules is None:
        return {"": model}
    modules = check_patterns("modules", modules)
    selected = select_modules(model, modules, types=(nn.Module,), what="modules")
    return {n: m for n, m in selected.items() if not any(n.startswith(o + ".") for o in selected if o != n)}


def compile_(
    model: nn.Module,
    modules: list[str] | None = None,
    *,
    mode: Mode = "default",
    fullgraph: bool = False,
    dynamic: bool | None = None,
    backend: str = "inductor",
    options: dict[str, Any] | None = None,
    fallback: Fallback = "eager",
    on_fallback: Callable[[str, str], None] | None = None,
    key: str = "",
) -> list[str]:
    """Compile ``model`` (or its submodules matching ``modules``) in place with ``torch.compile``.

    Compilation itself happens lazily, at the first call. Compiled code TorchDynamo still caches for these
    modules' code objects (an earlier ``compile_`` of the same class, another backend) is dropped first, so
    the model compiles afresh with these settings. ``state_dict`` keys are unchanged.

    >>> compile_(model)                                  # the whole model
    ['']
    >>> compile_(model, ["blocks.*"], backend="inductor")  # regional: each block, sharing compiled code
    ['blocks.0', 'blocks.1', ...]

    Args:
        model: the model to compile.
        modules: glob patterns of qualified or class names (``"encoder.layers.*"``, ``"Block"``); each
            outermost match is compiled on its own. ``None``: the whole model.
        mode: ``torch.compile`` mode, e.g. ``"max-autotune"`` (inductor only).
        fullgraph: require one graph per compiled module (a graph break is an error).
        dynamic: ``True`` compiles shape-generic code from the start, ``False`` specializes on every shape,
            ``None`` specializes first and generalizes a dimension after it changes once.
        backend: a registered backend name, e.g. ``"inductor"``, ``"aot_eager"``, ``"eager"``.
        options: inductor options, e.g. ``{"epilogue_fusion": False}``.
        fallback: ``"eager"``: on a compiler error warn (:class:`CompileFallbackWarning`, or call
            ``on_fallback(name, reason)``) and run that module eagerly from then on; ``"raise"``: re-raise.
        on_fallback: called instead of the warning when a module falls back.
        key: a name giving these modules compiled code of their own, e.g. ``"teacher"``: a second model of the same
            class (a distillation teacher run under ``no_grad``) then adds no recompilation to the first one's.

    Returns:
        The qualified names compiled (``""`` is the whole model).

    Raises:
        ValueError: a bad argument.
        NoMatchError: a pattern of ``modules`` matches no submodule.
    """
    kwargs = check_compile_args(mode, fullgraph, dynamic, backend, options)
    check_choice("fallback", fallback, FALLBACKS)
    targets = compile_targets(model, modules)
    fresh: dict[int, types.CodeType] = {}
    for name, module in targets.items():
        if key or _forward_in_torch(module):
            entry, code = _region_entry(module, key)
            codes = [code]
        else:
            entry = module._call_impl
            codes = [type(module).forward.__code__]
        fn = torch.compile(entry, **kwargs)
        module._compiled_call_impl = _CompiledCall(module, name, fn, codes, fallback, on_fallback)
        fresh.update((id(c), c) for c in codes)
    _reset_codes(fresh.values())
    return list(targets)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` itself holds compiled code from :func:`compile_` (and has not fallen back)."""
    return isinstance(module.__dict__.get("_compiled_call_impl"), _CompiledCall)


def compiled_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` compiled by :func:`compile_` (``""``: the model)."""
    return [n for n, m in model.named_modules() if is_compiled(m)]


def uncompile_(model: nn.Module) -> list[str]:
    """Drop the compiled code :func:`compile_` attached anywhere in ``model``; returns the names restored."""
    names = compiled_modules(model)
    for name in names:
        model.get_submodule(name).__dict__.pop("_compiled_call_impl", None)  # back to nn.Module's class default
    return names


def reset_compiled_(model: nn.Module) -> int:
    """Forget the compiled code of ``model``'s compiled modules so their next call compiles afresh.

    Used after a structural change (pruned shapes, swapped layers): without it the stale cache entries stay
    in TorchDynamo's per-code cache and count toward its recompile limit. Returns the code objects reset.
    """
    calls = [model.get_submodule(n).__dict__["_compiled_call_impl"] for n in compiled_modules(model)]
    codes = {id(c): c for call in calls for c in call.codes}
    _reset_codes(codes.values())
    return len(codes)


def _reset_codes(codes: Any) -> None:
    import torch._dynamo

    for code in codes:
        torch._dynamo.reset_code(code)


# ---------------------------------------------------------------------------------------------------------
# Compiling an optimizer step
# ---------------------------------------------------------------------------------------------------------
class _CompiledStep:
    """An optimizer's instance ``step``: the closure runs eagerly, the parameter update is compiled."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any], fallback: str, on_fallback: Callable[[str, str], None] | None
    ) -> None:
        self.optimizer = optimizer
        self.previous = optimizer.__dict__.get("step")
        self.eager = optimizer.step
        self.fallback = fallback
        self.on_fallback = on_fallback
        self.failed = False
        self.compiled = torch.compile(self._update, **kwargs)

    def _update(self) -> None:
        self.eager()

    def __call__(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.failed:
            self.eager()
            return loss
        try:
            self.compiled()
        except _compiler_errors() as err:
            if self.fallback == "raise":
                raise
            self.failed = True
            reason = _first_line(err)
            if self.on_fallback is not None:
                self.on_fallback(f"optimizer {type(self.optimizer).__name__}", reason)
            else:
                warnings.warn(
                    f"torch.compile failed for the {type(self.optimizer).__name__} step: {reason}; continuing eagerly",
                    CompileFallbackWarning,
                    stacklevel=2,
                )
            self.eager()
        return loss


def compile_optimizer_(
    optimizer: torch.optim.Optimizer,
    *,
    mode: Mode = "default",
    fullgraph: bool = False,
    dynamic: bool | None = None,
    backend: str = "inductor",
    options: dict[str, Any] | None = None,
    fallback: Fallback = "eager",
    on_fallback: Callable[[str, str], None] | None = None,
) -> bool:
    """Compile ``optimizer.step``'s parameter update in place (the closure, if any, runs eagerly first).

    >>> compile_optimizer_(torch.optim.AdamW(model.parameters()))
    True

    Args:
        optimizer: any single-closure ``torch.optim.Optimizer``; its ``state_dict`` is unchanged.
        mode, fullgraph, dynamic, backend, options, fallback, on_fallback: as for :func:`compile_`.

    Returns:
        ``False`` when the optimizer was already compiled.

    Raises:
        ValueError: a bad argument, or an optimizer that calls its closure several times (``LBFGS``).
    """
    kwargs = check_compile_args(mode, fullgraph, dynamic, backend, options)
    check_choice("fallback", fallback, FALLBACKS)
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("`compile_optimizer` cannot compile LBFGS: it evaluates its closure several times per step")
    if isinstance(optimizer.__dict__.get("step"), _CompiledStep):
        return False
    optimizer.step = _CompiledStep(optimizer, kwargs, fallback, on_fallback)  # type: ignore[method-assign]
    return True


def uncompile_optimizer_(optimizer: torch.optim.Optimizer) -> bool:
    """Undo :func:`compile_optimizer_`; ``False`` when it was not compiled."""
    step = optimizer.__dict__.get("step")
    if not isinstance(step, _CompiledStep):
        return False
    if step.previous is None:
        del optimizer.__dict__["step"]
    else:
        optimizer.step = step.previous  # type: ignore[method-assign]
    return True


# ---------------------------------------------------------------------------------------------------------
# Counting what TorchDynamo compiled
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Recompile:
    """One recompilation: the function recompiled and the first guard that failed."""

    function: str
    reason: str


@dataclass
class CompileWatch:
    """What TorchDynamo compiled in this process since :meth:`start` (its counters are process-wide).

    ``graphs`` counts FX graphs captured (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``), the
    proof that compilation really happened; ``recompiles`` lists recompilations with the failed guard
    (from ``torch._dynamo.utils.get_compilation_metrics()``); ``graph_breaks`` counts graph breaks by reason.

    >>> watch = CompileWatch().start(); model(x); watch.poll(); watch.graphs
    1
    """

    graphs: int = 0
    frames: int = 0
    compile_time_s: float = 0.0
    recompiles: list[Recompile] = field(default_factory=list)
    graph_breaks: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _graphs0: int = 0
    _breaks0: Counter = field(default_factory=Counter)
    _seen: set = field(default_factory=set)
    _t0_us: int = 0
    _frames0: int = -1

    def start(self) -> CompileWatch:
        from torch._dynamo.utils import counters, get_compilation_metrics

        self._graphs0 = counters["stats"]["unique_graphs"]
        self._breaks0 = Counter(counters["graph_break"])
        self._seen = {_key(m) for m in get_compilation_metrics()}
        self._t0_us = time.time_ns() // 1000
        return self

    def poll(self) -> list[Recompile]:
        """Take in what was compiled since the last poll; returns the new recompilations."""
        from torch._dynamo.utils import counters, get_compilation_metrics

        frames = counters["frames"]["total"]
        graphs = counters["stats"]["unique_graphs"]
        if frames == self._frames0 and graphs == self._graphs0:
            return []  # nothing was compiled since the last poll (the common case: cheap enough for every step)
        self._frames0 = frames
        self.graphs += max(0, graphs - self._graphs0)
        self._graphs0 = graphs
        breaks = Counter(counters["graph_break"])
        for reason, n in breaks.items():
            if n > self._breaks0.get(reason, 0):
                self.graph_breaks[reason.strip().splitlines()[0][:200]] += n - self._breaks0.get(reason, 0)
        self._breaks0 = breaks
        new: list[Recompile] = []
        records = get_compilation_metrics()
        for m in records:
            key = _key(m)
            if key in self._seen or (m.start_time_us or 0) < self._t0_us:
                continue
            self._seen.add(key)
            if m.is_forward:
                self.frames += 1
                self.compile_time_s += m.entire_frame_compile_time_s or 0.0
                if m.recompile_reason:
                    new.append(Recompile(m.co_name or "?", m.recompile_reason))
                if m.fail_type:
                    self.failures.append(f"{m.fail_type}: {(m.fail_reason or '').splitlines()[0][:300] if m.fail_reason else ''}")
            else:
                self.compile_time_s += (m.backward_cumulative_compile_time_us or 0) / 1e6
        self._seen &= {_key(m) for m in records}
        self.recompiles += new
        return new


def _key(m: Any) -> tuple[Any, ...]:
    return (m.compile_id, m.start_time_us, m.is_forward, m.co_name)


# ---------------------------------------------------------------------------------------------------------
# Reusing compiled code across runs
# ---------------------------------------------------------------------------------------------------------
#: environment variable naming the default folder of :class:`CompileCache`
CACHE_ENV = "LIGHTNING_ACCEL_COMPILE_CACHE"


def default_cache_dir() -> Path:
    """Where compiled code is kept between runs by default: ``$LIGHTNING_ACCEL_COMPILE_CACHE``, else
    ``$XDG_CACHE_HOME/lightning_accel/compile``, else ``~/.cache/lightning_accel/compile``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lightning_accel" / "compile"


@dataclass
class CompileCache:
    """Inductor's on-disk caches of compiled code (the FX graph cache: generated kernels; the AOTAutograd cache:
    forward/backward graphs) pointed at ``directory`` while open, and what they served.

    A graph found there is loaded instead of compiled: a resumed fit, a second run of the same configuration, a
    second ``make demo`` skip inductor's code generation and C++ compilation (TorchDynamo still traces Python, which
    is quick). Only the inductor backend uses these caches.

    >>> cache = CompileCache("~/.cache/lightning_accel/compile").open(); model(x); cache.close(); cache.hits
    2

    Args:
        directory: the cache folder, created when missing; ``None``: the folder inductor already uses
            (``TORCHINDUCTOR_CACHE_DIR``, else torch's default under the temp folder).
    """

    directory: str | None = None
    _previous: str | None = None
    _start: dict[str, int] = field(default_factory=dict)
    _end: dict[str, int] | None = None
    _open: bool = False
    _redirected: bool = False

    def open(self) -> CompileCache:
        if self._open:
            return self
        if self.directory is not None:
            path = Path(self.directory).expanduser()
            path.mkdir(parents=True, exist_ok=True)
            self._previous = set_inductor_cache_dir(str(path))
            self._redirected = True
        self.directory = inductor_cache_dir()
        self._start = compile_cache_counters()
        self._end = None
        self._open = True
        return self

    def close(self) -> None:
        """Stop counting and give inductor back the folder it used before :meth:`open`."""
        if not self._open:
            return
        self._end = compile_cache_counters()
        self._open = False
        if self._redirected:
            set_inductor_cache_dir(self._previous)
            self._redirected = False

    @property
    def enabled(self) -> bool:
        """Whether torch's local compile caches are on (they are by default)."""
        return compile_caches_enabled()

    @property
    def counts(self) -> dict[str, int]:
        """Hits, misses and bypasses since :meth:`open`, by cache (see :func:`lightning_accel._compat.compile_cache_counters`)."""
        now = self._end if self._end is not None else compile_cache_counters()
        return {k: now[k] - self._start.get(k, 0) for k in now}

    @property
    def hits(self) -> int:
        """Graphs whose generated code came from the cache."""
        return self.counts["fx_graph_hit"]

    @property
    def misses(self) -> int:
        """Graphs compiled and stored in the cache."""
        return self.counts["fx_graph_miss"]

    def describe(self) -> str:
        """One line for the log: the folder and whether it was hit."""
        c = self.counts
        if not self.enabled:
            return f"compile cache off (torch's fx_graph_cache / enable_autograd_cache config), folder {self.directory}"
        if not (c["fx_graph_hit"] or c["fx_graph_miss"] or c["autograd_hit"] or c["autograd_miss"]):
            return f"compile cache {self.directory}: not used (no inductor graph compiled)"
        verdict = "hit" if c["fx_graph_hit"] and not c["fx_graph_miss"] else "partly hit" if c["fx_graph_hit"] else "missed"
        return (
            f"compile cache {self.directory}: {verdict}: {c['fx_graph_hit']} graph(s) loaded, {c['fx_graph_miss']} compiled "
            f"(AOTAutograd: {c['autograd_hit']} hit(s), {c['autograd_miss']} miss(es))"
        )
