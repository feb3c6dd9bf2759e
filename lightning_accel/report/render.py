"""Turning a report's results (a plain dict, see :class:`~lightning_accel.report.AccelerationReport`) into a console
table, ``report.json``, ``report.png`` and flat logger metrics. No Trainer needed: ``render_table(json.load(f))``.

A latency that got worse than its baseline (by more than the report's ``regression_tolerance``) is a *regression*:
red in the table, listed under ``results["regressions"]``, never dropped.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from lightning_accel.errors import ReportWarning  # noqa: F401 (public here too)

__all__ = ["ReportWarning", "format_bytes", "table_rows", "render_table", "render_text", "write_json", "write_figure", "flat_metrics"]


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"  # pragma: no cover


def _num(n: Any) -> str:
    return "-" if n is None else f"{int(n):,}"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _ratio(before: Any, after: Any) -> str:
    if before is None or after is None or not before:
        return "-"
    return f"{after / before:.2f}x"


def is_worse(before: float | None, after: float | None, mode: str = "max") -> bool | None:
    """Whether ``after`` is worse than ``before`` for a metric of ``mode`` ("max": higher is better); ``None`` when
    either is missing."""
    if before is None or after is None:
        return None
    return after < before if mode == "max" else after > before


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, bool]]:
    """``(quantity, before, after, change, regression)`` rows of the report table."""
    b, f = results.get("baseline") or {}, results.get("final") or {}
    rows: list[tuple[str, str, str, str, bool]] = [
        ("parameters", _num(b.get("params")), _num(f.get("params")), _ratio(b.get("params"), f.get("params")), False),
        ("non-zero parameters", _num(b.get("nonzero")), _num(f.get("nonzero")), _ratio(b.get("nonzero"), f.get("nonzero")), False),
        (
            "stored weight bytes",
            format_bytes(b.get("stored_bytes")),
            format_bytes(f.get("stored_bytes")),
            _ratio(b.get("stored_bytes"), f.get("stored_bytes")),
            False,
        ),
        ("MACs / sample", _num(b.get("macs")), _num(f.get("macs")), _ratio(b.get("macs"), f.get("macs")), False),
    ]
    for kind, label in (("eager", "in memory"), ("exported", "exported")):
        for batch, entry in (results.get("latency", {}).get(kind) or {}).items():
            speed = entry.get("speedup")
            change = "-" if speed is None else f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x SLOWER"
            rows.append(
                (
                    f"latency b={batch} ({label})",
                    _ms(entry.get("baseline_ms")),
                    _ms(entry.get("final_ms")),
                    change,
                    bool(entry.get("regression")),
                )
            )
    files = results.get("exported_bytes") or {}
    if files:
        rows.append(
            (
                "exported file",
                format_bytes(files.get("baseline")),
                format_bytes(files.get("final")),
                _ratio(files.get("baseline"), files.get("final")),
                False,
            )
        )
    tp = results.get("throughput") or {}
    if tp.get("samples_per_s") is not None:
        rows.append(("training throughput", "-", f"{tp['samples_per_s']:,.1f} samples/s", f"{tp.get('steps', 0)} steps timed", False))
    mem = results.get("memory") or {}
    if mem.get("peak_bytes") is not None:
        rows.append(("peak memory (fit)", "-", format_bytes(mem["peak_bytes"]), str(mem.get("source", "")), False))
    metric = results.get("metric") or {}
    if metric.get("name"):
        before, after = metric.get("before_fit_end"), metric.get("final")
        delta = "-" if before is None or after is None else f"{after - before:+.4f}"
        fmt = (lambda v: "-" if v is None else f"{v:.4f}")  # noqa: E731
        start = metric.get("sanity_check")
        if start is not None and after is not None:  # the model as the fit got it (a trained model being compressed)
            worse = bool(is_worse(start, after, metric.get("mode", "max")))
            rows.append((f"{metric['name']} (sanity check at fit start -> final)", fmt(start), fmt(after), f"{after - start:+.4f}", worse))
        rows.append((f"{metric['name']} (last fit validation -> final)", fmt(before), fmt(after), delta, bool(metric.get("worse"))))
    for t in results.get("techniques") or []:
        rows.append(_technique_row(t))
    return rows


def _technique_row(t: dict[str, Any]) -> tuple[str, str, str, str, bool]:
    """One row per ``techniques`` entry (a callback's ``report_summary``)."""
    pct = (lambda v: "-" if v is None else f"{v:.1%}")  # noqa: E731
    num = (lambda v: "-" if v is None else f"{v:+.4f}")  # noqa: E731
    if t.get("technique") == "SensitivityAnalysis":
        return (
            f"sensitivity: recommended sparsity ({t.get('layers')} layers, {t.get('folds')} folds)",
            "-",
            pct(t.get("recommended_sparsity")),
            f"{t.get('metric')} drop predicted {num(t.get('predicted_drop'))}, measured {num(t.get('measured_drop'))}; {t.get('json')}",
            False,
        )
    if t.get("technique") == "AutoCompress":
        goal, pred = t.get("goal") or {}, t.get("predicted") or {}
        limits = t.get("limits") or []
        return (
            "AutoCompress: goal -> predicted at plan",
            ", ".join(f"{k} {v:g}x" for k, v in goal.items()),
            ", ".join(f"{k} {pred[k]:.2f}x" for k in goal if pred.get(k) is not None),
            f"int8 {'yes' if t.get('int8') else 'no'}, {t.get('backoffs', 0)} back-offs"
            + (f"; limit: {limits[0]}" if limits else ""),
            bool(limits),
        )
    guard = t.get("guard") or {}
    return (
        f"{t.get('technique')}: reached / target",
        pct(t.get("target")),
        pct(t.get("reached")),
        f"guard: {guard.get('events_skipped', 0)} events held, {'paused' if guard.get('paused') else 'running'} "
        f"at the end (reference {guard.get('monitor')}={num(guard.get('reference'))})",
        bool(guard.get("paused")),
    )


def render_text(results: dict[str, Any]) -> str:
    """The report table as plain text (what is printed where rich is not installed)."""
    data = table_rows(results)
    rows = [("quantity", "before", "after", "change")] + [r[:4] for r in data]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        flag = "  <-- REGRESSION" if i > 0 and data[i - 1][4] else ""
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + flag)
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for note in results.get("notes") or []:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def render_table(results: dict[str, Any], console: Any | None = None) -> Any:
    """Print the report as a rich table (regressions in red) and return it; plain text when rich is missing."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        text = render_text(results)
        print(text)
        return text
    title = "AccelerationReport: baseline (fit start) vs final (fit end)"
    table = Table(title=title, show_lines=False)
    for col in ("quantity", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    for name, before, after, change, bad in table_rows(results):
        style = "bold red" if bad else None
        table.add_row(name, before, after, change, style=style)
    console = console if console is not None else Console()
    console.print(table)
    for note in results.get("notes") or []:
        console.print(f"[dim]note: {note}[/dim]")
    for reg in results.get("regressions") or []:
        console.print(f"[bold red]regression: {reg}[/bold red]")
    return table


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(results), indent=2, sort_keys=False))
    return path


def write_figure(results: dict[str, Any], path: str | Path) -> Path | None:
    """``report.png``: size (parameters, non-zero, stored bytes, MACs as after / before), latency before and after
    per batch size (in memory and exported), the monitored metric over the fit with the fit-end values, and sparsity
    over steps. Drawn with matplotlib's Agg canvas (no global backend change); ``None`` with a :class:`ReportWarning`
    when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(
            "AccelerationReport: matplotlib is not installed, so no report.png is drawn; "
            "pip install 'lightning-accel[examples]' (or matplotlib>=3.7)",
            ReportWarning,
            stacklevel=2,
        )
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_size, ax_lat), (ax_metric, ax_sparse) = fig.subplots(2, 2)
    b, f = results.get("baseline") or {}, results.get("final") or {}

    names, ratios = [], []
    for key, label in (("params", "params"), ("nonzero", "non-zero"), ("stored_bytes", "stored bytes"), ("macs", "MACs")):
        if b.get(key) and f.get(key) is not None:
            names.append(label)
            ratios.append(f[key] / b[key])
    ax_size.bar(names, ratios, color="tab:blue")
    ax_size.axhline(1.0, color="grey", lw=1, ls="--")
    for i, r in enumerate(ratios):
        ax_size.text(i, r, f"{r:.2f}x", ha="center", va="bottom")
    ax_size.set_title("size after / before (1 = baseline)")

    labels, before, after, bad = [], [], [], []
    for kind in ("eager", "exported"):
        for batch, e in (results.get("latency", {}).get(kind) or {}).items():
            if e.get("baseline_ms") is None or e.get("final_ms") is None:
                continue
            labels.append(f"b={batch}\n{'memory' if kind == 'eager' else 'exported'}")
            before.append(e["baseline_ms"])
            after.append(e["final_ms"])
            bad.append(bool(e.get("regression")))
    xs = range(len(labels))
    ax_lat.bar([x - 0.2 for x in xs], before, width=0.4, label="before", color="tab:grey")
    ax_lat.bar([x + 0.2 for x in xs], after, width=0.4, label="after", color=["tab:red" if x else "tab:green" for x in bad])
    ax_lat.set_xticks(list(xs), labels)
    ax_lat.set_ylabel("ms (median)")
    ax_lat.set_title("inference latency (red: slower than baseline)")
    if labels:
        ax_lat.legend()

    metric = results.get("metric") or {}
    hist = [h for h in metric.get("history") or [] if h.get("phase") != "sanity" and h.get("value") is not None]
    fit = [h for h in hist if h.get("phase") == "fit"]
    end = [h for h in hist if h.get("phase") == "fit_end"]
    start = metric.get("sanity_check")
    if start is not None:  # the model as the fit got it, at step 0
        ax_metric.scatter([0], [start], color="tab:gray", zorder=3, label="fit start (sanity check)")
    if fit:
        ax_metric.plot([h["step"] for h in fit], [h["value"] for h in fit], marker="o", label="during fit")
    if end:
        ax_metric.scatter([h["step"] for h in end], [h["value"] for h in end], color="tab:red", zorder=3, label="fit end")
    if metric.get("name"):
        first = start if start is not None else metric.get("before_fit_end")
        ax_metric.set_title(f"{metric['name']}: {_fmt(first)} -> {_fmt(metric.get('final'))}")
        if fit or end or start is not None:
            ax_metric.legend()
    ax_metric.set_xlabel("step")

    trace = results.get("sparsity") or []
    if trace:
        steps = [t["step"] for t in trace]
        ax_sparse.plot(steps, [t["sparsity"] for t in trace], label="zeros / params")
        if b.get("params"):
            ax_sparse.plot(steps, [t["params"] / b["params"] for t in trace], label="params / baseline params")
        ax_sparse.set_ylim(-0.02, 1.02)
        ax_sparse.legend()
    ax_sparse.set_xlabel("step")
    ax_sparse.set_title("sparsity over training")
    fig.savefig(path, dpi=90)
    return path


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The numbers of the report as ``report/*`` logger metrics."""
    out: dict[str, float] = {}
    b, f = results.get("baseline") or {}, results.get("final") or {}
    for key in ("params", "nonzero", "stored_bytes", "macs"):
        if b.get(key) is not None:
            out[f"report/{key}_baseline"] = float(b[key])
        if f.get(key) is not None:
            out[f"report/{key}_final"] = float(f[key])
        if b.get(key) and f.get(key) is not None:
            out[f"report/{key}_ratio"] = float(f[key]) / float(b[key])
    if f.get("sparsity") is not None:
        out["report/sparsity_final"] = float(f["sparsity"])
    for kind in ("eager", "exported"):
        for batch, e in (results.get("latency", {}).get(kind) or {}).items():
            for k in ("baseline_ms", "final_ms", "speedup"):
                if e.get(k) is not None:
                    out[f"report/latency_{kind}_b{batch}_{k}"] = float(e[k])
            out[f"report/latency_{kind}_b{batch}_regression"] = float(bool(e.get("regression")))
    tp = results.get("throughput") or {}
    if tp.get("samples_per_s") is not None:
        out["report/throughput_samples_per_s"] = float(tp["samples_per_s"])
    mem = results.get("memory") or {}
    if mem.get("peak_bytes") is not None:
        out["report/peak_memory_bytes"] = float(mem["peak_bytes"])
    metric = results.get("metric") or {}
    if metric.get("name"):
        for k in ("before_fit_end", "final"):
            if metric.get(k) is not None:
                out[f"report/{metric['name']}_{k}"] = float(metric[k])
    return out
