"""A/B timing harness: interleaved repeats, warm-up excluded, fixed threads, median of ratios.

Each benchmark module ``benchmarks/bench_<name>.py`` defines ``run(quick: bool) -> Report``. Variants of a
comparison are timed in turn inside each repeat (A, B, C, A, B, C, ...), so drift of the machine hits all
of them alike; a variant's ratio to the baseline is the median over repeats of the per-repeat ratio.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Row:
    """One line of a report: a variant's measurements, its ratio to the baseline, and free-form extras."""

    name: str
    median_s: float | None = None
    ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ratio_label: str = "time / baseline"

    def to_markdown(self) -> str:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r.extra if k not in keys]
        timed = any(r.median_s is not None for r in self.rows)  # no empty column when rows carry ratios only
        head = ["variant", *(["median (ms)"] if timed else []), self.ratio_label, *keys]
        lines = [f"### {self.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [
                r.name,
                *(["" if r.median_s is None else f"{r.median_s * 1e3:.2f}"] if timed else []),
                "" if r.ratio is None else f"{r.ratio:.3f}",
                *(_fmt(r.extra.get(k)) for k in keys),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
            "env": environment(),
        }


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def compare(
    variants: dict[str, Callable[[], Any]],
    *,
    baseline: str | None = None,
    repeats: int = 7,
    warmup: int = 2,
    inner: int = 1,
    threads: int | None = 2,
    sync: Callable[[], None] | None = None,
) -> list[Row]:
    """Time each zero-argument callable, interleaved, and return rows with the median of ratios.

    Args:
        variants: name -> callable doing one unit of work (run ``inner`` times per sample).
        baseline: the variant ratios are taken against (default: the first).
        repeats: measured rounds; every round times every variant once.
        warmup: unmeasured rounds first (compilation, caches, allocator).
        inner: calls per sample, for work too short to time alone.
        threads: ``torch.set_num_threads`` during the measurement (``None``: leave as is).
        sync: called before reading the clock (e.g. ``torch.cuda.synchronize``).
    """
    if not variants:
        raise ValueError("`variants` must not be empty")
    baseline = baseline or next(iter(variants))
    if baseline not in variants:
        raise ValueError(f"`baseline` {baseline!r} is not one of {list(variants)}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            for fn in variants.values():
                for _ in range(inner):
                    fn()
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                if sync:
                    sync()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                if sync:
                    sync()
                samples[name].append((time.perf_counter() - t0) / inner)
    finally:
        torch.set_num_threads(old_threads)
    base = samples[baseline]
    return [
        Row(
            name=name,
            median_s=statistics.median(s),
            ratio=statistics.median(x / b for x, b in zip(s, base)),
        )
        for name, s in samples.items()
    ]


def save(report: Report, name: str, out_dir: Path | None = None) -> Path:
    out = out_dir or RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(report.to_json(), indent=2))
    return path
