"""``format="auto"``: export every available format (int8 and float), time them on this machine, keep the fastest
that passes the accuracy guard.

Rules, per batch size the user names: a float file is kept only if it is not slower than the eager model, an int8
file only if it is not slower than the float file of its format (on a CPU without VNNI int8 can be 10x slower), and
every file must compute what the model computes: outputs within ``tolerance`` of the model's (relative to the
largest output magnitude), or, with ``metric``, a score no more than ``max_metric_drop`` below the model's. Among the
files kept, the fastest (geometric mean of the latencies over the batch sizes) wins; when none is kept the float
``torch.export`` program (the eager model's own speed) is written, with a warning.

Timing is interleaved: every round calls the eager model and each file once, in turn; each figure is the median
(with min and max) of ``repeats`` rounds. ``timer(label, fn, inputs) -> seconds`` times one call; tests pass a
fake one.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils import _pytree as pytree

import lightning_accel.deploy.layers as layers
from lightning_accel.deploy.common import (
    check_inputs,
    read_sidecar,
    sidecar_path,
    trace_inputs,
    write_sidecar,
)
from lightning_accel.deploy.exporter import SUFFIXES, export_format, load_file
from lightning_accel.errors import ExportWarning

__all__ = ["Candidate", "Timer", "available_formats", "batch_of", "candidates_for", "choose", "wall_clock"]

#: ``timer(label, fn, inputs) -> seconds``: time one call ``fn(*args, **kwargs)`` of ``inputs = (args, kwargs)``
Timer = Callable[[str, Callable[..., Any], tuple[tuple[Any, ...], dict[str, Any]]], float]


def wall_clock(label: str, fn: Callable[..., Any], inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> float:
    """The default timer: ``time.perf_counter`` around one call."""
    t0 = time.perf_counter()
    fn(*inputs[0], **inputs[1])
    return time.perf_counter() - t0


def batch_of(example: Any, batch_size: int) -> Any:
    """``example`` with every input tensor's first dimension tiled (or cut) to ``batch_size``."""

    def resize(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        n = t.shape[0]
        reps = math.ceil(batch_size / n)
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size] if reps > 1 else t[:batch_size]

    return pytree.tree_map(resize, example)


def available_formats() -> list[str]:
    """The formats whose runtime is installed here."""
    out = ["aoti", "program"]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401

        out.append("onnx")
    except ImportError:
        pass
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401

        out.append("openvino")
    except ImportError:
        pass
    return out


@dataclass
class Candidate:
    """One file ``auto`` tried and what it measured."""

    format: str
    int8: str  # "model" (the pipeline's int8 layers) or "none" (float)
    precision: str = "fp32"
    path: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    min_ms: dict[str, float] = field(default_factory=dict)
    max_ms: dict[str, float] = field(default_factory=dict)
    error: float | None = None  # largest |file - model| / largest |model| over the batch sizes
    metric: float | None = None
    kept: bool = False
    why: str = ""

    @property
    def label(self) -> str:
        return f"{self.format} {'int8' if self.int8 != 'none' else 'float'}{' bf16' if self.precision == 'bf16' else ''}"


def candidates_for(model: nn.Module, formats: Sequence[str]) -> list[Candidate]:
    """The files ``auto`` tries: per format the float file and, where the model has int8 layers, the int8 one
    (OpenVINO also in its bf16 precision)."""
    has_int8 = bool(layers.int8_scope(model))
    out = []
    for fmt in formats:
        precisions = ("fp32", "bf16") if fmt == "openvino" else ("fp32",)
        for precision in precisions:
            out.append(Candidate(fmt, "none", precision))
            if has_int8 and fmt != "program":  # an int8 program runs the eager int8 ops: never the fastest
                out.append(Candidate(fmt, "model", precision))
    return out


def _flat(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _error(got: Any, want: Any) -> float:
    g, w = _flat(got), _flat(want)
    if len(g) != len(w):
        return math.inf
    worst = 0.0
    for a, b in zip(g, w):
        if a.shape != b.shape:
            return math.inf
        scale = float(b.float().abs().max()) or 1.0
        worst = max(worst, float((a.float() - b.float()).abs().max()) / scale)
    return worst


def _stats(times: list[float]) -> tuple[float, float, float]:
    return statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3


def choose(
    model: nn.Module,
    example_inputs: Any,
    path: Path,
    *,
    formats: Sequence[str],
    batch_sizes: Sequence[int],
    calibration: Iterable[Any] | None,
    tolerance: float,
    metric: Callable[[Callable[..., Any]], float] | None,
    max_metric_drop: float,
    timer: Timer | None,
    repeats: int,
    warmup: int,
    dynamic_batch: bool,
    inductor_configs: dict[str, Any] | None,
    num_threads: int | None = None,
) -> tuple[Path, list[Candidate]]:
    """Export each candidate, measure, keep the winner at ``path`` (its suffix set by the winning format). Returns
    the path written and the table of candidates."""
    timer = timer or wall_clock
    calibration = list(calibration) if calibration is not None else None
    cands = candidates_for(model, formats)
    was_training = model.training
    model.eval()
    traced = trace_inputs(model, example_inputs, dynamic_batch=False)
    inputs = {b: traced.normalize(batch_of(example_inputs, b)) for b in batch_sizes}
    checks = [traced.normalize(batch_of(x, max(batch_sizes))) for x in check_inputs(example_inputs, calibration)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = [model(*a, **k) for a, k in checks]
    ref_metric = metric(model) if metric is not None else None
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent if path.parent.exists() else None))
    fns: dict[str, Callable[..., Any]] = {"eager": model}
    try:
        for i, c in enumerate(cands):
            file = work / f"c{i}{SUFFIXES[c.format]}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    export_format(
                        model, example_inputs, file, c.format, dynamic_batch=dynamic_batch, int8=c.int8,
                        precision=c.precision, calibration=calibration, inductor_configs=inductor_configs,
                    )
                    fn = load_file(file, num_threads)
                    with torch.no_grad():
                        c.error = max(_error(fn(*a, **k), ref) for (a, k), ref in zip(checks, reference))
                c.path = str(file)
            except Exception as err:  # a runtime that cannot take this model: say why, try the others
                c.why = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"
                continue
            if metric is not None:
                c.metric = float(metric(fn))
                if c.metric < ref_metric - max_metric_drop:  # type: ignore[operator]
                    c.why = f"metric {c.metric:.4g} < {ref_metric:.4g} - {max_metric_drop:g}"
                    continue
            elif c.error > tolerance:
                c.why = f"outputs differ by {c.error:.3g} > tolerance {tolerance:g}"
                continue
            fns[c.label] = fn
        eager_ms = _time(fns, inputs, cands, timer, repeats, warmup)
        _decide(cands, eager_ms, batch_sizes)
        kept = [c for c in cands if c.kept]
        if kept:
            best = min(kept, key=lambda c: sum(math.log(c.latency_ms[str(b)]) for b in batch_sizes))
        else:
            best = Candidate("program", "none")
            file = work / "fallback.pt2"
            export_format(model, example_inputs, file, "program", dynamic_batch=dynamic_batch, int8="none")
            best.path, best.why = str(file), "no file passed the rules: the float torch.export program (eager speed)"
            cands.append(best)
            warnings.warn(f"format='auto': {best.why}", ExportWarning, stacklevel=3)
        best.why = "chosen" + (f" ({best.why})" if best.why else "")
        final = _move(Path(best.path), path, best.format)  # type: ignore[arg-type]
    finally:
        fns.clear()
        shutil.rmtree(work, ignore_errors=True)
        model.train(was_training)
    meta = read_sidecar(final)
    meta["auto"] = {"batch_sizes": list(batch_sizes), "eager_ms": eager_ms, "candidates": [asdict(c) for c in cands]}
    write_sidecar(final, meta)
    rank_zero_info(table(cands, eager_ms, batch_sizes, final))
    return final, cands


def _time(
    fns: dict[str, Callable[..., Any]],
    inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]],
    cands: list[Candidate],
    timer: Timer,
    repeats: int,
    warmup: int,
) -> dict[str, float]:
    eager_ms: dict[str, float] = {}
    by_label = {c.label: c for c in cands}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b, (args, kwargs) in inputs.items():
            for _ in range(warmup):
                for fn in fns.values():
                    fn(*args, **kwargs)
            times: dict[str, list[float]] = {label: [] for label in fns}
            for _ in range(repeats):
                for label, fn in fns.items():
                    times[label].append(timer(label, fn, (args, kwargs)))
            for label, ts in times.items():
                med, lo, hi = _stats(ts)
                if label == "eager":
                    eager_ms[str(b)] = med
                else:
                    c = by_label[label]
                    c.latency_ms[str(b)], c.min_ms[str(b)], c.max_ms[str(b)] = med, lo, hi
    return eager_ms


def _decide(cands: list[Candidate], eager_ms: dict[str, float], batch_sizes: Sequence[int]) -> None:
    timed = [c for c in cands if c.latency_ms]
    floats = {(c.format, c.precision): c for c in timed if c.int8 == "none"}
    for c in timed:
        if c.int8 == "none":
            base, against = eager_ms, "the eager model"
        else:
            ref = floats.get((c.format, c.precision))
            base, against = (ref.latency_ms, f"the float {c.format} file") if ref is not None else (eager_ms, "the eager model")
        slower = [b for b in batch_sizes if c.latency_ms[str(b)] > base[str(b)]]
        if slower:
            b = slower[0]
            c.why = f"slower than {against} at batch {b} ({c.latency_ms[str(b)]:.3g} vs {base[str(b)]:.3g} ms)"
        else:
            c.kept = True


def _move(src: Path, dst: Path, fmt: str) -> Path:
    suffix = SUFFIXES[fmt]
    final = dst if dst.suffix == suffix else dst.with_suffix(suffix)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(final))
    shutil.move(str(sidecar_path(src)), str(sidecar_path(final)))
    if fmt == "openvino":
        shutil.move(str(src.with_suffix(".bin")), str(final.with_suffix(".bin")))
    return final


def table(cands: list[Candidate], eager_ms: dict[str, float], batch_sizes: Sequence[int], final: Path) -> str:
    """The text table ``auto`` logs: one line per file tried, latency (median [min-max]) per batch size."""
    head = "| file | " + " | ".join(f"batch {b} ms (x eager)" for b in batch_sizes) + " | max rel. error | decision |"
    lines = [f"lightning_accel.export(format='auto') wrote {final}", head, "|" + "---|" * (len(batch_sizes) + 3)]
    lines.append("| eager (the model) | " + " | ".join(f"{eager_ms.get(str(b), float('nan')):.3f}" for b in batch_sizes) + " | 0 | reference |")
    for c in cands:
        cells = []
        for b in batch_sizes:
            ms = c.latency_ms.get(str(b))
            cells.append("" if ms is None else f"{ms:.3f} [{c.min_ms[str(b)]:.3f}-{c.max_ms[str(b)]:.3f}] ({eager_ms[str(b)] / ms:.2f}x)")
        err = "" if c.error is None else f"{c.error:.2g}"
        lines.append(f"| {c.label} | " + " | ".join(cells) + f" | {err} | {c.why or 'kept'} |")
    return "\n".join(lines)
