"""When the Trainer plans and runs the compression: :class:`AutoCompress` (what it decides is in
:mod:`lightning_accel.auto.plan`, what it measures in :mod:`lightning_accel.auto.measure`)."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._inputs import first_sample, recorded_forward_inputs
from lightning_accel._lifecycle import AccelCallback, detach_pipeline_hooks
from lightning_accel._validate import (
    check_choice,
    check_int,
    check_number,
    check_patterns,
    check_stem,
    check_str,
)
from lightning_accel.auto.measure import (
    call_args,
    group_costs,
    interleaved_ms,
    latency_model,
    measuring_runtime,
    plain_copy,
    true_counts,
)
from lightning_accel.auto.plan import (
    GOAL_KEYS,
    AutoPlan,
    GroupCost,
    Targets,
    choose_amounts,
    plan_targets,
    predicted,
    speedup_of,
)
from lightning_accel.compile.callbacks import TorchCompile
from lightning_accel.deploy import FORMATS, load_exported
from lightning_accel.deploy.auto import batch_of
from lightning_accel.distillation.callbacks import KnowledgeDistillation
from lightning_accel.errors import AutoCompressWarning, CompositionError
from lightning_accel.evaluation import MonitoredMetric, validation_batches
from lightning_accel.pruning.callbacks import StructuredPruning
from lightning_accel.quantization.callbacks import Quantization
from lightning_accel.report.callbacks import AccelerationReport

__all__ = ["TECHNIQUES", "AutoCompress"]

#: what AutoCompress may use; ``compile`` is opt-in (a cold torch.compile cost 70-87% of short CPU fits, issue #23)
TECHNIQUES: tuple[str, ...] = ("distillation", "pruning", "int8", "compile")
_DEFAULT_TECHNIQUES = ("distillation", "pruning", "int8")
_STATE_VERSION = 1
_CORRECTIONS = 4  # re-plans after counting the real pruned model's MACs


class AutoCompress(AccelCallback):
    """Name the goal: AutoCompress measures the model on this machine, plans the recipe and runs it.

    ``goal: {speedup: 4.0}`` asks for a deployed file 4x faster than the uncompressed model in fp32 eager PyTorch at
    ``batch_size``; ``goal: {smaller: 10.0}`` for 10x fewer stored bytes; both may be given. ``max_metric_drop`` is how
    much of ``monitor`` the user gives for it.

    **At fit start** (on the model the fit got, which should be trained: pass its checkpoint as ``teacher`` or load it
    before ``fit``) it measures, on ``measure_batches`` validation batches and this machine: each prunable group's
    metric drop and the model's MACs and parameters when that group alone loses each of ``amounts`` of its units (the
    sensitivity core); the deployed runtime's latency at ``batch_size`` (the fp32 eager model, its float file, the
    float and int8 files of a copy with every group pruned by 70%, interleaved; a line ``fixed + per_mac * MACs``);
    whether int8 is faster than float there. It then takes int8 where it is faster (or the size goal needs it) and picks
    per-group amounts greedily: the cut that buys the most of the missing MACs / parameters per unit of predicted
    metric drop, until the predicted deployed speed-up and size reach the goal (re-counted on the really pruned model).
    The plan (per group: amount, predicted drop; int8 and why; predicted speed-up, size, drop; what limits it) is
    logged and saved as ``<filename>_plan.json``; ``plan=`` that file replays it without measuring.

    **During the fit** it runs the plan through the package's own callbacks, which it adds to the Trainer (so they
    are checkpointed and resumed like the user's): :class:`KnowledgeDistillation` from the uncompressed model,
    :class:`StructuredPruning` with the planned per-group amounts on a linear schedule over the first ``prune_until``
    of the fit, post-training int8 :class:`Quantization` at fit end with its accuracy guard, :class:`TorchCompile`
    once the structure settles (``techniques`` with ``"compile"``), and an :class:`AccelerationReport` that exports
    the deployed file (``export_format``) and times it (a report already in the Trainer is used instead). When a
    validation is more than ``max_metric_drop`` below the uncompressed model ``patience`` times in a row, it backs off:
    the most sensitive group still being cut stays where it is (the pruning's own guard also pauses the schedule until the metric recovers).

    **At fit end** it says goal vs achieved (deployed speed-up at ``batch_size`` vs fp32 eager, stored bytes, metric
    drop on the validation set), which limit stopped a missed goal, and writes ``<filename>.json`` and the recipe it
    ran as ``<filename>_recipe.yaml``: the callbacks' ``class_path`` / ``init_args``, to edit and run by hand.

    Example::

        trainer = Trainer(max_epochs=12, callbacks=[AutoCompress(goal={"speedup": 4.0}, batch_size=256)])

    Args:
        goal: ``{"speedup": x}`` and/or ``{"smaller": y}``, each ``> 1``, e.g. ``{"speedup": 4.0}``.
        batch_size: the deployed batch size the speed goal is measured at, e.g. ``256``.
        monitor: the validation metric the budget is on, e.g. ``"val_acc"``.
        monitor_mode: ``"max"`` if a higher ``monitor`` is better, ``"min"`` if lower is, e.g. ``"max"``.
        max_metric_drop: the most ``monitor`` may drop below the uncompressed model, ``>= 0``, e.g. ``0.01``.
        techniques: what it may use, from ``"distillation"``, ``"pruning"``, ``"int8"``, ``"compile"``, e.g.
            ``["pruning", "int8"]``; ``None``: all but ``"compile"``.
        exclude: glob patterns of modules whose units are kept (as for :class:`StructuredPruning`), e.g. ``["stem.*"]``.
        amounts: candidate fractions of a group's units to remove, each in ``(0, 1)``, e.g. ``[0.25, 0.5, 0.75, 0.9]``.
        max_layer_amount: no group loses more than this fraction of its units, ``0 < x < 1``, e.g. ``0.9``.
        prune_until: the pruning schedule ends after this fraction of the fit (the rest fine-tunes), ``0 < x < 1``,
            e.g. ``0.5``.
        teacher: path of the trained float model's Lightning checkpoint: the distillation teacher and the student's
            starting weights, e.g. ``"teacher.ckpt"``; ``None``: the model as the fit got it.
        plan: path of a ``<filename>_plan.json`` (or ``<filename>.json``) to run instead of measuring, e.g.
            ``"lightning_logs/version_0/autocompress_plan.json"``.
        measure_batches: validation batches the measurements use (more: steadier, slower), ``>= 1``, e.g. ``8``.
        export_format: the deployed format: ``"auto"`` (the fastest here, measured), ``"onnx"``, ``"openvino"``,
            ``"aoti"`` or ``"program"``, e.g. ``"auto"``. The plan times ONNX Runtime for ``"auto"`` when installed.
        repeats: timing rounds of the latency measurement (median), ``>= 3``, e.g. ``15``.
        margin: the plan aims this much beyond the goal, for the prediction's error (timing noise, MACs that do not
            turn into time one to one), ``>= 1``, e.g. ``1.15``.
        patience: validations in a row past the budget before it backs off (a cut's dip often recovers with the
            fine-tuning that follows; the pruning's guard pauses the schedule meanwhile), ``>= 1``, e.g. ``2``.
        output_dir: where the json and yaml go, e.g. ``"autocompress"``; ``None``: the Trainer's ``log_dir``.
        filename: stem of the files, e.g. ``"autocompress"``.

    Attributes:
        plan: the plan (:class:`~lightning_accel.auto.plan.AutoPlan`) once made, else ``None``.
        results: goal, plan, achieved and limits after the fit (what ``<filename>.json`` holds).

    Raises:
        ValueError: a bad argument (here, before any model is touched); at fit start: no validation data, no finite
            training length, a ``plan`` file that does not fit the model.
        CompositionError: at setup, a callback in the Trainer that does what AutoCompress runs itself (pruning,
            quantization, distillation, compilation): leave it out, or leave the technique out of ``techniques``.
    """

    stage: ClassVar[str] = "orchestration"
    capabilities: ClassVar[frozenset[str]] = frozenset({"measures"})

    def __init__(
        self,
        goal: dict[str, float],
        batch_size: int = 1,
        monitor: str = "val_acc",
        monitor_mode: Literal["max", "min"] = "max",
        max_metric_drop: float = 0.01,
        techniques: list[str] | None = None,
        exclude: list[str] | None = None,
        amounts: list[float] | None = None,
        max_layer_amount: float = 0.9,
        prune_until: float = 0.5,
        teacher: str | None = None,
        plan: str | None = None,
        measure_batches: int = 8,
        export_format: Literal["auto", "onnx", "openvino", "aoti", "program"] = "auto",
        repeats: int = 15,
        margin: float = 1.15,
        patience: int = 2,
        output_dir: str | None = None,
        filename: str = "autocompress",
    ) -> None:
        super().__init__()
        if not isinstance(goal, dict) or not goal or set(goal) - set(GOAL_KEYS):
            raise ValueError(
                f"`goal` must be a dict with `speedup` and/or `smaller` like {{'speedup': 4.0}}; got {goal!r}"
            )
        for k, v in goal.items():
            check_number(f"goal.{k}", v, low=1.0, low_inclusive=False)
        self.goal = {k: float(v) for k, v in goal.items()}
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.monitor = check_str("monitor", monitor, "the name of a metric logged by validation_step, like 'val_acc'")
        self.monitor_mode = check_choice("monitor_mode", monitor_mode, ("max", "min"))
        self.max_metric_drop = float(check_number("max_metric_drop", max_metric_drop, low=0.0))
        if techniques is None:
            techniques = list(_DEFAULT_TECHNIQUES)
        if isinstance(techniques, str) or not isinstance(techniques, list) or not techniques:
            raise ValueError(f"`techniques` must be a non-empty list from {list(TECHNIQUES)}; got {techniques!r}")
        for t in techniques:
            check_choice("techniques", t, TECHNIQUES)
        if not {"pruning", "int8"} & set(techniques):
            raise ValueError(f"`techniques` must include 'pruning' or 'int8' (what makes a model faster or smaller); got {techniques!r}")
        self.techniques = list(dict.fromkeys(techniques))
        self.exclude = check_patterns("exclude", exclude)
        amounts = [0.25, 0.5, 0.75, 0.9] if amounts is None else amounts
        if isinstance(amounts, str) or not isinstance(amounts, list) or not amounts:
            raise ValueError(f"`amounts` must be a non-empty list of fractions in (0, 1) like [0.5, 0.8]; got {amounts!r}")
        for a in amounts:
            check_number("amounts", a, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.amounts = sorted({float(a) for a in amounts})
        self.max_layer_amount = float(check_number("max_layer_amount", max_layer_amount, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False))
        self.prune_until = float(check_number("prune_until", prune_until, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False))
        self.teacher = check_str("teacher", teacher, "the path of a Lightning checkpoint", allow_none=True)
        self.plan_path = check_str("plan", plan, "the path of an AutoCompress plan json", allow_none=True)
        self._file_plan: AutoPlan | None = _read_plan(self.plan_path) if self.plan_path is not None else None
        self.measure_batches = check_int("measure_batches", measure_batches, low=1)
        self.export_format = check_choice("export_format", export_format, ("auto", *[f for f in FORMATS if f != "auto"]))
        self.repeats = check_int("repeats", repeats, low=3)
        self.margin = float(check_number("margin", margin, low=1.0))
        self.patience = check_int("patience", patience, low=1)
        self.output_dir = check_str("output_dir", output_dir, "a directory path", allow_none=True)
        self.filename = check_stem("filename", filename, "autocompress")
        self.timer: Any = None  # tests: a fake ``timer(label, fn, inputs) -> seconds`` for the latency measurement
        self.timer_final: Any = None  # tests: the same for the side-by-side timing of the deployed file at fit end
        self._children: dict[str, AccelCallback] | None = None
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self.plan: AutoPlan | None = None
        self.backoffs: list[dict[str, Any]] = []
        self._over = 0  # validations in a row past the budget
        self.baseline_metric: float | None = None
        self.results: dict[str, Any] = {}
        self._batches: list[Any] | None = None
        self._reference: nn.Module | None = None  # the uncompressed model (CPU copy), for the side-by-side answer
        self._example: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "backoffs": copy.deepcopy(self.backoffs),
            "baseline_metric": self.baseline_metric,
            "over": self._over,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"AutoCompress state version {state_dict.get('version')!r} is not supported (expected {_STATE_VERSION})")
        self.plan = AutoPlan.from_dict(state_dict["plan"]) if state_dict.get("plan") else None
        self.backoffs = list(state_dict.get("backoffs") or [])
        self.baseline_metric = state_dict.get("baseline_metric")
        self._over = int(state_dict.get("over") or 0)

    # ------------------------------------------------------------------ the callbacks it runs
    @property
    def children(self) -> dict[str, AccelCallback]:
        """The callbacks it runs, by role (``distillation``, ``pruning``, ``int8``, ``compile``, ``report``)."""
        return dict(self._children or {})

    def accel_children(self, trainer: pl.Trainer) -> list[AccelCallback]:
        users = [c for c in trainer.callbacks if isinstance(c, AccelCallback) and c is not self]  # type: ignore[attr-defined]
        if self._children is None:
            self._children = self._build_children(trainer, users)
        mine = list(self._children.values())
        runs = {
            "distillation": KnowledgeDistillation, "pruning": StructuredPruning, "int8": Quantization, "compile": TorchCompile,
        }
        for cb in users:
            if any(cb is c for c in mine):
                continue
            for role, cls in runs.items():
                clash = role in self._children and (
                    isinstance(cb, cls) or bool(set(cb.capabilities) & set(self._children[role].capabilities) - {"measures"})
                )
                if clash:
                    raise CompositionError(
                        f"AutoCompress cannot be combined with {type(cb).__name__}: AutoCompress runs its own "
                        f"{cls.__name__} ({role!r} in `techniques`); remove {type(cb).__name__} from the Trainer or "
                        f"leave {role!r} out of AutoCompress's `techniques`"
                    )
        return mine

    def _build_children(self, trainer: pl.Trainer, users: list[AccelCallback]) -> dict[str, AccelCallback]:
        out: dict[str, AccelCallback] = {}
        if "distillation" in self.techniques:
            out["distillation"] = KnowledgeDistillation(teacher=self.teacher, init_student_from_teacher=self.teacher is not None, verbose=0)
        if "pruning" in self.techniques:
            by_epoch = (trainer.max_epochs or 0) >= 3 and (trainer.max_steps is None or trainer.max_steps < 0)
            out["pruning"] = StructuredPruning(
                amount=0.5,  # placeholder: the plan sets the targets at fit start, before the first event
                schedule="linear",
                interval="epoch" if by_epoch else "step",
                start=0,
                exclude=self.exclude,
                max_layer_amount=self.max_layer_amount,
                monitor=self.monitor,
                monitor_mode=self.monitor_mode,
                max_metric_drop=self.max_metric_drop,
                verbose=0,
            )
        if "int8" in self.techniques:
            out["int8"] = Quantization(
                mode="int8",
                when="fit_end",
                monitor=self.monitor,
                monitor_mode=self.monitor_mode,
                max_metric_drop=self.max_metric_drop,
                save_checkpoint=True,
                embeddings="smaller" in self.goal,
            )
        if "compile" in self.techniques:
            out["compile"] = TorchCompile(when="settled")
        report = next((c for c in users if isinstance(c, AccelerationReport)), None)
        if report is not None and not report.export:
            raise CompositionError(
                "AutoCompress judges the speed goal on the deployed file, which the AccelerationReport in the Trainer does "
                "not export: give it `export=True`, or remove it (AutoCompress then adds its own)"
            )
        if report is None:
            out["report"] = AccelerationReport(
                batch_size=self.batch_size,
                batch_sizes=[self.batch_size],
                repeats=max(self.repeats, 5),
                export=True,
                export_format=self.export_format,
                monitor=self.monitor,
                monitor_mode=self.monitor_mode,
                output_dir=self.output_dir,
                figure=False,
            )
        return out

    def _report(self, trainer: pl.Trainer) -> AccelerationReport | None:
        return next((c for c in trainer.callbacks if isinstance(c, AccelerationReport)), None)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ lifecycle
    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.global_step == 0:
            self._reset()  # a fresh fit; a resumed one loads the checkpoint's plan after this

    def accel_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        made = False
        if self.plan is None:
            memo = {id(trainer): None}
            self._reference = plain_copy(pl_module, memo)  # the uncompressed model: what the speed-up is against
            detach_pipeline_hooks(self._reference)
            if self._file_plan is not None:
                self.plan = copy.deepcopy(self._file_plan)
                self._inputs(trainer, pl_module)  # the example the deployed file is timed on at fit end
                rank_zero_info(f"AutoCompress: running the plan of {self.plan_path} (not measured again)")
                if self.plan.goal != self.goal or self.plan.batch_size != self.batch_size:
                    rank_zero_warn(
                        f"AutoCompress: the plan of {self.plan_path} was made for goal {self.plan.goal} at batch "
                        f"{self.plan.batch_size}, not {self.goal} at batch {self.batch_size}; it runs as it was made",
                        category=AutoCompressWarning,
                    )
            else:
                self.plan = self._measure_and_plan(trainer, pl_module)
                made = True
            if self.baseline_metric is None:
                self.baseline_metric = self._metric_now(trainer, pl_module)
        self._apply(trainer, self.plan)
        if made:
            self.plan.measured_seconds = float(trainer.strategy.broadcast(time.perf_counter() - started, src=0))
            self._write(trainer, f"{self.filename}_plan.json", self.plan.to_dict())
        rank_zero_info(_plan_table(self.plan))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Back off when the metric is more than ``max_metric_drop`` below the uncompressed model's."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self.plan is None:
            return
        pruning = self.children.get("pruning")
        if not isinstance(pruning, StructuredPruning) or self.baseline_metric is None:
            return
        logged = trainer.callback_metrics.get(self.monitor)
        if logged is None:
            return
        value = float(trainer.strategy.broadcast(float(logged), src=0))
        drop = self.baseline_metric - value if self.monitor_mode == "max" else value - self.baseline_metric
        self._over = self._over + 1 if drop > self.max_metric_drop + 1e-12 else 0
        if self._over < self.patience or pruning.amount <= 0 or pruning.amount_pruned >= pruning.amount - 1e-9:
            return
        self._over = 0  # the next back-off waits `patience` validations again
        targets = pruning.layer_targets(pruning.amount_pruned) or {}
        planned = {k: a for k, a in (self.plan.amounts or {}).items() if a > 0}
        held = {b["group"] for b in self.backoffs}
        moving = [k for k, a in planned.items() if k not in held and targets.get(k, 0.0) < a - 1e-9]
        if not moving:
            return
        groups = self.plan.groups
        worst = max(moving, key=lambda k: float(groups.get(k, {}).get("drop", 0.0)))  # the most sensitive at its plan
        now = float(targets.get(worst, 0.0))
        layer_amounts = dict(pruning.layer_targets(pruning.amount) or {})
        layer_amounts[worst] = now
        pruning.set_targets(pruning.amount, layer_amounts)
        entry = {"step": int(trainer.global_step), "group": worst, "planned": planned[worst], "held_at": now,
                 "metric": value, "drop": drop}
        self.backoffs.append(entry)
        rank_zero_info(
            f"AutoCompress: {self.monitor}={value:.4f} is {drop:.4f} below the uncompressed model (budget "
            f"{self.max_metric_drop}); backing off: group {worst!r} stays at {now:.0%} (planned {planned[worst]:.0%})"
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the post-training int8 (at fit end, next) what is left of the budget: its guard compares with the
        metric before int8, the budget is against the uncompressed model."""
        quant = self.children.get("int8")
        logged = trainer.callback_metrics.get(self.monitor)
        if not isinstance(quant, Quantization) or quant.skipped or logged is None or self.baseline_metric is None:
            return
        value = float(trainer.strategy.broadcast(float(logged), src=0))
        spent = self.baseline_metric - value if self.monitor_mode == "max" else value - self.baseline_metric
        quant.max_metric_drop = max(self.max_metric_drop - max(spent, 0.0), 0.0)
        rank_zero_info(
            f"AutoCompress: {self.monitor} {value:.4f} after training ({spent:+.4f} from the uncompressed model); int8 may "
            f"cost up to {quant.max_metric_drop:.4f} more"
        )

    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plan is None:
            return
        final_metric = self._metric_now(trainer, pl_module)
        self.results = self._summarize(trainer, final_metric, self._side_by_side(trainer))
        self._write(trainer, f"{self.filename}.json", self.results)
        self._write(trainer, f"{self.filename}_recipe.yaml", self.results["recipe"])
        rank_zero_info(_summary_text(self.results))

    def accel_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._batches = None
        if stage == "fit":
            self._reference = None

    def _side_by_side(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        """The deployed file (the report's export) against the uncompressed model in fp32 eager, timed in turn at
        ``batch_size`` (rank zero); ``None`` without both (a resumed run has no copy of the uncompressed model)."""
        report = self._report(trainer)
        path = (((report.results if report is not None else {}).get("final") or {}).get("exported") or {}).get("path")
        if self._reference is None or self._example is None or not path or not trainer.is_global_zero:
            return None
        try:
            deployed = load_exported(path, num_threads=torch.get_num_threads())
            med, spread = interleaved_ms(
                {"eager": self._reference, "deployed": deployed},
                example_batch=call_args(batch_of(self._example, self.batch_size)),
                repeats=max(self.repeats, 5), warmup=3, timer=self.timer_final,
            )
        except Exception as err:  # the report's figure stands
            rank_zero_warn(f"AutoCompress: the deployed file could not be timed side by side ({type(err).__name__}: {err})",
                           category=AutoCompressWarning)
            return None
        return {"eager_ms": med["eager"], "deployed_ms": med["deployed"], "speedup": med["eager"] / med["deployed"],
                "spread_ms": spread, "path": path}

    def report_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """The plan's row in :class:`AccelerationReport`: goal, predicted speed-up / size / drop, int8, back-offs."""
        if self.plan is None:
            return None
        return {
            "technique": "AutoCompress",
            "goal": self.goal,
            "predicted": self.plan.predicted,
            "int8": self.plan.int8,
            "limits": self.plan.limits,
            "backoffs": len(self.backoffs),
        }

    # ------------------------------------------------------------------ measuring and planning
    def _held_out(self, trainer: pl.Trainer, pl_module: pl.LightningModule, every: bool = False) -> list[Any]:
        """The fit's validation batches (within ``limit_val_batches``): the first ``measure_batches`` for the
        measurements, ``every`` one for the metric the budget is judged on (the value a validation logs)."""
        if self._batches is None:
            self._batches = validation_batches(trainer, pl_module, "AutoCompress")
            if not self._batches:
                raise ValueError("AutoCompress needs validation batches to measure on; the validation dataloader gave none")
        return self._batches if every else self._batches[: self.measure_batches]

    def _metric_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """``monitor`` on every validation batch, with the module's own ``validation_step`` (what a validation logs,
        so the back-off compares like with like)."""
        evaluate = MonitoredMetric(trainer, pl_module, self.monitor, "AutoCompress")
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                value = float(evaluate(pl_module, self._held_out(trainer, pl_module, every=True)))
        finally:
            evaluate.reset_metrics()
            pl_module.train(was_training)
        return float(trainer.strategy.broadcast(value, src=0))

    def _inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """The forward inputs of up to 4 held-out batches, as ``validation_step`` calls the model (any batch form);
        the first sample of the first is kept as the example."""
        batches = self._held_out(trainer, pl_module)
        evaluate = MonitoredMetric(trainer, pl_module, self.monitor, "AutoCompress")
        with recorded_forward_inputs(pl_module) as inputs, torch.no_grad():
            evaluate(pl_module, batches[:4])
        evaluate.reset_metrics()
        if not inputs:
            raise ValueError(f"AutoCompress: {type(pl_module).__name__}'s validation_step never called its forward")
        self._example = first_sample(inputs[0])
        return inputs

    def _measure_and_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> AutoPlan:
        batches = self._held_out(trainer, pl_module)
        evaluate = MonitoredMetric(trainer, pl_module, self.monitor, "AutoCompress")
        inputs = self._inputs(trainer, pl_module)
        example = first_sample(inputs[0])
        memo = {id(trainer): None}
        groups: dict[str, GroupCost] = {}
        if "pruning" in self.techniques:  # the sensitivity pass counts the unpruned model's MACs too
            groups, sens = group_costs(
                pl_module, batches, evaluate, example, self.amounts, self.exclude, self.monitor_mode, self.monitor
            )
            evaluate.reset_metrics()
            base_macs, base_params = int(sens["base_macs"]), int(sens["base_params"])
        else:
            base_macs, base_params = true_counts(pl_module, example, {}, self.exclude, self.max_layer_amount, memo)
        runtime = measuring_runtime(self.export_format if self.export_format != "program" else "eager")
        uniform = min(0.7, self.max_layer_amount) if groups else 0.0
        latency = latency_model(
            pl_module, example, self.batch_size, runtime=runtime, uniform=uniform, exclude=self.exclude,
            max_amount=self.max_layer_amount, calibration=inputs[:4], int8="int8" in self.techniques,
            repeats=self.repeats, timer=self.timer, copy_memo=memo,
        )
        fraction = _quantizable_fraction(pl_module, embeddings="smaller" in self.goal)
        aim = {k: v * self.margin for k, v in self.goal.items()}
        targets = plan_targets(aim, latency, base_params, fraction, "int8" in self.techniques)
        amounts, limits, macs, params = self._fit_amounts(pl_module, example, groups, base_macs, base_params, targets, memo)
        _, _, drop = predicted(groups, amounts, base_macs, base_params)
        float_bytes = 4.0 * base_params
        per_param = 4.0 * ((1 - fraction) + fraction * 1.05 / 4.0) if targets.int8 else 4.0
        plan = AutoPlan(
            goal=dict(self.goal),
            batch_size=self.batch_size,
            amounts={k: float(a) for k, a in amounts.items()},
            int8=bool(targets.int8),
            why_int8=targets.why_int8,
            predicted={
                "speedup": speedup_of(latency, macs, targets.int8),
                "smaller": float_bytes / max(per_param * params, 1.0),
                "one_shot_drop": drop,
                "macs": int(macs),
                "params": int(params),
                "base_macs": int(base_macs),
                "base_params": int(base_params),
            },
            groups={
                k: {
                    "kind": g.kind, "units": g.units, "amount": float(amounts.get(k, 0.0)),
                    "drop": float(g.drop.get(f"{amounts.get(k, 0.0):g}", 0.0)) if amounts.get(k, 0.0) > 0 else 0.0,
                    "macs_saved": int(base_macs - g.macs[f"{amounts[k]:g}"]) if amounts.get(k, 0.0) > 0 else 0,
                }
                for k, g in groups.items()
            },
            latency={
                "runtime": latency.runtime, "batch_size": latency.batch_size, "eager_ms": latency.eager_ms,
                "float_ms": latency.float_ms, "fixed_ms": latency.fixed_ms, "ms_per_mmac": latency.ms_per_mmac,
                "int8_ratio": latency.int8_ratio, "points": latency.points,
            },
            limits=[*targets.limits, *limits],
        )
        data = trainer.strategy.broadcast(plan.to_dict(), src=0)  # every rank runs rank zero's plan
        return AutoPlan.from_dict(data)

    def _fit_amounts(
        self, model: nn.Module, example: Any, groups: dict[str, GroupCost], base_macs: int, base_params: int,
        targets: Targets, memo: dict[int, Any],
    ) -> tuple[dict[str, float], list[str], float, float]:
        """Greedy amounts, re-planned while the really pruned model misses the targets the sum of single-group
        savings predicted (neighbouring groups shrink the same layers)."""
        want = copy.copy(targets)
        amounts: dict[str, float] = {k: 0.0 for k in groups}
        limits: list[str] = []
        macs, params = float(base_macs), float(base_params)
        for _ in range(_CORRECTIONS):
            amounts, limits = choose_amounts(groups, base_macs, base_params, want, self.max_layer_amount)
            macs, params = (float(v) for v in true_counts(model, example, amounts, self.exclude, self.max_layer_amount, memo))
            miss_m = targets.macs is not None and macs > targets.macs * 1.01
            miss_p = targets.params is not None and params > targets.params * 1.01
            if not (miss_m or miss_p) or limits:
                break
            if miss_m and want.macs is not None and targets.macs is not None:
                want.macs = max(want.macs - (macs - targets.macs), 0.0)
            if miss_p and want.params is not None and targets.params is not None:
                want.params = max(want.params - (params - targets.params), 0.0)
        return amounts, limits, macs, params

    def _apply(self, trainer: pl.Trainer, plan: AutoPlan) -> None:
        """Configure the callbacks it runs from ``plan`` (before the first pruning event)."""
        pruning = self.children.get("pruning")
        if isinstance(pruning, StructuredPruning):
            held = {b["group"]: b["held_at"] for b in self.backoffs}
            planned = {k: float(held.get(k, a)) for k, a in plan.amounts.items()}
            if any(a > 0 for a in planned.values()):
                if pruning.amount_pruned <= 0.0 and not pruning.history:  # a resumed run keeps its checkpointed targets
                    pruning.set_targets(max(planned.values()), planned)
            else:
                pruning.set_targets(0.0, None)
            pruning.set_schedule(**self._schedule(trainer, pruning))
            pruning.verbose = 1
        quant = self.children.get("int8")
        if isinstance(quant, Quantization) and not plan.int8:
            quant.skip(f"AutoCompress: {plan.why_int8}")

    def _schedule(self, trainer: pl.Trainer, pruning: StructuredPruning) -> dict[str, Any]:
        if pruning.interval == "epoch":
            epochs = int(trainer.max_epochs or 1)
            return {"end": max(1, min(epochs - 1, math.ceil(self.prune_until * epochs))), "frequency": 1}
        total = trainer.estimated_stepping_batches
        if total is None or total == float("inf") or total < 1:
            raise ValueError("AutoCompress needs a finite training length (max_epochs or max_steps) to fit its pruning schedule")
        end = max(1, int(self.prune_until * int(total)))
        return {"end": end, "frequency": max(1, end // 10)}

    # ------------------------------------------------------------------ the answer
    def _summarize(self, trainer: pl.Trainer, final_metric: float, timed: dict[str, Any] | None) -> dict[str, Any]:
        assert self.plan is not None
        report = self._report(trainer)
        res = report.results if report is not None else {}
        b = str(self.batch_size)
        achieved: dict[str, Any] = {}
        vs_eager = ((res.get("latency") or {}).get("exported_vs_eager") or {}).get(b) or {}
        if timed is not None:  # side by side, at fit end: the figure the goal is judged on
            achieved.update(speedup=timed["speedup"], deployed_ms=timed["deployed_ms"], eager_ms=timed["eager_ms"],
                            spread_ms=timed["spread_ms"], timed="side by side at fit end")
            if vs_eager.get("speedup") is not None:
                achieved["report_speedup"] = float(vs_eager["speedup"])  # eager at fit start vs the file at fit end
        elif vs_eager.get("speedup") is not None:
            achieved["speedup"] = float(vs_eager["speedup"])
            achieved["deployed_ms"] = vs_eager.get("deployed_ms")
            achieved["eager_ms"] = vs_eager.get("eager_ms")
            achieved["timed"] = "the report's: eager at fit start, the file at fit end"
        base_bytes = (res.get("baseline") or {}).get("stored_bytes")
        final_bytes = (res.get("final") or {}).get("stored_bytes")
        if base_bytes and final_bytes:
            achieved["smaller"] = float(base_bytes) / float(final_bytes)
        files = res.get("exported_bytes") or {}
        if files.get("baseline") and files.get("final"):
            achieved["file_smaller"] = float(files["baseline"]) / float(files["final"])
        exported = (res.get("final") or {}).get("exported") or {}
        achieved["format"] = exported.get("format")
        base = self.baseline_metric
        drop = None
        if base is not None:
            drop = base - final_metric if self.monitor_mode == "max" else final_metric - base
        achieved.update({"metric_before": base, "metric_after": final_metric, "metric_drop": drop})
        met = {k: achieved.get(k) is not None and achieved[k] >= v for k, v in self.goal.items()}
        within = drop is not None and drop <= self.max_metric_drop + 1e-12
        stopped = list(self.plan.limits)
        pruning = self.children.get("pruning")
        if isinstance(pruning, StructuredPruning):
            g = pruning.guard
            if g.get("events_skipped") or g.get("paused"):
                stopped.append(f"accuracy budget: the pruning guard held {g.get('events_skipped', 0)} events")
            if pruning.amount > 0 and pruning.amount_pruned + 1e-9 < pruning.amount:
                stopped.append(f"epochs: the pruning schedule reached {pruning.amount_pruned:.0%} of its {pruning.amount:.0%} target")
        if self.backoffs:
            stopped.append(f"accuracy budget: backed off {len(self.backoffs)} group(s) ({', '.join(b['group'] for b in self.backoffs)})")
        quant = self.children.get("int8")
        if isinstance(quant, Quantization) and quant.record.get("reverted"):
            stopped.append("accuracy budget: int8 cost more than `max_metric_drop`, the model stays float")
        if isinstance(quant, Quantization) and quant.skipped:
            stopped.append(f"int8 not used: {self.plan.why_int8}")
        return {
            "goal": dict(self.goal),
            "batch_size": self.batch_size,
            "monitor": self.monitor,
            "max_metric_drop": self.max_metric_drop,
            "achieved": achieved,
            "met": {**met, "metric": within},
            "limits": stopped if not all(met.values()) or not within else [],
            "plan": self.plan.to_dict(),
            "backoffs": copy.deepcopy(self.backoffs),
            "recipe": self.recipe(),
        }

    def recipe(self) -> dict[str, Any]:
        """The callbacks it ran, as LightningCLI ``trainer.callbacks`` entries (``class_path`` / ``init_args``)."""
        out = []
        for role, cb in self.children.items():
            args: dict[str, Any]
            if role == "distillation":
                args = {"teacher": self.teacher, "init_student_from_teacher": self.teacher is not None}
            elif role == "pruning" and isinstance(cb, StructuredPruning):
                args = {
                    "amount": cb.amount, "layer_amounts": cb.layer_targets(cb.amount), "schedule": cb.schedule,
                    "interval": cb.interval, "start": cb.start, "end": cb.end, "frequency": cb.frequency,
                    "exclude": cb.exclude, "max_layer_amount": cb.max_layer_amount, "monitor": self.monitor,
                    "monitor_mode": self.monitor_mode, "max_metric_drop": self.max_metric_drop,
                }
                if cb.amount <= 0:
                    continue
            elif role == "int8" and isinstance(cb, Quantization):
                if cb.skipped:
                    continue
                args = {"mode": "int8", "when": "fit_end", "monitor": self.monitor, "monitor_mode": self.monitor_mode,
                        "max_metric_drop": self.max_metric_drop, "embeddings": cb.embeddings}
            elif role == "compile":
                args = {"when": "settled"}
            else:
                args = {"batch_sizes": [self.batch_size], "export": True, "export_format": self.export_format,
                        "monitor": self.monitor, "monitor_mode": self.monitor_mode}
            out.append({"class_path": f"lightning_accel.{type(cb).__name__}", "init_args": args})
        return {"trainer": {"callbacks": out}}

    def _write(self, trainer: pl.Trainer, name: str, data: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        out_dir = Path(self.output_dir) if self.output_dir is not None else Path(trainer.log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / name
        if name.endswith(".yaml"):
            import yaml

            path.write_text(
                "# The recipe AutoCompress ran (lightning_accel.AutoCompress): edit it and run it by hand with\n"
                "#   python your_cli.py fit --config this_file.yaml (merged with your model/data config)\n"
                + yaml.safe_dump(data, sort_keys=False)
            )
        else:
            path.write_text(json.dumps(data, indent=2, default=str))


# ---------------------------------------------------------------------- helpers
def _read_plan(path: str) -> AutoPlan:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"`plan`={path!r} is not a readable AutoCompress plan json ({type(err).__name__}: {err})") from None
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]  # the fit-end <filename>.json holds the plan too
    try:
        return AutoPlan.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`plan`={path!r}: {err}") from None


def _quantizable_fraction(model: nn.Module, embeddings: bool) -> float:
    """Share of the parameters int8 stores in a byte: Linear/Conv weights (and embedding tables with ``embeddings``)."""
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + ((nn.Embedding,) if embeddings else ())
    total = sum(p.numel() for p in model.parameters())
    q = 0
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, kinds) and isinstance(weight, torch.Tensor):
            q += weight.numel()
    return q / max(total, 1)


def _plan_table(plan: AutoPlan) -> str:
    p = plan.predicted
    lines = [
        f"AutoCompress plan for goal {plan.goal} at batch {plan.batch_size}: predicted speed-up {p['speedup']:.2f}x "
        f"({plan.latency['runtime']} vs fp32 eager), {p['smaller']:.2f}x smaller, one-shot drop before recovery "
        f"{p['one_shot_drop']:.4f}; int8: {'yes' if plan.int8 else 'no'} ({plan.why_int8})",
        f"  latency at batch {plan.batch_size}: eager {plan.latency['eager_ms']:.3g} ms, float file "
        f"{plan.latency['float_ms']:.3g} ms, fixed {plan.latency['fixed_ms']:.3g} ms + {plan.latency['ms_per_mmac']:.3g} ms/MMAC"
        + (f", int8/float {plan.latency['int8_ratio']:.2f}" if plan.latency.get("int8_ratio") else ""),
    ]
    for key, g in plan.groups.items():
        if g["amount"] > 0:
            lines.append(f"  {key:<40} {g['kind']:<10} {g['amount']:>5.0%} of {g['units']} units, drop {g['drop']:+.4f}")
    kept = sum(1 for g in plan.groups.values() if g["amount"] <= 0)
    if kept:
        lines.append(f"  {kept} group(s) kept whole")
    for limit in plan.limits:
        lines.append(f"  limit: {limit}")
    return "\n".join(lines)


def _summary_text(results: dict[str, Any]) -> str:
    a = results["achieved"]
    parts = []
    for k, v in results["goal"].items():
        got = a.get(k)
        parts.append(f"{k} {v:g}x -> {got:.2f}x {'MET' if results['met'].get(k) else 'MISSED'}" if got is not None else f"{k} {v:g}x -> not measured")
    drop = a.get("metric_drop")
    parts.append(
        f"{results['monitor']} drop {drop:+.4f} (budget {results['max_metric_drop']}) {'within' if results['met'].get('metric') else 'OVER'}"
        if drop is not None else f"{results['monitor']} drop not measured"
    )
    text = f"AutoCompress: {'; '.join(parts)} (deployed as {a.get('format')})"
    for limit in results["limits"]:
        text += f"\n  limit: {limit}"
    return text

