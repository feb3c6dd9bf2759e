"""Every place lightning-accel reaches into another library's internals, with the versions it was verified on.

Each shim is a small function here (or, where the internal is touched in many places, a named constant), so
that a library upgrade that moves an internal fails in one file and in ``tests/test_compat.py``, which checks
every entry of :data:`SHIMS` against the installed versions, instead of somewhere deep in a training run.

================================================  ==========================================  ==================
internal                                          used for                                    verified on
================================================  ==========================================  ==================
``torch_pruning...BasePruningFunc.                the kept indices of every parameter a       torch-pruning 1.6.1
_prune_parameter_and_grad``                       pruning event cuts (optimizer slicing,
                                                  replayable history)
``torch_pruning.DependencyGraph._param_to_name``  names of standalone ``nn.Parameter`` s       torch-pruning 1.6.1
``DependencyGraph.REGISTERED_PRUNERS``            which modules torch-pruning can prune       torch-pruning 1.6.1
``Optimizer.step._wrapped_by_lr_sched`` /         an LR scheduler's "step before              torch 2.13
``optimizer._opt_called``                         optimizer.step" check after an optimizer
                                                  swap
``nn.Module._compiled_call_impl``                 compiling a module in place (what           torch 2.13
                                                  ``Module.compile`` sets)
``torch._dynamo.utils.counters`` /                proof that something was compiled,          torch 2.13
``get_compilation_metrics``                       recompilations and their reasons
``bitsandbytes.backends.cpu.ops`` importing       kept offline: with ``kernels`` installed    bitsandbytes 0.50.2
``kernels.get_kernel`` at import                  (transformers pulls it in) bnb would fetch
                                                  CPU 4-bit kernels from a model hub
``LightningModule.on_load_checkpoint`` (called    replaying structure before the weights      lightning 2.6
with the whole checkpoint before its state        load (``_lifecycle``)
dict loads)
``LightningModule._apply_batch_transfer_handler`` a batch moved to the device with the        lightning 2.6
                                                  module's own transfer hooks, outside a loop
``fit_loop.epoch_loop.val_loop``                  the validation dataloaders of a running     lightning 2.6
                                                  fit (sensitivity, metric checks)
``DDPStrategy.configure_ddp()``                   re-wrapping DDP after pruning changed the   lightning 2.6
                                                  parameters' shapes
``Strategy.precision_plugin`` setter              a precision chosen by a callback            lightning 2.6
                                                  (``MixedPrecision``)
``callback_connector._validate_callbacks_list``   two callbacks of one ``state_key`` refused  lightning 2.6
(its frame and ``callbacks`` local, while it      with a ``CompositionError`` naming both
reads ``state_key``)                              (``AccelCallback.state_key``)
``nn.Module._register_state_dict_hook`` /         int8 / int4 weights saved as plain          torch 2.13
``_register_load_state_dict_pre_hook``            tensors and loaded back
``nn.Module._parameters`` / ``_buffers`` /        a module re-classed in place that keeps     torch 2.13
``_modules``                                      the same Parameter objects (QAT wrappers,
                                                  pruning rollback)
``TORCHINDUCTOR_CACHE_DIR`` read by              where compiled code is cached (FX graph /   torch 2.13
``cache_dir_utils.cache_dir()``,                  AOTAutograd caches) and whether a compile
``torch._inductor.utils.clear_caches``,           was served from it (``TorchCompile``)
``counters["inductor"]["fxgraph_cache_*"]``,
``counters["aot_autograd"]["autograd_cache_*"]``
================================================  ==========================================  ==================
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.trainer.connectors import callback_connector as _callback_connector

__all__ = [
    "COMPILED_CALL_ATTR",
    "SHIMS",
    "callbacks_being_validated",
    "compile_cache_counters",
    "compile_caches_enabled",
    "import_bitsandbytes",
    "inductor_cache_dir",
    "is_step_marked",
    "mark_step_for_lr_scheduler",
    "module_slots",
    "param_name",
    "reconfigure_ddp",
    "restore_module_slots",
    "register_state_dict_hooks",
    "set_inductor_cache_dir",
    "set_precision_plugin",
    "transfer_batch",
    "validation_loop",
    "wrap_prune_parameter",
]

#: the per-module dicts ``nn.Module`` keeps its children in; copying these shares the same objects
MODULE_SLOTS: tuple[str, ...] = ("_parameters", "_buffers", "_modules")

#: the attribute ``nn.Module.compile`` sets on a module instance, read by ``Module.__call__``
COMPILED_CALL_ATTR = "_compiled_call_impl"


@contextlib.contextmanager
def wrap_prune_parameter(tracked: Callable[[Callable[..., Any], Any, Any, Any, int], Any]) -> Iterator[None]:
    """Route every torch-pruning parameter cut through ``tracked(original, pruner, weight, keep_idxs, dim)`` while
    the context is open: all of torch-pruning's layer pruners call ``BasePruningFunc._prune_parameter_and_grad``."""
    from torch_pruning.pruner.function import BasePruningFunc

    original = BasePruningFunc._prune_parameter_and_grad

    def patched(self: Any, weight: Any, keep_idxs: Any, pruning_dim: int) -> Any:
        return tracked(original, self, weight, keep_idxs, pruning_dim)

    BasePruningFunc._prune_parameter_and_grad = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        BasePruningFunc._prune_parameter_and_grad = original  # type: ignore[method-assign]


def param_name(graph: Any, param: torch.nn.Parameter) -> str:
    """The qualified name torch-pruning's dependency graph gave a standalone parameter."""
    return graph._param_to_name[param]


def mark_step_for_lr_scheduler(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` the way ``torch.optim.lr_scheduler.LRScheduler`` does when it is built, so the
    scheduler's "lr_scheduler.step() before optimizer.step()" check keeps working after an optimizer swap."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    func = optimizer.step.__func__  # type: ignore[attr-defined]
    ref = weakref.ref(optimizer)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def is_step_marked(optimizer: torch.optim.Optimizer) -> bool:
    return hasattr(optimizer.step, "_wrapped_by_lr_sched")


def import_bitsandbytes() -> Any:
    """Import bitsandbytes without letting it reach the network: at import, on AVX512-BF16 CPUs, bitsandbytes
    0.50 calls ``kernels.get_kernel(...)``, which downloads kernels from a model hub when the ``kernels`` package
    is installed. While bitsandbytes imports, ``kernels`` is made unimportable, so bitsandbytes takes its own
    fallback; ``kernels`` itself stays usable afterwards."""
    import importlib
    import logging
    import sys

    if "bitsandbytes" in sys.modules:  # imported already (or blocked: import_module raises ImportError)
        return importlib.import_module("bitsandbytes")
    had = "kernels" in sys.modules
    saved = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `from kernels import ...` raises ImportError
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "Failed to load ... from kernels-community" notice
    try:
        return importlib.import_module("bitsandbytes")
    finally:
        quiet.setLevel(level)
        if had:
            sys.modules["kernels"] = saved  # type: ignore[assignment]
        else:
            sys.modules.pop("kernels", None)


def transfer_batch(pl_module: Any, batch: Any, device: torch.device | None = None) -> Any:
    """``batch`` on ``device`` through the module's own ``transfer_batch_to_device`` and its before/after hooks, as
    Lightning's loops move it (for batches collected outside a loop: calibration, sensitivity, metric checks)."""
    return pl_module._apply_batch_transfer_handler(batch, device=device)


def validation_loop(trainer: Any) -> Any:
    """The validation loop of a fit (its ``setup_data()`` / ``_data_source`` give the fit's val dataloaders)."""
    return trainer.fit_loop.epoch_loop.val_loop


def reconfigure_ddp(strategy: Any) -> bool:
    """Re-wrap the model in DDP (new buckets for parameters whose shapes changed); ``False`` when the strategy
    has no DDP wrapper to rebuild."""
    configure = getattr(strategy, "configure_ddp", None)
    if configure is None:
        return False
    configure()
    return True


def set_precision_plugin(trainer: Any, plugin: Any) -> Any:
    """Install ``plugin`` as the trainer's precision plugin; returns the one it replaces."""
    previous = trainer.strategy.precision_plugin
    trainer.strategy.precision_plugin = plugin
    return previous


def register_state_dict_hooks(module: torch.nn.Module, save: Callable[..., Any], load_pre: Callable[..., Any]) -> None:
    """``save(module, state_dict, prefix, local_metadata)`` rewrites what ``state_dict()`` returns for ``module``;
    ``load_pre(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors)`` rewrites what
    ``load_state_dict`` gives it (both torch-private registration functions)."""
    module._register_state_dict_hook(save)
    module._register_load_state_dict_pre_hook(load_pre, with_module=True)


def module_slots(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Shallow copies of the dicts ``module`` keeps its parameters, buffers and children in (the same objects)."""
    return {slot: dict(getattr(module, slot)) for slot in MODULE_SLOTS}


def restore_module_slots(module: torch.nn.Module, slots: dict[str, dict[str, Any]]) -> None:
    """Put back the parameter, buffer and child dicts :func:`module_slots` copied."""
    for slot in MODULE_SLOTS:
        setattr(module, slot, slots[slot])


#: environment variable inductor reads, at every lookup, for the folder of its on-disk caches
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def set_inductor_cache_dir(directory: str | None) -> str | None:
    """Point inductor's on-disk caches (the FX graph cache and the AOTAutograd cache live under it) at ``directory``
    (``None``: back to torch's default), dropping inductor's in-memory lookups of the previous folder; returns the
    previous value of ``TORCHINDUCTOR_CACHE_DIR`` (``None``: it was unset)."""
    import os

    from torch._inductor.utils import clear_caches

    previous = os.environ.get(INDUCTOR_CACHE_ENV)
    if directory is None:
        os.environ.pop(INDUCTOR_CACHE_ENV, None)
    else:
        os.environ[INDUCTOR_CACHE_ENV] = str(directory)
    clear_caches()
    return previous


def inductor_cache_dir() -> str:
    """The folder inductor caches compiled code in now."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def compile_caches_enabled() -> bool:
    """Whether inductor's local FX graph cache and AOTAutograd's cache are on (torch's defaults)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    return bool(inductor_config.fx_graph_cache) and bool(functorch_config.enable_autograd_cache)


def compile_cache_counters() -> dict[str, int]:
    """Process-wide counts of compiled graphs served from inductor's caches (``*_hit``), compiled and stored
    (``*_miss``) or not cacheable (``*_bypass``): ``fx_graph_*`` (generated code) and ``autograd_*`` (AOTAutograd)."""
    from torch._dynamo.utils import counters

    ind, aot = counters["inductor"], counters["aot_autograd"]
    return {
        "fx_graph_hit": int(ind["fxgraph_cache_hit"]),
        "fx_graph_miss": int(ind["fxgraph_cache_miss"]),
        "fx_graph_bypass": int(ind["fxgraph_cache_bypass"]),
        "autograd_hit": int(aot["autograd_cache_hit"]),
        "autograd_miss": int(aot["autograd_cache_miss"]),
        "autograd_bypass": int(aot["autograd_cache_bypass"]),
    }


def callbacks_being_validated(depth: int = 6) -> list[Any] | None:
    """The callback list ``Trainer.__init__`` is checking for two stateful callbacks of one ``state_key``
    (Lightning's ``_validate_callbacks_list``) when the caller (a ``state_key`` getter) runs inside that check, found
    within ``depth`` frames up; ``None`` anywhere else (saving and loading checkpoints, our own code)."""
    code = getattr(getattr(_callback_connector, "_validate_callbacks_list", None), "__code__", None)
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None or code is None:
            return None
        if frame.f_code is code:
            found = frame.f_locals.get("callbacks")
            return list(found) if isinstance(found, list) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _check_compile_cache() -> None:
    import inspect
    import os
    import tempfile

    from torch._functorch._aot_autograd import autograd_cache
    from torch._inductor import codecache

    source = inspect.getsource(codecache)
    for name in ("hit", "miss", "bypass"):
        assert f'counters["inductor"]["fxgraph_cache_{name}"] += 1' in source, f"fxgraph_cache_{name} no longer counted"
    aot_source = inspect.getsource(autograd_cache)
    assert 'counters["aot_autograd"]["autograd_cache_hit"] += 1' in aot_source, "autograd_cache_hit no longer counted"
    assert set(compile_cache_counters()) and isinstance(compile_caches_enabled(), bool)
    with tempfile.TemporaryDirectory() as tmp:
        previous = set_inductor_cache_dir(tmp)
        try:
            assert os.path.samefile(inductor_cache_dir(), tmp), "inductor no longer reads TORCHINDUCTOR_CACHE_DIR"
        finally:
            set_inductor_cache_dir(previous)


def _check_bnb_kernels_import() -> None:
    import importlib.util
    import inspect

    spec = importlib.util.find_spec("bitsandbytes.backends.cpu.ops")
    assert spec is not None and spec.origin is not None
    from pathlib import Path

    source = Path(spec.origin).read_text()
    assert "from kernels import get_kernel" in source or "kernels" not in source
    assert inspect.isfunction(import_bitsandbytes)


def _check_prune_parameter() -> None:
    import inspect

    from torch_pruning.pruner.function import BasePruningFunc

    params = list(inspect.signature(BasePruningFunc._prune_parameter_and_grad).parameters)
    assert params[:4] == ["self", "weight", "keep_idxs", "pruning_dim"], params


def _check_param_to_name() -> None:
    import torch_pruning as tp

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 2))
    assert isinstance(graph._param_to_name, dict)
    assert isinstance(graph.REGISTERED_PRUNERS, dict) and graph.REGISTERED_PRUNERS


def _check_lr_scheduler_mark() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, 1)
    assert getattr(opt.step, "_wrapped_by_lr_sched", False) or hasattr(opt, "_opt_called")


def _check_compiled_call() -> None:
    assert hasattr(torch.nn.Module, COMPILED_CALL_ATTR) and getattr(torch.nn.Module, COMPILED_CALL_ATTR) is None
    import inspect

    assert COMPILED_CALL_ATTR in inspect.getsource(torch.nn.Module.__call__) + inspect.getsource(torch.nn.Module.compile)


def _check_dynamo_counters() -> None:
    import inspect

    from torch._dynamo import output_graph
    from torch._dynamo.utils import counters, get_compilation_metrics

    # the counter is created on first use (a defaultdict): check that dynamo still increments it where a graph is made
    assert 'counters["stats"]["unique_graphs"] += 1' in inspect.getsource(output_graph), "unique_graphs no longer counted"
    assert counters["stats"]["unique_graphs"] >= 0
    assert callable(get_compilation_metrics)


def _check_on_load_checkpoint() -> None:
    import inspect

    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    source = inspect.getsource(_CheckpointConnector.restore_model)
    assert source.index('"on_load_checkpoint"') < source.index("load_model_state_dict"), "hook no longer before load"


def _check_lightning_internals() -> None:
    import inspect

    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.strategies import DDPStrategy, Strategy

    params = list(inspect.signature(LightningModule._apply_batch_transfer_handler).parameters)
    assert params[:3] == ["self", "batch", "device"], params
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert validation_loop(trainer) is trainer.fit_loop.epoch_loop.val_loop
    assert callable(DDPStrategy.configure_ddp)
    assert isinstance(Strategy.__dict__["precision_plugin"], property) and Strategy.__dict__["precision_plugin"].fset


def _check_module_internals() -> None:
    import inspect

    module = torch.nn.Linear(2, 2)
    slots = module_slots(module)
    assert slots["_parameters"]["weight"] is module.weight and "_buffers" in slots and "_modules" in slots
    weight = module.weight
    module.weight = torch.nn.Parameter(torch.zeros(1))
    restore_module_slots(module, slots)
    assert module.weight is weight
    saved: list[str] = []
    register_state_dict_hooks(module, lambda m, sd, prefix, meta: saved.append(prefix), lambda *a: None)
    module.state_dict(prefix="p.")
    assert saved == ["p."]
    assert "with_module" in inspect.signature(torch.nn.Module._register_load_state_dict_pre_hook).parameters


def _check_callbacks_being_validated() -> None:
    from lightning.pytorch import Callback

    seen: list[list[Any] | None] = []

    class _Probe(Callback):
        @property
        def state_key(self) -> str:
            seen.append(callbacks_being_validated())
            return "probe"

        def state_dict(self) -> dict[str, Any]:
            return {}

    probe = _Probe()
    _callback_connector._validate_callbacks_list([probe])
    assert seen and seen[0] is not None and seen[0][0] is probe, "state_key no longer read inside the check"
    assert callbacks_being_validated() is None


#: name -> (library, versions verified, check raising AssertionError/ImportError/AttributeError when it moved)
SHIMS: dict[str, tuple[str, str, Callable[[], None]]] = {
    "BasePruningFunc._prune_parameter_and_grad": ("torch_pruning", "1.6.1", _check_prune_parameter),
    "DependencyGraph._param_to_name / REGISTERED_PRUNERS": ("torch_pruning", "1.6.1", _check_param_to_name),
    "Optimizer.step._wrapped_by_lr_sched": ("torch", "2.13", _check_lr_scheduler_mark),
    "nn.Module._compiled_call_impl": ("torch", "2.13", _check_compiled_call),
    "torch._dynamo.utils.counters": ("torch", "2.13", _check_dynamo_counters),
    "LightningModule.on_load_checkpoint before load_model_state_dict": ("lightning", "2.6", _check_on_load_checkpoint),
    "bitsandbytes' import of kernels.get_kernel": ("bitsandbytes", "0.50.2", _check_bnb_kernels_import),
    "LightningModule._apply_batch_transfer_handler / val_loop / configure_ddp / precision_plugin": (
        "lightning",
        "2.6",
        _check_lightning_internals,
    ),
    "nn.Module state-dict hooks and _parameters/_buffers/_modules": ("torch", "2.13", _check_module_internals),
    "inductor cache folder (TORCHINDUCTOR_CACHE_DIR) and its hit/miss counters": ("torch", "2.13", _check_compile_cache),
    "callback_connector._validate_callbacks_list reading state_key": ("lightning", "2.6", _check_callbacks_being_validated),
}
