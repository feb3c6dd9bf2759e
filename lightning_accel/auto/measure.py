"""What AutoCompress measures on the uncompressed model before it plans (works on a plain ``nn.Module``).

* :func:`group_costs`: per prunable group, the metric drop and the model's MACs and parameters with that group alone
  pruned to each candidate amount (the sensitivity core, :func:`lightning_accel.analyze_sensitivity` with
  ``granularity="channels"``, on held-out batches).
* :func:`latency_model`: the deployed runtime's latency at the deployed batch size, timed on this machine, interleaved:
  the fp32 eager model, its float file, and the float and int8 files of a copy with every group pruned to one
  amount; fitted as ``fixed + per_mac * MACs`` (:class:`~lightning_accel.auto.plan.LatencyModel`).
* :func:`true_counts`: the MACs and parameters of the model with a whole plan applied (on a copy).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_accel.auto.plan import GroupCost, LatencyModel
from lightning_accel.deploy import available_formats, export, load_exported
from lightning_accel.deploy.auto import Timer, batch_of, wall_clock
from lightning_accel.pruning.structured import (
    apply_pruning_plan_,
    build_pruning_graph,
    count_macs_params,
    plan_structured_pruning,
)
from lightning_accel.sensitivity.core import Evaluate, analyze_sensitivity

__all__ = ["RUNTIMES", "call_args", "group_costs", "interleaved_ms", "plain_copy", "latency_model", "measuring_runtime", "pruned_copy", "true_counts"]

#: the runtimes AutoCompress times, in the order it prefers them (the first one installed is used)
RUNTIMES: tuple[str, ...] = ("onnx", "openvino", "aoti", "eager")


def measuring_runtime(requested: str) -> str:
    """The runtime to time: ``requested`` if it is installed, else for ``"auto"`` the first of :data:`RUNTIMES` that is
    (ONNX Runtime's export takes seconds, AOTInductor's tens of seconds)."""
    installed = [*available_formats(), "eager"]
    if requested != "auto":
        if requested not in installed:
            raise ImportError(
                f"AutoCompress `export_format`={requested!r} is not installed here (installed: {installed}); "
                "install the extra (`pip install lightning-accel[onnx]` or `[openvino]`)"
            )
        return requested
    return next(r for r in RUNTIMES if r in installed)


def group_costs(
    model: nn.Module,
    batches: Sequence[Any],
    evaluate: Evaluate,
    example: Any,
    amounts: Sequence[float],
    exclude: list[str] | None,
    mode: str,
    name: str,
) -> tuple[dict[str, GroupCost], dict[str, Any]]:
    """Per prunable group: metric drop, whole-model MACs and parameters with it alone pruned to each of ``amounts``
    (the model is left exactly as it was); and the sensitivity result (``baseline``, ``base_macs``, ``base_params``)."""
    result = analyze_sensitivity(
        model, batches, amounts=amounts, granularity="channels", exclude=exclude, mode=mode, evaluate=evaluate,
        example_inputs=example, name=name, macs=True,
    )
    base_params = int(result["base_params"])
    out = {}
    for key, entry in result["layers"].items():
        out[key] = GroupCost(
            key=key,
            kind=str(entry["type"]),
            units=int(entry["units"]),
            drop={a: float(v["mean"]) for a, v in entry["prune"].items()},
            macs={a: int(v) for a, v in entry["macs"].items()},
            params={a: base_params - int(v) for a, v in entry["removed"].items()},
        )
    return out, result


def pruned_copy(model: nn.Module, example: Any, amounts: dict[str, float] | float, exclude: list[str] | None,
                max_amount: float, copy_memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy of ``model`` with ``amounts`` of each group's units removed (one amount for all, or per group)."""
    clone = plain_copy(model, copy_memo)
    graph = build_pruning_graph(clone, example, exclude=exclude)
    if isinstance(amounts, dict):
        plan = plan_structured_pruning(graph, 0.0, amounts=amounts, max_layer_amount=max_amount)
    else:
        plan = plan_structured_pruning(graph, float(amounts), max_layer_amount=max_amount)
    apply_pruning_plan_(graph, plan)
    return clone.eval()


def plain_copy(model: nn.Module, copy_memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy of ``model`` in eval mode without the forward hooks callbacks put on it (a distillation hook would
    keep a copy of the callback and its teacher alive); ``copy_memo`` shares objects by reference (the Trainer)."""
    clone = copy.deepcopy(model, dict(copy_memo or {}))
    for m in clone.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            table = getattr(m, hooks, None)
            if isinstance(table, dict):
                table.clear()
    return clone.eval()


def true_counts(model: nn.Module, example: Any, amounts: dict[str, float], exclude: list[str] | None,
                max_amount: float, copy_memo: dict[int, Any] | None = None) -> tuple[int, int]:
    """MACs and parameters of ``model`` with the whole plan applied (on a copy)."""
    if not any(a > 0 for a in amounts.values()):
        return count_macs_params(model, example)
    return count_macs_params(pruned_copy(model, example, amounts, exclude, max_amount, copy_memo), example)


def interleaved_ms(
    fns: dict[str, Callable[..., Any]],
    *,
    example_batch: tuple[tuple[Any, ...], dict[str, Any]],
    repeats: int,
    warmup: int,
    timer: Timer | None = None,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median and ``[min, max]`` milliseconds of each of ``fns`` on ``example_batch`` (``(args, kwargs)``), every round
    calling each in turn (the machine's drift hits all alike), after ``warmup`` untimed rounds."""
    timer = timer or wall_clock
    times: dict[str, list[float]] = {k: [] for k in fns}
    args, kwargs = example_batch
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn(*args, **kwargs)
        for _ in range(repeats):
            for label, fn in fns.items():
                times[label].append(timer(label, fn, example_batch) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}, {k: [min(v), max(v)] for k, v in times.items()}


def call_args(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a forward call on ``example`` (a tensor, a tuple of inputs, or a dict of keywords)."""
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, tuple):
        return tuple(example), {}
    return (example,), {}


def latency_model(
    model: nn.Module,
    example: Any,
    batch_size: int,
    *,
    runtime: str,
    uniform: float,
    exclude: list[str] | None,
    max_amount: float,
    calibration: Sequence[Any] | None,
    int8: bool,
    repeats: int = 15,
    warmup: int = 3,
    timer: Timer | None = None,
    copy_memo: dict[int, Any] | None = None,
    workdir: str | Path | None = None,
) -> LatencyModel:
    """Time the deployed runtime at ``batch_size``: the fp32 eager model, the float file of ``model`` and of a copy
    with every group pruned by ``uniform``, and (``int8`` and ONNX Runtime / OpenVINO) the copy's int8 file
    (the runtime's own post-training quantization of every Linear/Conv, calibrated on ``calibration``); interleaved
    rounds, medians. ``runtime="eager"`` times the models themselves (no file)."""
    small = pruned_copy(model, example, uniform, exclude, max_amount, copy_memo)
    base_macs = count_macs_params(model, example)[0]
    small_macs = count_macs_params(small, example)[0]
    inputs = call_args(batch_of(example, batch_size))
    was_training = model.training
    model.eval()
    fns: dict[str, Callable[..., Any]] = {"eager": model}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if runtime == "eager":
            fns["float"], fns["small"] = model, small
        else:
            suffix = {"onnx": ".onnx", "openvino": ".xml"}.get(runtime, ".pt2")
            threads = torch.get_num_threads()
            for label, m, q in (("float", model, "none"), ("small", small, "none"), ("small_int8", small, "all")):
                if q == "all" and (not int8 or runtime not in ("onnx", "openvino")):
                    continue
                path = export(m, example, Path(tmp) / f"{label}{suffix}", format=runtime, int8=q, calibration=calibration)
                fns[label] = load_exported(path, num_threads=threads)
        try:
            med, spread = interleaved_ms(fns, example_batch=inputs, repeats=repeats, warmup=warmup, timer=timer)
        finally:
            model.train(was_training)
    # a line through (base_macs, float) and (small_macs, small); a file that did not get faster: flat
    slope = max((med["float"] - med["small"]) / max(base_macs - small_macs, 1), 0.0)
    fixed = med["float"] - slope * base_macs
    if fixed < 0:  # faster than proportional: all of it variable
        fixed, slope = 0.0, med["float"] / max(base_macs, 1)
    ratio = med["small_int8"] / med["small"] if "small_int8" in med else None
    return LatencyModel(
        runtime=runtime,
        batch_size=batch_size,
        eager_ms=med["eager"],
        float_ms=med["float"],
        fixed_ms=fixed,
        ms_per_mmac=slope * 1e6,
        int8_ratio=ratio,
        base_macs=int(base_macs),
        points=[
            {"label": k, "macs": float(base_macs if k in ("eager", "float") else small_macs), "ms": med[k],
             "min_ms": spread[k][0], "max_ms": spread[k][1]}
            for k in med
        ],
    )
