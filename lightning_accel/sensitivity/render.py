"""A sensitivity result (a plain dict, see :func:`~lightning_accel.analyze_sensitivity`) as a console table,
``sensitivity.json`` and ``sensitivity.png``. No Trainer needed: ``render_table(json.load(f))``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from lightning_accel.sensitivity.core import SensitivityWarning, _key

__all__ = ["render_table", "render_text", "table_rows", "write_figure", "write_json"]


def _cell(e: dict[str, Any] | None, folds: int) -> str:
    if e is None:
        return "-"
    return f"{e['mean']:+.3f}" + (f"±{e['std']:.3f}" if folds > 1 else "")


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: layer, weights, the drop at each amount and format, and the recommendation."""
    amounts = [_key(a) for a in result["amounts"]]
    bits = list(result.get("bits") or [])
    folds = int(result.get("folds", 1))
    rec = result.get("recommendation") or {}
    head = ["layer", "weights", *(f"prune {float(a):.0%}" for a in amounts), *bits, "recommended"]
    rows = []
    for name, e in result["layers"].items():
        pick = []
        if name in (rec.get("layer_amounts") or {}):
            pick.append(f"{rec['layer_amounts'][name]:.0%}")
        if name in (rec.get("layer_bits") or {}):
            pick.append(rec["layer_bits"][name])
        rows.append(
            [
                name,
                f"{e['params']:,}",
                *(_cell(e["prune"].get(a), folds) for a in amounts),
                *(_cell(e["quant"].get(b), folds) for b in bits),
                " / ".join(pick) or "-",
            ]
        )
    return head, rows


def _summary(result: dict[str, Any]) -> list[str]:
    base = result["baseline"]
    lines = [
        f"{result['metric']} baseline {base['mean']:.4f}"
        + (f" ± {base['std']:.4f} over {result['folds']} folds" if result["folds"] > 1 else "")
        + f"; drop = baseline - compressed ({'higher' if result['mode'] == 'max' else 'lower'} is better); "
        f"analysis took {result.get('seconds', 0.0):.1f} s"
    ]
    rec = result.get("recommendation")
    if rec:
        measured = rec.get("measured_drop") or {}
        m = measured.get("prune")
        lines.append(
            f"recommended pruning: {rec['sparsity']:.1%} of the analysed weights, predicted drop "
            f"{rec['predicted_drop']['prune']:.4f}" + (f", measured {m['mean']:+.4f}" if m else "")
            + (f" (budget {rec['max_metric_drop']})" if rec.get("max_metric_drop") is not None else "")
        )
        if rec.get("layer_bits"):
            q = measured.get("quant")
            lines.append(
                f"recommended quantization: {rec['bits_saved']:.1%} of the float32 bits saved, predicted drop "
                f"{rec['predicted_drop'].get('quant', 0.0):.4f}" + (f", measured {q['mean']:+.4f}" if q else "")
            )
    return lines


def render_text(result: dict[str, Any]) -> str:
    head, rows = table_rows(result)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines + _summary(result))


def render_table(result: dict[str, Any], console: Any | None = None) -> Any:
    """Print the per-layer table (rich if installed, else plain text) and return it."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        text = render_text(result)
        print(text)
        return text
    head, rows = table_rows(result)
    table = Table(title=f"SensitivityAnalysis: drop of {result['metric']} per layer ({result['granularity']})")
    for i, col in enumerate(head):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console = console if console is not None else Console()
    console.print(table)
    for line in _summary(result):
        console.print(line)
    return table


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def write_figure(result: dict[str, Any], path: str | Path) -> Path | None:
    """``sensitivity.png``: drop vs amount per layer (error bars: std across folds) and, with ``bits``, the drop
    per format per layer. ``None`` with a :class:`SensitivityWarning` when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(
            "SensitivityAnalysis: matplotlib is not installed, so no sensitivity.png is drawn; "
            "pip install 'lightning-accel[examples]' (or matplotlib>=3.7)",
            SensitivityWarning,
            stacklevel=2,
        )
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bits = list(result.get("bits") or [])
    fig = Figure(figsize=(12 if bits else 8, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if bits else 1, squeeze=False)[0]
    amounts = [float(a) for a in result["amounts"]]
    rec = (result.get("recommendation") or {}).get("layer_amounts") or {}
    for name, e in result["layers"].items():
        means = [e["prune"][_key(a)]["mean"] for a in amounts]
        stds = [e["prune"][_key(a)]["std"] for a in amounts]
        line = axes[0].errorbar(amounts, means, yerr=stds, marker="o", capsize=2, label=name)
        if rec.get(name):
            a = rec[name]
            axes[0].scatter([a], [e["prune"][_key(a)]["mean"]], s=120, facecolors="none", edgecolors=line[0].get_color())
    if result.get("recommendation", {}).get("max_metric_drop") is not None:
        axes[0].axhline(result["recommendation"]["max_metric_drop"], color="grey", ls="--", lw=1, label="max_metric_drop")
    axes[0].set_xlabel("fraction pruned (this layer alone)")
    axes[0].set_ylabel(f"drop of {result['metric']}")
    axes[0].set_title(f"pruning sensitivity ({result['granularity']}; circles: recommended)")
    axes[0].legend(fontsize=7, ncol=2)
    if bits:
        names = [n for n, e in result["layers"].items() if e["quant"]]
        width = 0.8 / len(bits)
        for i, b in enumerate(bits):
            xs = [j + i * width for j in range(len(names))]
            axes[1].bar(xs, [result["layers"][n]["quant"][b]["mean"] for n in names], width=width, label=b)
        axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right", fontsize=7)
        axes[1].set_title("quantization sensitivity (this layer alone)")
        axes[1].legend()
    fig.savefig(path, dpi=90)
    return path
