"""Per-layer sensitivity analysis as plain functions on a ``torch.nn.Module``, usable without a Trainer.

For every prunable layer (``granularity="weights"``: each Linear/Conv weight, unstructured magnitude pruning;
``granularity="channels"``: each torch-pruning group, structured pruning of that group alone) and every candidate
``amount``, and for every Linear layer and every candidate of ``bits`` (``"int8"``, ``"nf4"``, ``"fp4"``, with the
package's bitsandbytes layers), the layer is compressed *alone*, the metric is measured on validation batches, and
the layer is restored exactly (weights copied back, quantized layer swapped back, structured snapshot restored).

With ``folds=K`` the validation batches are dealt into ``K`` folds (batch ``i`` to fold ``i % K``) and every
measurement is taken on each fold: the *drop* (baseline minus compressed, for a metric where higher is better) is
reported as the mean and standard deviation over folds, so a choice is not driven by the noise of one small set.

:func:`recommend_allocation` then chooses one candidate per layer (an exact multiple-choice knapsack over the
per-layer curves, with drops clipped below at zero and made monotone in the amount): the most removed weights
(or stored bits saved) whose summed predicted drop stays within ``max_metric_drop``, or, with ``sparsity``, the
smallest predicted drop that removes that fraction of the analysed weights.

    result = analyze_sensitivity(model, val_loader, MulticlassAccuracy(10), amounts=[0.5, 0.8, 0.9], folds=3,
                                 max_metric_drop=0.01)
    ScheduledPruning(layer_amounts=result["recommendation"]["layer_amounts"])
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from lightning_accel._select import DEFAULT_PRUNABLE, NoMatchError, select_modules
from lightning_accel._validate import check_bool, check_choice, check_int, check_number, check_patterns
from lightning_accel.errors import SensitivityWarning  # noqa: F401 (public here too)
from lightning_accel.layer_settings import BITS, load_layer_amounts, load_layer_bits  # noqa: F401 (public here too)
from lightning_accel.pruning.apply import apply_pruning_plan_, restore_structure, snapshot_structure
from lightning_accel.pruning.graph import build_pruning_graph
from lightning_accel.pruning.macs import count_macs_params
from lightning_accel.pruning.plan import plan_structured_pruning
from lightning_accel.pruning.unstructured import compute_masks
from lightning_accel.quantization.backends import QuantConfig, get_backend

__all__ = [
    "BITS",
    "GRANULARITIES",
    "QUANT_BACKEND",
    "SensitivityWarning",
    "analyze_sensitivity",
    "check_amounts",
    "check_bits",
    "evaluate_allocation",
    "load_layer_amounts",
    "load_layer_bits",
    "metric_evaluator",
    "recommend_allocation",
]

GRANULARITIES: tuple[str, ...] = ("weights", "channels")
_FLOAT_BITS = 32
#: the quantization backend whose formats (:data:`BITS`) are measured, per layer
QUANT_BACKEND = "bitsandbytes"
_VERSION = 1
_RESOLUTION = 2000  # steps of the drop budget in the knapsack


Evaluate = Callable[[nn.Module, Sequence[Any]], float]


# ---------------------------------------------------------------------------------------------- argument checks
def check_amounts(amounts: Any, name: str = "amounts") -> list[float]:
    """A non-empty list of distinct fractions in ``(0, 1)``, returned sorted."""
    if isinstance(amounts, (str, bytes)) or not isinstance(amounts, Sequence) or not amounts:
        raise ValueError(f"`{name}` must be a non-empty list of fractions in (0, 1) like [0.5, 0.8, 0.9]; got {amounts!r}")
    for a in amounts:
        check_number(name, a, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    if len(set(amounts)) != len(amounts):
        raise ValueError(f"`{name}` must not repeat a value; got {list(amounts)!r}")
    return sorted(float(a) for a in amounts)


def check_bits(bits: Any) -> list[str]:
    """A (possibly empty) list of distinct names of :data:`BITS`."""
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Sequence):
        raise ValueError(f"`bits` must be a list of formats from {list(BITS)} like ['int8', 'nf4'] (or []); got {bits!r}")
    for b in bits:
        check_choice("bits", b, tuple(BITS))
    if len(set(bits)) != len(bits):
        raise ValueError(f"`bits` must not repeat a format; got {list(bits)!r}")
    return list(bits)


# ---------------------------------------------------------------------------------------------- evaluation
def metric_evaluator(metric: Any) -> Evaluate:
    """An ``evaluate(model, batches) -> float`` from a torchmetrics ``Metric`` (``update(outputs, targets)`` then
    ``compute()``) or a callable ``metric(outputs, targets) -> number`` (averaged over batches, weighted by their
    sizes). A batch is ``(inputs, targets)`` (or a longer tuple ending with the targets)."""
    is_metric = hasattr(metric, "update") and hasattr(metric, "compute") and hasattr(metric, "reset")
    if not is_metric and not callable(metric):
        raise ValueError(f"`metric` must be a torchmetrics Metric or a callable (outputs, targets) -> number; got {metric!r}")

    @torch.no_grad()
    def evaluate(model: nn.Module, batches: Sequence[Any]) -> float:
        if is_metric:
            metric.reset()
        total, weight = 0.0, 0
        for batch in batches:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ValueError(
                    f"a batch must be (inputs, targets) to measure `metric` on; got {type(batch).__name__}. Pass "
                    "`evaluate=` for other batch forms"
                )
            out = model(batch[0])
            if is_metric:
                metric.update(out, batch[-1])
            else:
                n = len(batch[-1])
                total += float(metric(out, batch[-1])) * n
                weight += n
        if is_metric:
            value = float(metric.compute())
            metric.reset()
            return value
        return total / max(weight, 1)

    return evaluate


def _fold_batches(batches: Sequence[Any], folds: int) -> list[list[Any]]:
    if folds > len(batches):
        raise ValueError(f"`folds`={folds} needs at least {folds} validation batches; got {len(batches)}")
    return [list(batches[k::folds]) for k in range(folds)]


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": float(statistics.fmean(values)),
        "std": float(statistics.pstdev(values)) if len(values) > 1 else 0.0,
        "folds": [float(v) for v in values],
    }


def _drop(base: Sequence[float], values: Sequence[float], mode: str) -> dict[str, Any]:
    sign = 1.0 if mode == "max" else -1.0
    drops = [sign * (b - v) for b, v in zip(base, values)]
    return {**_stats(drops), "metric": float(statistics.fmean(values))}


def _run(model: nn.Module, evaluate: Evaluate, folds: list[list[Any]]) -> list[float]:
    return [float(evaluate(model, fold)) for fold in folds]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Any:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in flags:
            m.training = t


# ---------------------------------------------------------------------------------------------- compressing one layer
@contextlib.contextmanager
def _pruned(weights: Mapping[str, nn.Parameter], amounts: Mapping[str, float]) -> Any:
    """Magnitude-prune each named weight to its amount, then put the exact values back."""
    saved = {n: weights[n].detach().clone() for n in amounts}
    try:
        with torch.no_grad():
            for n, a in amounts.items():
                if a > 0:
                    mask = compute_masks({n: weights[n]}, a, scope="layer")[n]
                    weights[n].mul_(mask.to(weights[n].dtype))
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                weights[n].copy_(w)


@contextlib.contextmanager
def _quantized(model: nn.Module, layers: Mapping[str, nn.Linear], fmt: Mapping[str, str], compute_dtype: str) -> Any:
    """Quantize each named layer to its format with the bitsandbytes backend, then swap the float layers back."""
    backend = get_backend(QUANT_BACKEND)
    originals: dict[str, Any] = {}
    try:
        config = QuantConfig(mode="nf4", compute_dtype=compute_dtype, layer_modes=dict(fmt))
        for name in fmt:
            originals.update(backend.quantize_(model, {name: layers[name]}, config))
        yield
    finally:
        backend.restore_(model, originals)


@contextlib.contextmanager
def _structured(model: nn.Module, example: Any, amounts: Mapping[str, float], exclude: Sequence[str] | None) -> Any:
    """Remove ``amounts[key]`` of the units of each named torch-pruning group, then restore the model exactly."""
    snapshot = snapshot_structure(model)
    try:
        graph = build_pruning_graph(model, example, exclude=exclude)
        plan = plan_structured_pruning(graph, 0.0, amounts=dict(amounts), max_layer_amount=1.0)
        apply_pruning_plan_(graph, plan)
        yield
    finally:
        restore_structure(snapshot)


def _groups(model: nn.Module, example: Any, exclude: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """``{group key: {"kind", "units"}}`` of the model's torch-pruning groups."""
    graph = build_pruning_graph(model, example, exclude=exclude)
    return {g.key: {"kind": g.kind, "units": g.units} for g in graph.groups}


def _key(a: float) -> str:
    return f"{a:g}"


# ---------------------------------------------------------------------------------------------- the analysis
def analyze_sensitivity(
    model: nn.Module,
    dataloader: Iterable[Any],
    metric: Any = None,
    *,
    amounts: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
    bits: Sequence[str] = (),
    folds: int = 1,
    granularity: str = "weights",
    modules: list[str] | None = None,
    exclude: list[str] | None = None,
    prune_head: bool = False,
    mode: str = "max",
    max_metric_drop: float | None = None,
    sparsity: float | None = None,
    evaluate: Evaluate | None = None,
    example_inputs: Any = None,
    compute_dtype: str = "fp32",
    name: str = "metric",
    on_measure: Callable[[str, str, dict[str, Any]], None] | None = None,
    macs: bool = False,
) -> dict[str, Any]:
    """Measure how much the metric drops when each layer alone is pruned to each of ``amounts`` (and quantized to
    each of ``bits``), and recommend a per-layer allocation.

    Args:
        model: any ``nn.Module``; left exactly as it was (train/eval flags included).
        dataloader: validation batches (iterated once and kept in memory), e.g. a ``DataLoader``.
        metric: a torchmetrics ``Metric`` (``update(outputs, targets)``, ``compute()``) or a callable
            ``(outputs, targets) -> number``; batches are then ``(inputs, targets)``. E.g.
            ``MulticlassAccuracy(10)``. Not needed with ``evaluate``.
        amounts: candidate fractions removed, each in ``(0, 1)``, e.g. ``[0.5, 0.8, 0.9]``: of the layer's weights
            (``granularity="weights"``) or of the group's channels / heads (``"channels"``).
        bits: candidate weight formats for Linear layers, from ``"int8"``, ``"nf4"``, ``"fp4"`` (bitsandbytes), e.g.
            ``["int8", "nf4"]``; ``[]`` for none.
        folds: K of the K-fold estimate over the batches (mean and std across folds), e.g. ``3``.
        granularity: ``"weights"`` (unstructured, per Linear/Conv layer; what :class:`ScheduledPruning` does) or
            ``"channels"`` (structured, per torch-pruning group; what :class:`StructuredPruning` does).
        modules, exclude, prune_head: which Linear/Conv layers, as for :func:`lightning_accel.prune_`; with
            ``"channels"`` only ``exclude`` applies (as for :class:`StructuredPruning`).
        mode: ``"max"`` if a higher metric is better (accuracy), ``"min"`` if lower is (loss).
        max_metric_drop: budget of the recommendation, ``>= 0``, e.g. ``0.01``; ``None``: no recommendation unless
            ``sparsity`` is set.
        sparsity: instead of a drop budget: recommend the allocation that removes this fraction of the analysed
            weights with the smallest predicted drop, e.g. ``0.9``.
        evaluate: ``evaluate(model, batches) -> float`` replacing ``metric`` (any batch form).
        example_inputs: ``"channels"``: one forward's input for tracing; default: the first batch's inputs.
        compute_dtype: compute dtype of the quantized layers (as for :func:`lightning_accel.quantize_`), e.g. ``"fp32"``.
        name: the metric's name in the result, e.g. ``"val_acc"``.
        on_measure: called as ``on_measure(layer, candidate, entry)`` after every measurement (progress).
        macs: ``"channels"`` only: also count the whole model's MACs with each group pruned to each amount
            (``layers[key]["macs"][amount]``) and unpruned (``base_macs``), for speed planning.

    Returns:
        A JSON-able dict: ``baseline`` (mean, std, per-fold values), ``layers``
        (``{name: {"params", "prune": {amount: {"mean", "std", "folds", "metric"}}, "quant": {format: ...}}}``, drops
        positive when the metric gets worse), ``seconds``, and with a budget ``recommendation`` (see
        :func:`recommend_allocation`, with the measured drop of the whole allocation applied at once).

    Raises:
        ValueError: a bad argument; fewer batches than ``folds``.
        NoMatchError: a pattern selects nothing.
        ImportError: ``bits`` without bitsandbytes installed.
    """
    amounts = check_amounts(amounts)
    bits = check_bits(bits)
    check_int("folds", folds, low=1)
    check_choice("granularity", granularity, GRANULARITIES)
    check_patterns("modules", modules)
    check_patterns("exclude", exclude)
    check_bool("prune_head", prune_head)
    check_choice("mode", mode, ("max", "min"))
    check_number("max_metric_drop", max_metric_drop, low=0.0, allow_none=True)
    check_number("sparsity", sparsity, low=0.0, high=1.0, high_inclusive=False, allow_none=True)
    check_bool("macs", macs)
    if macs and granularity != "channels":
        raise ValueError(f"`macs`=True counts MACs of pruned channel groups: it needs `granularity`='channels'; got {granularity!r}")
    if granularity == "channels" and bits:
        raise ValueError(f"`bits`={bits!r} applies to `granularity`='weights' only (quantization is per layer, not per channel group)")
    if evaluate is None:
        if metric is None:
            raise ValueError("`metric` or `evaluate` is needed to measure the model; got neither")
        evaluate = metric_evaluator(metric)
    if bits:
        get_backend(QUANT_BACKEND).require()
    started = time.perf_counter()
    batches = list(dataloader)
    fold_batches = _fold_batches(batches, folds)
    result: dict[str, Any] = {
        "version": _VERSION,
        "metric": name,
        "mode": mode,
        "folds": folds,
        "granularity": granularity,
        "amounts": amounts,
        "bits": bits,
        "batches": len(batches),
        "layers": {},
    }
    with _eval_mode(model):
        base = _run(model, evaluate, fold_batches)
        result["baseline"] = _stats(base)
        if granularity == "weights":
            selected = select_modules(model, modules, exclude, types=DEFAULT_PRUNABLE, include_output=prune_head)
            params = {f"{n}.weight": cast(nn.Parameter, m.weight) for n, m in selected.items()}
            quantizable = _quantizable(model, selected) if bits else {}
            for layer, module in selected.items():
                weight = cast(nn.Parameter, module.weight)
                entry: dict[str, Any] = {"type": type(module).__name__, "params": int(weight.numel()), "prune": {}, "quant": {}}
                for a in amounts:
                    with _pruned(params, {f"{layer}.weight": a}):
                        entry["prune"][_key(a)] = _drop(base, _run(model, evaluate, fold_batches), mode)
                    if on_measure is not None:
                        on_measure(layer, f"{a:.0%}", entry["prune"][_key(a)])
                if layer in quantizable:
                    for fmt in bits:
                        with _quantized(model, quantizable, {layer: fmt}, compute_dtype):
                            entry["quant"][fmt] = _drop(base, _run(model, evaluate, fold_batches), mode)
                        if on_measure is not None:
                            on_measure(layer, fmt, entry["quant"][fmt])
                result["layers"][layer] = entry
        else:
            if example_inputs is None:
                first = batches[0]
                example_inputs = first[0] if isinstance(first, (list, tuple)) else first
            groups = _groups(model, example_inputs, exclude)
            if not groups:
                raise NoMatchError(f"{type(model).__name__} has no prunable channel group (exclude={exclude})")
            total = sum(p.numel() for p in model.parameters())
            if macs:
                result["base_macs"], result["base_params"] = count_macs_params(model, example_inputs)
            for key, info in groups.items():
                entry = {"type": info["kind"], "units": info["units"], "removed": {}, "prune": {}, "quant": {}}
                if macs:
                    entry["macs"] = {}
                for a in amounts:  # one trace per measurement: the drop, the parameters removed and the MACs left
                    with _structured(model, example_inputs, {key: a}, exclude):
                        entry["prune"][_key(a)] = _drop(base, _run(model, evaluate, fold_batches), mode)
                        entry["removed"][_key(a)] = total - sum(p.numel() for p in model.parameters())
                        if macs:
                            entry["macs"][_key(a)] = count_macs_params(model, example_inputs)[0]
                    if on_measure is not None:
                        on_measure(key, f"{a:.0%}", entry["prune"][_key(a)])
                entry["params"] = int(round(max(entry["removed"].values()) / max(amounts)))
                result["layers"][key] = entry
        if max_metric_drop is not None or sparsity is not None:
            rec = recommend_allocation(result, max_metric_drop=max_metric_drop, sparsity=sparsity)
            rec["measured_drop"] = evaluate_allocation(
                model, fold_batches, evaluate, rec, base, mode, granularity=granularity,
                example_inputs=example_inputs, exclude=exclude, compute_dtype=compute_dtype,
            )
            result["recommendation"] = rec
    result["seconds"] = time.perf_counter() - started
    return result


def _quantizable(model: nn.Module, selected: Mapping[str, nn.Module]) -> dict[str, nn.Linear]:
    """The selected layers the quantization backend can replace (plain ``nn.Linear``, not an attention ``out_proj``)."""
    return get_backend(QUANT_BACKEND).pick(model, selected, strict=False)  # type: ignore[return-value]


def evaluate_allocation(
    model: nn.Module,
    folds: list[list[Any]],
    evaluate: Evaluate,
    allocation: Mapping[str, Any],
    base: Sequence[float],
    mode: str,
    *,
    granularity: str = "weights",
    example_inputs: Any = None,
    exclude: Sequence[str] | None = None,
    compute_dtype: str = "fp32",
) -> dict[str, Any]:
    """The measured drop (per fold, mean, std) of a whole recommendation applied at once (pruning and quantization
    measured separately: ``{"prune": ..., "quant": ...}``); the model is restored afterwards."""
    out: dict[str, Any] = {}
    amounts = {n: a for n, a in (allocation.get("layer_amounts") or {}).items() if a > 0}
    with _eval_mode(model):
        if amounts:
            if granularity == "weights":
                weights = {f"{n}.weight": model.get_submodule(n).weight for n in amounts}
                with _pruned(weights, {f"{n}.weight": a for n, a in amounts.items()}):  # type: ignore[arg-type]
                    out["prune"] = _drop(base, _run(model, evaluate, folds), mode)
            else:
                with _structured(model, example_inputs, amounts, exclude):
                    out["prune"] = _drop(base, _run(model, evaluate, folds), mode)
        fmts = {n: f for n, f in (allocation.get("layer_bits") or {}).items() if f in BITS}
        if fmts:
            layers = {n: model.get_submodule(n) for n in fmts}
            with _quantized(model, layers, fmts, compute_dtype):  # type: ignore[arg-type]
                out["quant"] = _drop(base, _run(model, evaluate, folds), mode)
    return out


# ---------------------------------------------------------------------------------------------- the allocation
def _curve(entry: Mapping[str, Any], options: Sequence[tuple[str, float]]) -> list[float]:
    """Predicted drops of ``options`` (in increasing compression), clipped at 0 and made non-decreasing."""
    out, worst = [], 0.0
    for key, _ in options:
        worst = max(worst, float(entry[key]["mean"]))
        out.append(worst)
    return out


def _knapsack(
    items: list[tuple[list[float], list[float]]], budget: float | None, need: float | None
) -> tuple[list[int], float, float]:
    """Multiple-choice knapsack: one option per item (``-1`` = nothing), each ``(costs, values)``.

    With ``budget``: maximize the value with the summed cost <= budget. With ``need``: minimize the cost with the
    summed value >= need (the most value if even everything falls short). Costs are rounded up to a grid of
    ``_RESOLUTION`` steps of the budget (or of the largest possible total cost)."""
    top = budget if budget is not None else sum(max(c, default=0.0) for c, _ in items)
    unit = top / _RESOLUTION if top > 0 else 1.0
    size = _RESOLUTION + 1
    neg = -1.0
    best = [0.0] * size  # best[c]: most value with total cost units <= c
    choice: list[list[int]] = []
    for costs, values in items:
        icost = [math.ceil(c / unit - 1e-9) if top > 0 else (0 if c <= 0 else size) for c in costs]
        new = list(best)
        pick = [-1] * size
        for c in range(size):
            for o, (ic, v) in enumerate(zip(icost, values)):
                if ic <= c and best[c - ic] > neg:
                    cand = best[c - ic] + v
                    if cand > new[c] + 1e-12:
                        new[c] = cand
                        pick[c] = o
        best = new
        choice.append(pick)
    if budget is not None:
        c_final = size - 1
    else:
        assert need is not None
        c_final = next((c for c in range(size) if best[c] >= need - 1e-9), size - 1)
    picks = [-1] * len(items)
    c = c_final
    for i in range(len(items) - 1, -1, -1):
        o = choice[i][c]
        picks[i] = o
        if o >= 0:
            costs = items[i][0]
            c -= math.ceil(costs[o] / unit - 1e-9) if top > 0 else 0
    cost = sum(items[i][0][o] for i, o in enumerate(picks) if o >= 0)
    value = sum(items[i][1][o] for i, o in enumerate(picks) if o >= 0)
    return picks, cost, value


def recommend_allocation(
    result: Mapping[str, Any], *, max_metric_drop: float | None = None, sparsity: float | None = None
) -> dict[str, Any]:
    """Choose one amount per layer (and one format per Linear layer) from an :func:`analyze_sensitivity` result.

    Per-layer drops are taken as additive; a candidate's predicted drop is its mean drop across folds, clipped at 0
    and made non-decreasing in the amount (a layer pruned more never counts as better). Exact multiple-choice
    knapsack (on a grid of 1/2000 of the budget).

    Args:
        result: from :func:`analyze_sensitivity` (or ``json.load`` of ``sensitivity.json``).
        max_metric_drop: the most predicted drop, ``>= 0``; pruning maximizes removed weights within it, and
            quantization separately maximizes stored bits saved within it.
        sparsity: instead: remove at least this fraction of the analysed weights with the least predicted drop
            (quantization is then not allocated).

    Returns:
        ``{"layer_amounts": {layer: amount or 0.0}, "layer_bits": {layer: format or "float"}, "predicted_drop":
        {"prune", "quant"}, "sparsity": removed / analysed weights, "bits_saved": fraction of the analysed Linear
        layers' float32 bits saved, "max_metric_drop", "target_sparsity"}``.

    Raises:
        ValueError: neither or both of ``max_metric_drop`` and ``sparsity``; a bad value.
    """
    if (max_metric_drop is None) == (sparsity is None):
        raise ValueError(
            f"give one of `max_metric_drop` and `sparsity`; got max_metric_drop={max_metric_drop!r}, sparsity={sparsity!r}"
        )
    check_number("max_metric_drop", max_metric_drop, low=0.0, allow_none=True)
    check_number("sparsity", sparsity, low=0.0, high=1.0, high_inclusive=False, allow_none=True)
    layers = result["layers"]
    names = list(layers)
    options = [(_key(float(a)), float(a)) for a in result["amounts"]]
    items = []
    for n in names:
        entry = layers[n]
        removed = entry.get("removed")
        values = [float(removed[k]) if removed else a * entry["params"] for k, a in options]
        items.append((_curve(entry["prune"], options), values))
    total = sum(layers[n]["params"] for n in names)
    need = None if sparsity is None else sparsity * total
    picks, cost, value = _knapsack(items, max_metric_drop, need)
    rec: dict[str, Any] = {
        "max_metric_drop": max_metric_drop,
        "target_sparsity": sparsity,
        "layer_amounts": {n: (options[o][1] if o >= 0 else 0.0) for n, o in zip(names, picks)},
        "predicted_drop": {"prune": cost},
        "sparsity": value / total if total else 0.0,
        "layer_bits": {},
        "bits_saved": 0.0,
    }
    fmts = list(result.get("bits") or [])
    if fmts and max_metric_drop is not None:
        qnames = [n for n in names if all(f in layers[n]["quant"] for f in fmts)]
        order = sorted(fmts, key=lambda f: -BITS[f])  # least compression first, for the monotone curve
        qopts = [(f, float(BITS[f])) for f in order]
        qitems = [(_curve(layers[n]["quant"], qopts), [(_FLOAT_BITS - b) * layers[n]["params"] for _, b in qopts]) for n in qnames]
        qpicks, qcost, qvalue = _knapsack(qitems, max_metric_drop, None)
        qtotal = sum(_FLOAT_BITS * layers[n]["params"] for n in qnames)
        rec["layer_bits"] = {n: (qopts[o][0] if o >= 0 else "float") for n, o in zip(qnames, qpicks)}
        rec["predicted_drop"]["quant"] = qcost
        rec["bits_saved"] = qvalue / qtotal if qtotal else 0.0
    return rec
