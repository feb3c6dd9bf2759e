"""What training cost: the training step of the model as the fit got it (float, eager, timed on a copy at the first
batch) against the fit's steady-state step and its whole duration, with compile time on its own row.

Used by :class:`~lightning_accel.AccelerationReport`; works on any Trainer without it too::

    cost = TrainingCost()
    cost.capture(trainer, pl_module)          # before any callback changes the model (a CPU copy is kept)
    cost.fit_started()
    cost.batch_start(trainer, batch, 0)       # the first call times the copy's step, then drops the copy
    cost.batch_end()                          # ... every step
    cost.fit_ended(); cost.results(trainer)

The baseline runs the copy's own ``training_step`` (its ``self.log`` calls are no-ops without a Trainer), ``backward``
and a step of the optimizer its ``configure_optimizers`` builds (else the fit's optimizer class with its defaults, else
none: then forward and backward only, said in a note). It runs on the copy's parameters: the fit's model, optimizer
state and random generators are untouched (the generators' states are restored), and the time it takes is left out of
the fit's duration.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_accel._lifecycle import accel_callbacks

__all__ = [
    "BASELINE_STEPS",
    "STEADY_WINDOW",
    "TrainingCost",
    "compile_stats",
    "print_training_rows",
    "time_training_step",
    "training_metrics",
    "training_regressions",
    "training_rows",
]

#: timed steps of the baseline (after one untimed warm-up step); the median is reported
BASELINE_STEPS = 3
#: the steady-state step is the median of the fit's last this many training steps
STEADY_WINDOW = 50

Timer = Callable[[], float]


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    return None


def _first_optimizer(out: Any) -> torch.optim.Optimizer | None:
    """The first optimizer of what ``configure_optimizers`` may return."""
    if isinstance(out, torch.optim.Optimizer):
        return out
    if isinstance(out, dict):
        return _first_optimizer(out.get("optimizer"))
    if isinstance(out, (list, tuple)) and out:
        return _first_optimizer(out[0])
    return None


def time_training_step(
    module: pl.LightningModule,
    batch: Any,
    batch_idx: int,
    optimizer: torch.optim.Optimizer | None,
    *,
    steps: int = BASELINE_STEPS,
    warmup: int = 1,
    timer: Timer = time.perf_counter,
    device: torch.device | None = None,
) -> float:
    """Median seconds of ``training_step`` + ``backward`` (+ ``optimizer.step``) of ``module`` on ``batch``."""
    module.train()
    times = []
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")  # no Trainer: Lightning's log is a no-op
        for i in range(warmup + steps):
            _sync(device)
            t0 = timer()
            loss = _loss(module.training_step(batch, batch_idx))
            if loss is None:
                raise TypeError("training_step returned no loss tensor")
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                module.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                times.append(timer() - t0)
    return statistics.median(times)


class TrainingCost:
    """The baseline training step, the fit's step times and its duration; see the module docstring.

    Args:
        timer: the clock (``time.perf_counter``; tests pass a fake one).
        steps: timed steps of the baseline.
        window: steps of the fit's steady-state median.
    """

    def __init__(self, timer: Timer = time.perf_counter, steps: int = BASELINE_STEPS, window: int = STEADY_WINDOW) -> None:
        self.timer = timer
        self.steps = steps
        self.window = window
        self._copy: nn.Module | None = None
        self._device: torch.device | None = None
        self._t0: float | None = None
        self.reset()

    def reset(self) -> None:
        self.baseline_step_s: float | None = None
        self.baseline_what = ""
        self.fit_s = 0.0
        self.step_s_total = 0.0
        self.n_steps = 0
        self.recent: deque[float] = deque(maxlen=self.window)
        self.notes: list[str] = []
        self._fit_t0: float | None = None
        self._excluded = 0.0

    # ------------------------------------------------------------------ state (a resumed fit keeps its baseline)
    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline_step_s": self.baseline_step_s,
            "baseline_what": self.baseline_what,
            "fit_s": self.fit_s + self._running_fit_s(),
            "step_s_total": self.step_s_total,
            "n_steps": self.n_steps,
            "recent": list(self.recent),
            "notes": list(self.notes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline_step_s = state.get("baseline_step_s")
        self.baseline_what = str(state.get("baseline_what", ""))
        self.fit_s = float(state.get("fit_s", 0.0))
        self.step_s_total = float(state.get("step_s_total", 0.0))
        self.n_steps = int(state.get("n_steps", 0))
        self.recent = deque(state.get("recent") or [], maxlen=self.window)
        self.notes = list(state.get("notes") or [])
        if self.baseline_step_s is not None:
            self._copy = None  # the run this continues measured it already

    # ------------------------------------------------------------------ the fit
    def capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep a copy of the model as the fit got it (before any callback's setup changed it)."""
        self.reset()
        self._copy = None
        try:
            self._copy = copy.deepcopy(pl_module, {id(trainer): None})
        except Exception as err:  # a model that cannot be deep-copied
            self.notes.append(f"the baseline training step is not measured: the model could not be copied ({type(err).__name__}: {err})")

    def fit_started(self) -> None:
        self._fit_t0 = self.timer()
        self._excluded = 0.0
        self._t0 = None

    def batch_start(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        """Time the baseline at the first batch (once), then start this step's clock."""
        if self._copy is not None and self.baseline_step_s is None:
            t0 = self.timer()
            self._measure_baseline(trainer, batch, batch_idx)
            self._excluded += self.timer() - t0
        self._copy = None
        _sync(trainer.strategy.root_device)
        self._device = trainer.strategy.root_device
        self._t0 = self.timer()

    def batch_end(self) -> None:
        if self._t0 is None:
            return
        _sync(self._device)
        dt = self.timer() - self._t0
        self._t0 = None
        self.n_steps += 1
        self.step_s_total += dt
        self.recent.append(dt)

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` (a measurement of the report's own) out of the fit's duration."""
        self._excluded += seconds

    def fit_ended(self) -> None:
        self.fit_s += self._running_fit_s()
        self._fit_t0 = None

    def _running_fit_s(self) -> float:
        if self._fit_t0 is None:
            return 0.0
        return max(0.0, self.timer() - self._fit_t0 - self._excluded)

    def _measure_baseline(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        module = cast(Any, self._copy)  # set by the copy made before setup
        device = trainer.strategy.root_device
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            module.to(device)
            optimizer, what = None, "forward + backward"
            try:
                optimizer = _first_optimizer(module.configure_optimizers())
            except Exception:  # configure_optimizers needs the Trainer (e.g. estimated_stepping_batches)
                optimizer = None
            if optimizer is None and trainer.optimizers:
                fit_opt = trainer.optimizers[0]
                try:
                    optimizer = type(fit_opt)(module.parameters(), **fit_opt.defaults)
                except Exception:
                    optimizer = None
            if optimizer is not None:
                what = f"forward + backward + {type(optimizer).__name__} step"
            else:
                self.notes.append("the baseline training step has no optimizer step (none could be built on the copy)")
            self.baseline_step_s = time_training_step(module, batch, batch_idx, optimizer, steps=self.steps, timer=self.timer, device=device)
            self.baseline_what = f"{what}, float32 eager, median of {self.steps}"
        except Exception as err:
            self.notes.append(f"the baseline training step is not measured: {type(err).__name__}: {str(err)[:200]}")
        finally:
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            self._copy = None

    # ------------------------------------------------------------------ results
    def results(self, compile_stats: dict[str, Any] | None = None, tolerance: float = 0.05) -> dict[str, Any]:
        """The ``training`` section of the report."""
        steady = statistics.median(self.recent) if self.recent else None
        base = self.baseline_step_s
        step_ratio = steady / base if steady is not None and base else None
        eager_estimate = None
        if base is not None and self.n_steps:
            eager_estimate = max(self.fit_s - self.step_s_total, 0.0) + self.n_steps * base
        fit_ratio = self.fit_s / eager_estimate if eager_estimate else None
        compile_s = None if not compile_stats else compile_stats.get("compile_time_s")
        return {
            "baseline_step_s": base,
            "baseline": self.baseline_what,
            "steady_step_s": steady,
            "steady_steps": len(self.recent),
            "step_ratio": step_ratio,
            "step_regression": bool(step_ratio is not None and step_ratio > 1.0 + tolerance),
            "fit_s": self.fit_s,
            "steps": self.n_steps,
            "fit_eager_estimate_s": eager_estimate,
            "fit_ratio": fit_ratio,
            "fit_regression": bool(fit_ratio is not None and fit_ratio > 1.0 + tolerance),
            "compile_s": compile_s,
            "compile_share": compile_s / self.fit_s if compile_s is not None and self.fit_s > 0 else None,
            "compiled_at_step": None if not compile_stats else compile_stats.get("compiled_at_step"),
            "recompiles": None if not compile_stats else compile_stats.get("recompiles"),
            "cache": None if not compile_stats else compile_stats.get("cache"),
            "notes": list(self.notes),
        }


def compile_stats(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The ``stats`` of the trainer's compiling callback (``TorchCompile``), ``None`` without one."""
    for cb in accel_callbacks(trainer):
        stats = getattr(cb, "stats", None) if "compiles" in cb.capabilities else None
        if isinstance(stats, dict):
            return stats
    return None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.2f} ms"


def _change(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{1 / ratio:.2f}x faster" if ratio <= 1 else f"{ratio:.2f}x SLOWER"


def training_rows(training: dict[str, Any]) -> list[tuple[str, str, str, str, bool]]:
    """``(quantity, before, after, change, regression)`` rows of the training cost."""
    if not training:
        return []
    rows = [
        (
            f"training step (steady state, median of last {training.get('steady_steps', 0)})",
            _ms(training.get("baseline_step_s")),
            _ms(training.get("steady_step_s")),
            _change(training.get("step_ratio")),
            bool(training.get("step_regression")),
        ),
        (
            f"whole fit ({training.get('steps', 0)} steps; before: eager float32 estimate)",
            "-" if training.get("fit_eager_estimate_s") is None else f"{training['fit_eager_estimate_s']:.1f} s",
            f"{training.get('fit_s', 0.0):.1f} s",
            _change(training.get("fit_ratio")),
            bool(training.get("fit_regression")),
        ),
    ]
    if training.get("compile_s") is not None:
        share = training.get("compile_share")
        cache = training.get("cache") or {}
        hits = f", cache {cache.get('fx_graph_hit', 0)} hit / {cache.get('fx_graph_miss', 0)} miss" if cache else ""
        rows.append(
            (
                "compile time",
                "-",
                f"{training['compile_s']:.1f} s",
                ("-" if share is None else f"{share:.0%} of the fit")
                + f", at step {training.get('compiled_at_step')}, {training.get('recompiles')} recompilation(s){hits}",
                False,
            )
        )
    return rows


def training_regressions(training: dict[str, Any]) -> list[str]:
    """The report's regression lines for a training slower than its baseline."""
    out = []
    if training.get("step_regression"):
        out.append(
            f"training step: {training['steady_step_s'] * 1e3:.2f} ms vs {training['baseline_step_s'] * 1e3:.2f} ms for the "
            f"float eager model ({training['step_ratio']:.2f}x)"
        )
    if training.get("fit_regression"):
        out.append(
            f"whole fit: {training['fit_s']:.1f} s vs {training['fit_eager_estimate_s']:.1f} s estimated for float eager "
            f"steps ({training['fit_ratio']:.2f}x)"
        )
    return out


def training_metrics(training: dict[str, Any]) -> dict[str, float]:
    """``report/train_*`` logger metrics."""
    keys = {
        "baseline_step_s": "report/train_step_baseline_s",
        "steady_step_s": "report/train_step_s",
        "step_ratio": "report/train_step_ratio",
        "fit_s": "report/train_fit_s",
        "fit_ratio": "report/train_fit_ratio",
        "compile_s": "report/train_compile_s",
    }
    return {name: float(training[k]) for k, name in keys.items() if training.get(k) is not None}


def print_training_rows(training: dict[str, Any]) -> None:
    """Print the training rows under the report's table."""
    rows = training_rows(training)
    if not rows:
        return
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for r in rows:
        flag = "  <-- REGRESSION" if r[4] else ""
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)).rstrip() + flag)
