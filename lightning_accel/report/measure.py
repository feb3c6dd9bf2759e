"""What a model costs, measured on a plain ``torch.nn.Module`` (or any callable), without a Trainer.

    from lightning_accel.report.measure import measure_model, latency
    snap = measure_model(model, torch.randn(1, 1, 8, 8), batch_sizes=[1, 64])
    snap["params"], snap["nonzero"], snap["stored_bytes"], snap["macs"], snap["latency_ms"]["64"]
    latency(exported_fn, torch.randn(64, 1, 8, 8))["median_ms"]

Sizes are counted as stored, not as the float model they came from: a bitsandbytes 4-bit or int8 weight at its
packed size plus its quantization state, a torchao tensor subclass (``Int8Tensor``, ``AffineQuantizedTensor``, ...)
at the size of the inner tensors it is made of (their own ``nbytes`` reports the logical float size), a PT2E
``GraphModule`` by the tensors its graph reads (``convert_pt2e`` leaves the float originals behind as dead
parameters). MACs are those of one sample, counted like :func:`lightning_accel.pruning.structured.count_macs_params`
(``FlopCounterMode``, half the FLOPs of matrix products and convolutions), with the quantized layers whose custom
kernels torch cannot count added at ``in x out`` per token; torch-pruning's op counter is the fallback.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_accel.quantization.backends import QuantizationBackend, quantized_layers_by_backend

__all__ = [
    "Timer",
    "ThroughputMeter",
    "batch_inputs",
    "count_macs",
    "count_params",
    "exported_latency",
    "latency",
    "measure_model",
    "on_device",
    "peak_memory",
    "reset_peak_memory",
    "stored_bytes",
    "tensor_bytes",
]

Timer = Callable[[], float]


# ---------------------------------------------------------------------- inputs
def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(obj, found.append)
    return found


def _leading(obj: Any) -> int | None:
    """The batch size of ``obj``: the leading size of its first tensor with a dimension."""
    for t in _tensors(obj):
        if t.dim() > 0:
            return int(t.shape[0])
    return None


def batch_inputs(example: Any, batch_size: int) -> Any:
    """``example`` (a tensor, a tuple/list or a dict of them) with a batch of ``batch_size``: every tensor whose leading
    size is the example's batch size is cut to the first ``batch_size`` samples, or tiled to reach them.

    Example:
        >>> batch_inputs(torch.zeros(2, 3), 5).shape
        torch.Size([5, 3])
    """
    n = _leading(example)
    if n is None or n == 0:
        return example

    def resize(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != n:
            return t
        if batch_size <= n:
            return t[:batch_size]
        reps = math.ceil(batch_size / n)
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size]

    return _map_tensors(example, resize)


def _prepare(example: Any, device: torch.device | None) -> Any:
    """Detached, ordinary (non-inference) copies on ``device``."""
    with torch.inference_mode(False):
        return _map_tensors(example, lambda t: t.detach().to(device if device is not None else t.device).clone())


def _call(fn: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return fn(**inputs)
    if isinstance(inputs, tuple):
        return fn(*inputs)
    return fn(inputs)


def _device_of(model: Any) -> torch.device | None:
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for b in model.buffers():
            return b.device
    return None


@contextlib.contextmanager
def _inference(model: Any) -> Iterator[None]:
    """Eval mode without autograd (``no_grad``, not ``inference_mode``: torchao tensors and exports need ordinary
    tensors); every train flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    try:
        if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
            model.eval()  # an exported GraphModule (PT2E) refuses eval(): it runs in the mode it was exported in
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


# ---------------------------------------------------------------------- sizes
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` really stores: a wrapper tensor subclass (torchao) counts the tensors it is made of."""
    return sum(leaf.nbytes for leaf in _leaves(t))


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        try:
            names, _ = t.__tensor_flatten__()
        except Exception:  # pragma: no cover - a subclass that cannot flatten itself
            return [t]
        out: list[torch.Tensor] = []
        for name in names:
            inner = getattr(t, name, None)
            if isinstance(inner, torch.Tensor):
                out.extend(_leaves(inner))
        return out
    return [t]


def _live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a model holds for inference: its ``state_dict``, or, for an ``fx.GraphModule`` (PT2E), only the
    parameters and buffers its graph reads (``convert_pt2e`` keeps the float originals as dead parameters)."""
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    if not isinstance(model, torch.fx.GraphModule):
        return state
    used: set[str] = set()
    for node in model.graph.nodes:
        if node.op == "get_attr":
            used.add(str(node.target))
        elif node.op == "call_module":
            prefix = f"{node.target}."
            used.update(k for k in state if k.startswith(prefix))
    return {k: v for k, v in state.items() if k in used}


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of ``model``'s weights stores, each at its real size (packed 4-bit and int8
    weights with their quantization state, torchao subclasses by their inner tensors), shared storage counted once.

    Example:
        >>> stored_bytes(torch.nn.Linear(4, 2))  # 8 + 2 float32 values
        40
    """
    seen: set[tuple[int, Any]] = set()
    total = 0
    for t in _live_tensors(model).values():
        for leaf in _leaves(t):
            if leaf.device.type == "meta":
                total += leaf.nbytes
                continue
            key = (leaf.untyped_storage().data_ptr() + leaf.storage_offset() * leaf.element_size(), leaf.nbytes)
            if key[0] and key in seen:
                continue
            seen.add(cast(Any, key))
            total += leaf.nbytes
    return total


def _nonzero(t: torch.Tensor) -> int:
    if t.device.type == "meta":
        return t.numel()
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "dequantize"):
        with contextlib.suppress(Exception):
            return int(torch.count_nonzero(t.dequantize()))
        return t.numel()
    return int(torch.count_nonzero(t.detach()))


@torch.no_grad()
def count_params(model: nn.Module) -> dict[str, int]:
    """``{"params", "trainable", "nonzero"}``: weights a model holds (a packed 4-bit weight counted as its
    ``in x out`` values, a PT2E ``GraphModule`` by the parameters and frozen weights its graph reads), how many train,
    and how many are not zero (quantized weights are dequantized to count them)."""
    if isinstance(model, torch.fx.GraphModule):
        live = _live_tensors(model)
        names = {n for n, _ in model.named_parameters()}
        weights = {k: v for k, v in live.items() if k in names or k.rsplit(".", 1)[-1].startswith("_frozen_param")}
        params = sum(v.numel() for v in weights.values())
        trainable = sum(v.numel() for k, v in weights.items() if k in names and v.requires_grad)
        return {"params": params, "trainable": trainable, "nonzero": sum(_nonzero(v) for v in weights.values())}
    quantized = {id(layer.weight): (backend, layer) for backend, layer in quantized_layers_by_backend(model).values()}
    total = trainable = nonzero = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        entry = quantized.get(id(p))
        n, nz = _quantized_counts(*entry) if entry is not None else (p.numel(), _nonzero(p))
        total += n
        trainable += n if p.requires_grad else 0
        nonzero += nz
    for key, entry in quantized.items():  # weights a quantized layer keeps as buffers (PT2E int8 convolutions)
        if key not in seen:
            n, nz = _quantized_counts(*entry)
            total += n
            nonzero += nz
    return {"params": total, "trainable": trainable, "nonzero": nonzero}


def _quantized_counts(backend: QuantizationBackend, layer: nn.Module) -> tuple[int, int]:
    """Weights and non-zero weights of a quantized layer (its packed weight counted as its logical values)."""
    n = backend.weight_count(layer)
    try:
        return n, int(torch.count_nonzero(backend.dequantized_weight(layer)))
    except Exception:  # pragma: no cover - a layer its library cannot dequantize here
        return n, n


# ---------------------------------------------------------------------- MACs
def count_macs(model: nn.Module, example_inputs: Any) -> tuple[int | None, str]:
    """Multiply-accumulates of one forward on **one sample** of ``example_inputs``, and the counter used.

    ``FlopCounterMode`` (half the FLOPs of matrix products and convolutions) first, with the quantized layers whose
    kernels it cannot see added at ``in x out`` per token; torch-pruning's op counter if that fails; ``(None,
    reason)`` if both fail (a module neither can run on its own).
    """
    device = _device_of(model)
    n = _leading(example_inputs) or 1
    # one sample, or (a graph exported for a fixed batch) the example's own batch divided by its size
    attempts = [(_prepare(batch_inputs(example_inputs, 1), device), 1)]
    if n > 1:
        attempts.append((_prepare(example_inputs, device), n))
    errors = []
    for inputs, size in attempts:
        try:
            return _flop_counter_macs(model, inputs) // size, "FlopCounterMode"
        except Exception as err:  # a module FlopCounterMode cannot run under
            errors.append(f"{type(err).__name__}: {err}")
    for inputs, _size in attempts:
        try:
            import torch_pruning as tp

            with _inference(model), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                macs, _ = tp.utils.count_ops_and_params(model, inputs if isinstance(inputs, (tuple, list, dict)) else (inputs,))
            # torch-pruning divides by the batch size already
            return int(macs), "torch_pruning.utils.count_ops_and_params"
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")
    return None, "not counted (" + "; ".join(dict.fromkeys(e.splitlines()[0][:200] for e in errors)) + ")"


def _analytic_macs(m: nn.Module, x: Any, out: Any) -> int:
    """MACs of a Linear / Conv layer's own weight for one call (what its kernel does, whatever it is)."""
    if not isinstance(x, torch.Tensor):
        return 0
    if isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features")):
        fin, fout = int(cast(Any, m).in_features), int(cast(Any, m).out_features)
        return x.numel() // max(fin, 1) * fin * fout
    if isinstance(m, nn.modules.conv._ConvNd) and isinstance(out, torch.Tensor):
        k = math.prod(m.kernel_size) * (m.in_channels // m.groups)
        return out.numel() * k
    return 0


def _flop_counter_macs(model: nn.Module, inputs: Any) -> int:
    """``FlopCounterMode`` MACs, plus the Linear / Conv layers whose kernels it does not see (bitsandbytes packed
    weights, torchao int8 matmuls): where less than the layer's own ``in x out`` per token was counted inside it,
    that is added (an adapter's small matmuls inside such a layer are counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    extra = 0
    handles = []
    quantized = {id(m) for _, m in quantized_layers_by_backend(model).values()}
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or id(m) in quantized]
    with _inference(model), FlopCounterMode(display=False) as counter:
        for layer in layers:
            state: dict[str, int] = {}

            def pre(m: nn.Module, args: Any, state: dict[str, int] = state) -> None:
                state["before"] = int(counter.get_total_flops())

            def post(m: nn.Module, args: Any, out: Any, state: dict[str, int] = state) -> None:
                nonlocal extra
                counted = (int(counter.get_total_flops()) - state.get("before", 0)) // 2
                base = _analytic_macs(m, args[0] if args else None, out)
                if counted < base:
                    extra += base

            handles.append(layer.register_forward_pre_hook(pre))
            handles.append(layer.register_forward_hook(post))
        try:
            _call(model, inputs)
        finally:
            for h in handles:
                h.remove()
    return int(counter.get_total_flops()) // 2 + extra


# ---------------------------------------------------------------------- time
def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(
    fn: Callable[..., Any],
    example_inputs: Any,
    *,
    batch_size: int | None = None,
    repeats: int = 20,
    warmup: int = 5,
    device: torch.device | str | None = None,
    timer: Timer = time.perf_counter,
) -> dict[str, Any]:
    """Inference latency of ``fn`` (an ``nn.Module`` in eval mode without autograd, or any callable such as a loaded
    export) on ``example_inputs`` resized to ``batch_size``: the median of ``repeats`` timed calls after ``warmup``
    untimed ones, synchronizing CUDA around each call.

    Returns:
        ``median_ms``, ``min_ms``, ``max_ms``, ``batch_size``, ``repeats``, ``warmup``, ``device``.
    """
    dev = torch.device(device) if device is not None else _device_of(fn)
    example = batch_inputs(example_inputs, batch_size) if batch_size is not None else example_inputs
    inputs = _prepare(example, dev)
    times = []
    with _inference(fn):
        for _ in range(warmup):
            _call(fn, inputs)
        _sync(dev)
        for _ in range(repeats):
            t0 = timer()
            _call(fn, inputs)
            _sync(dev)
            times.append(timer() - t0)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "batch_size": batch_size if batch_size is not None else _leading(example_inputs),
        "repeats": repeats,
        "warmup": warmup,
        "device": str(dev) if dev is not None else "cpu",
    }


class ThroughputMeter:
    """Training samples per second over timed intervals, the first ``skip`` steps of each fit left out
    (compilation, autotuning and allocator warm-up happen there).

    ``start()`` opens an interval if none is open, ``step(samples)`` closes it and opens the next, ``pause()`` drops
    an open interval (validation, measurements). Totals survive a checkpoint through ``state_dict()``.
    """

    def __init__(self, skip: int = 3, timer: Timer = time.perf_counter, device: torch.device | None = None) -> None:
        self.skip = skip
        self.timer = timer
        self.device = device
        self.samples = 0
        self.seconds = 0.0
        self.steps = 0  # counted steps
        self.seen = 0  # steps seen in this fit
        self._t0: float | None = None

    def start(self) -> None:
        if self._t0 is None:
            _sync(self.device)
            self._t0 = self.timer()

    def pause(self) -> None:
        self._t0 = None

    def step(self, samples: int) -> None:
        _sync(self.device)
        now = self.timer()
        if self._t0 is not None:
            self.seen += 1
            if self.seen > self.skip:
                self.samples += int(samples)
                self.seconds += now - self._t0
                self.steps += 1
        self._t0 = now

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "seconds": self.seconds, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.samples = int(state.get("samples", 0))
        self.seconds = float(state.get("seconds", 0.0))
        self.steps = int(state.get("steps", 0))


# ---------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak where the device can (CUDA); a process's RSS peak cannot be reset."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> tuple[int | None, str]:
    """``(bytes, source)``: ``torch.cuda.max_memory_allocated`` on CUDA (since the last reset), else the process's peak
    resident set size since it started (``resource.getrusage``), else ``(None, reason)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return int(rss) * scale, "process peak RSS (resource.getrusage, since process start)"
    except Exception:  # pragma: no cover - no resource module (Windows)
        return None, f"not reported on {device.type}"


# ---------------------------------------------------------------------- all at once
def measure_model(
    model: nn.Module,
    example_inputs: Any | None,
    *,
    batch_sizes: Sequence[int] = (1,),
    repeats: int = 20,
    warmup: int = 5,
    device: torch.device | str | None = None,
    timer: Timer = time.perf_counter,
    with_latency: bool = True,
) -> dict[str, Any]:
    """Sizes, MACs and latency of ``model``: ``params``, ``trainable``, ``nonzero``, ``sparsity``, ``stored_bytes``,
    ``macs`` (per sample) with ``macs_counter``, ``latency_ms`` (``{str(batch): median ms}``) and ``latency``
    (the full :func:`latency` results). Without ``example_inputs`` only the sizes are measured.
    ``model`` is moved to ``device`` for timing and back afterwards."""
    counts = count_params(model)
    out: dict[str, Any] = {
        **counts,
        "sparsity": 1.0 - counts["nonzero"] / counts["params"] if counts["params"] else 0.0,
        "stored_bytes": stored_bytes(model),
        "quantized_layers": len(quantized_layers_by_backend(model)),
        "macs": None,
        "macs_counter": "no example input",
        "latency_ms": {},
        "latency": {},
    }
    if example_inputs is None:
        return out
    out["macs"], out["macs_counter"] = count_macs(model, example_inputs)
    if with_latency:
        with on_device(model, device):
            for b in batch_sizes:
                res = latency(model, example_inputs, batch_size=b, repeats=repeats, warmup=warmup, device=device, timer=timer)
                out["latency"][str(b)] = res
                out["latency_ms"][str(b)] = res["median_ms"]
    return out


def exported_latency(
    model: nn.Module | None,
    example_inputs: Any,
    directory: str | Path,
    *,
    tag: str = "model",
    batch_sizes: Sequence[int] = (1,),
    compile: bool = True,
    repeats: int = 20,
    warmup: int = 5,
    device: torch.device | str | None = None,
    timer: Timer = time.perf_counter,
    existing: str | Path | None = None,
    format: str | None = None,
) -> dict[str, Any]:
    """Export ``model`` once with :func:`lightning_accel.export` (dynamic batch, ``compile=`` AOTInductor), load it back
    with :func:`lightning_accel.load_exported` and time the loaded callable at each of ``batch_sizes`` like
    :func:`latency`. With ``existing`` (a file another callback exported, e.g. ``Quantization(export_path=...)``) that
    file is timed instead and ``model`` may be ``None``. ``format`` (``"aoti"``, ``"program"``, ``"onnx"``,
    ``"openvino"``, ``"auto"``) replaces ``compile``; with ``"auto"`` the file is the fastest runtime measured at
    ``batch_sizes`` (:func:`lightning_accel.export`).

    Returns:
        ``{"latency_ms": {batch: ms}, "latency": {batch: results}, "file_bytes": int | None, "path": str | None,
        "error": str | None, "format": str | None}``; an export that fails is reported in ``error``, never raised.
    """
    from lightning_accel import deploy

    fmt = format or ("aoti" if compile else "program")
    out: dict[str, Any] = {"latency_ms": {}, "latency": {}, "file_bytes": None, "path": None, "error": None, "format": None}
    directory = Path(directory)
    if existing is not None:
        path = Path(existing)
        dev = torch.device(device) if device is not None else None
    else:
        if model is None:
            raise ValueError("exported_latency needs a `model` or an `existing` file")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / (tag if fmt == "auto" else f"{tag}{_SUFFIX[fmt]}")
        dev = None
    try:
        if existing is None:
            with on_device(model, device), _inference(model):  # type: ignore[arg-type]
                dev = _device_of(model)
                inputs = _prepare(batch_inputs(example_inputs, min(batch_sizes)), dev)
                extra: dict[str, Any] = {}
                if fmt == "auto":
                    extra = {"batch_sizes": list(batch_sizes), "timer": _call_timer(timer), "repeats": max(3, repeats // 2)}
                path = deploy.export(model, inputs, path, format=fmt, **extra)  # type: ignore[arg-type]
        fn = deploy.load_exported(path)
        out["format"] = getattr(fn, "format", None)
        for b in batch_sizes:
            inputs = _prepare(batch_inputs(example_inputs, b), dev)
            res = latency(fn, inputs, repeats=repeats, warmup=warmup, device=dev, timer=timer)
            res["batch_size"] = b
            out["latency"][str(b)] = res
            out["latency_ms"][str(b)] = res["median_ms"]
    except Exception as err:  # the export of this model failed: say so, keep the rest of the report
        out["error"] = f"exporting {tag} failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        return out
    out["file_bytes"] = _path_bytes(path) if path.suffix != ".xml" else (_path_bytes(path) or 0) + (_path_bytes(path.with_suffix(".bin")) or 0)
    out["path"] = str(path)
    return out


_SUFFIX = {"aoti": ".pt2", "program": ".pt2", "onnx": ".onnx", "openvino": ".xml"}


def _call_timer(clock: Timer) -> Callable[..., float]:
    """``format="auto"``'s timer (one call of ``fn``) on the report's clock."""

    def timer(label: str, fn: Callable[..., Any], inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> float:
        t0 = clock()
        fn(*inputs[0], **inputs[1])
        return clock() - t0

    return timer


def side_by_side_latency(
    fns: Mapping[str, Callable[..., Any]],
    example_inputs: Any,
    *,
    batch_sizes: Sequence[int] = (1,),
    repeats: int = 20,
    warmup: int = 5,
    device: torch.device | str | None = None,
    timer: Timer = time.perf_counter,
    spread: dict[str, dict[str, dict[str, float]]] | None = None,
) -> dict[str, dict[str, float]]:
    """Median latency of several callables on the same inputs, timed in turn (A, B, A, B, ...) so that a change of
    the machine's load hits them alike: ``{name: {str(batch): median ms}}``; ``spread``, a dict, receives
    ``{name: {str(batch): {"min_ms", "median_ms", "max_ms"}}}`` over the rounds."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out: dict[str, dict[str, float]] = {name: {} for name in fns}
    for b in batch_sizes:
        inputs = _prepare(batch_inputs(example_inputs, b), dev)
        times: dict[str, list[float]] = {name: [] for name in fns}
        with torch.no_grad():
            for _ in range(warmup):
                for fn in fns.values():
                    _call(fn, inputs)
            for _ in range(repeats):
                for name, fn in fns.items():
                    _sync(dev)
                    t0 = timer()
                    _call(fn, inputs)
                    _sync(dev)
                    times[name].append(timer() - t0)
        for name, ts in times.items():
            out[name][str(b)] = statistics.median(ts) * 1e3
            if spread is not None:
                spread.setdefault(name, {})[str(b)] = {"min_ms": min(ts) * 1e3, "median_ms": out[name][str(b)], "max_ms": max(ts) * 1e3}
    return out


def _path_bytes(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str | None) -> Iterator[None]:
    """Move ``model`` to ``device`` for the block and back to where it was."""
    here = _device_of(model)
    target = torch.device(device) if device is not None else None
    if target is None or here is None or here == target or (here.type == target.type == "cpu"):
        yield
        return
    model.to(target)
    try:
        yield
    finally:
        model.to(here)
