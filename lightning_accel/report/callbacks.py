"""When the Trainer measures: :class:`AccelerationReport`, the float baseline at fit start against what the fit
delivers at fit end (after every other callback's last change), measured by :mod:`~lightning_accel.report.measure`
and rendered by :mod:`~lightning_accel.report.render`."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn

from lightning_accel._lifecycle import AccelCallback, accel_callbacks, same_output_files
from lightning_accel._validate import (
    check_bool,
    check_choice,
    check_int,
    check_logged,
    check_number,
    check_stem,
    check_str,
)
from lightning_accel.deploy import load_exported
from lightning_accel.report.measure import (
    ThroughputMeter,
    _map_tensors,
    batch_inputs,
    count_params,
    exported_latency,
    measure_model,
    peak_memory,
    reset_peak_memory,
    side_by_side_latency,
)
from lightning_accel.report.render import (
    ReportWarning,
    flat_metrics,
    is_worse,
    render_table,
    write_figure,
    write_json,
)
from lightning_accel.report.training import (
    TrainingCost,
    compile_stats,
    print_training_rows,
    training_metrics,
    training_regressions,
)

__all__ = ["AccelerationReport"]

_VERSION = 1


class AccelerationReport(AccelCallback):
    """Measure what the compression and acceleration callbacks delivered: the float model before any of them changed
    it (the *baseline*) against the model at fit end, after every other callback's last step (post-training
    quantization included).

    Measured: parameters, non-zero parameters, stored weight bytes (quantized layers at their packed size), MACs per
    sample, inference latency at each of ``batch_sizes`` (median of ``repeats`` calls after ``warmup``, on the
    Trainer's device; with ``export`` also of the file :func:`lightning_accel.export` writes, loaded back with
    ``load_exported``, each against the baseline measured the same way in the same run), training throughput
    (samples/s, the first ``throughput_skip`` steps of each fit left out), peak memory (CUDA allocator peak, else the
    process's peak RSS) and the ``monitor`` metric, before and after fit-end changes (every ``val*`` metric of every
    validation is kept in ``results["metric"]["history"]``, so a post-quantization validation no longer hides the one
    before it).

    At fit end: a table in the console (a latency regression in red), ``report/*`` metrics to the Trainer's loggers,
    and ``<filename>.json`` plus ``<filename>.png`` in ``output_dir`` (rank zero only). The results are
    :attr:`results`; the baseline, the metric history, the sparsity trace and the throughput totals are in
    ``state_dict()``, so a run resumed with ``ckpt_path=`` keeps the baseline of the run it continues.

    The example input is ``example_input_array`` if the LightningModule sets one, else the first real forward call
    (recorded by a temporary forward pre-hook, removed after that call), resized to each batch size by cutting or
    tiling its samples. Without ``example_input_array`` the baseline's MACs and latency are measured on a CPU copy of
    the float model taken at setup, as soon as that first call is seen, and the copy is then dropped.

    Args:
        batch_size: batch size of the latency measurement, e.g. ``1``.
        batch_sizes: several batch sizes instead of ``batch_size``, e.g. ``[1, 64]``.
        repeats: timed calls per latency figure (the median is reported), e.g. ``20``.
        warmup: untimed calls before them, e.g. ``5``.
        latency: measure inference latency, e.g. ``True``; ``False``: sizes, MACs, throughput and metrics only.
        export: also measure the latency (and file size) of the exported model, e.g. ``False``.
        export_compile: ``compile=`` passed to ``lightning_accel.export`` (AOTInductor package when true),
            e.g. ``True``; the former switch, ``export_format`` replaces it.
        export_format: the runtime the report exports to and times: ``"aoti"``, ``"program"``, ``"onnx"``,
            ``"openvino"`` or ``"auto"`` (each available runtime timed, the fastest kept), e.g. ``"auto"``;
            ``None``: ``"aoti"`` (``"program"`` with ``export_compile=False``). The exported files stay in
            ``<output_dir>/exported/`` (``baseline.*``, ``final.*``).
        monitor: validation metric reported before and after fit-end changes, ``None`` for none, e.g. ``"val_acc"``.
        monitor_mode: ``"max"`` if higher is better, ``"min"`` if lower is, e.g. ``"max"``.
        throughput_skip: training steps of each fit left out of the throughput (compilation warm-up), e.g. ``3``.
        sparsity_every_n_steps: record parameters and zeros every this many steps (and at each epoch end), e.g. ``25``.
        regression_tolerance: a latency more than this fraction above its baseline is a regression, e.g. ``0.05``
            (``0.0``: any slowdown).
        output_dir: directory of the json and png files, e.g. ``"reports"``; ``None``: the Trainer's ``log_dir``.
        filename: stem of the files, e.g. ``"report"`` (``report.json``, ``report.png``).
        figure: draw the png (needs matplotlib, the ``examples`` extra), e.g. ``True``.
        console: print the table at fit end, e.g. ``True``.

    Raises:
        ValueError: a bad argument (named, with the bad value and what is allowed); at the sanity check (else at
            the first validation's end), a ``monitor`` that the LightningModule does not log.

    Attributes:
        timer: the clock of every timing (``time.perf_counter``); not an init argument (tests set a fake one).
    """

    stage: ClassVar[str] = "measurement"
    capabilities: ClassVar[frozenset[str]] = frozenset({"measures"})

    def __init__(
        self,
        batch_size: int = 1,
        batch_sizes: list[int] | None = None,
        repeats: int = 20,
        warmup: int = 5,
        latency: bool = True,
        export: bool = False,
        export_compile: bool = True,
        export_format: Literal["aoti", "program", "onnx", "openvino", "auto"] | None = None,
        monitor: str | None = "val_acc",
        monitor_mode: Literal["max", "min"] = "max",
        throughput_skip: int = 3,
        sparsity_every_n_steps: int = 25,
        regression_tolerance: float = 0.05,
        output_dir: str | None = None,
        filename: str = "report",
        figure: bool = True,
        console: bool = True,
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, low=1)
        if batch_sizes is not None:
            if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, (list, tuple)) or not batch_sizes:
                raise ValueError(f"`batch_sizes` must be None or a non-empty list of integers >= 1 like [1, 64]; got {batch_sizes!r}")
            for b in batch_sizes:
                check_int("batch_sizes", b, low=1)
            batch_sizes = list(dict.fromkeys(batch_sizes))
        self.batch_sizes: list[int] = batch_sizes if batch_sizes is not None else [self.batch_size]
        self.repeats = check_int("repeats", repeats, low=1)
        self.warmup = check_int("warmup", warmup, low=0)
        self.latency = check_bool("latency", latency)
        self.export = check_bool("export", export)
        self.export_compile = check_bool("export_compile", export_compile)
        if export_format is not None:
            check_choice("export_format", export_format, ("aoti", "program", "onnx", "openvino", "auto"))
            if not export_compile and export_format != "program":
                raise ValueError(f"`export_compile`=False is the former name of export_format='program'; got export_format={export_format!r}")
        self.export_format: str = export_format or ("aoti" if export_compile else "program")
        if export and not latency:
            raise ValueError("`export`=True measures the exported model's latency and needs `latency`=True; got latency=False")
        self.monitor = check_str("monitor", monitor, "a logged metric name like 'val_acc'", allow_none=True)
        self.monitor_mode = check_choice("monitor_mode", monitor_mode, ("max", "min"))
        self.throughput_skip = check_int("throughput_skip", throughput_skip, low=0)
        self.sparsity_every_n_steps = check_int("sparsity_every_n_steps", sparsity_every_n_steps, low=1)
        self.regression_tolerance = check_number("regression_tolerance", regression_tolerance, low=0.0)
        self.output_dir = check_str("output_dir", output_dir, "a directory path", allow_none=True)
        self.filename = check_stem("filename", filename, "report")
        self.figure = check_bool("figure", figure)
        self.console = check_bool("console", console)
        self.timer: Callable[[], float] = time.perf_counter
        self._reset_state()
        self._results: dict[str, Any] | None = None
        self.json_path: Path | None = None
        self.figure_path: Path | None = None
        # transient, never checkpointed
        self._fitting = False
        self._example: Any = None
        self._pending: nn.Module | None = None  # float copy waiting for an example input (baseline MACs, latency)
        self._hook: Any = None
        self._export_how: tuple[AccelCallback | None, str] | None = None
        self._tmp: str | None = None  # this fit's exported files (baseline, final), kept in the run folder
        self._files: dict[str, str | None] = {}
        self._meter = ThroughputMeter(self.throughput_skip, self.timer)
        self._training = TrainingCost(lambda: self.timer())  # the training cost rows (report/training.py)

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self._baseline: dict[str, Any] | None = None
        self._history: list[dict[str, Any]] = []
        self._sparsity: list[dict[str, Any]] = []
        self._notes: list[str] = []
        self._throughput: dict[str, Any] = {"samples": 0, "seconds": 0.0, "steps": 0}

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "baseline": copy.deepcopy(self._baseline),
            "history": copy.deepcopy(self._history),
            "sparsity": copy.deepcopy(self._sparsity),
            "notes": list(self._notes),
            "throughput": self._meter.state_dict(),
            "training": self._training.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._baseline = copy.deepcopy(state_dict.get("baseline"))
        self._history = copy.deepcopy(state_dict.get("history") or [])
        self._sparsity = copy.deepcopy(state_dict.get("sparsity") or [])
        self._notes = list(state_dict.get("notes") or [])
        self._meter.load_state_dict(state_dict.get("throughput") or {})
        self._training.load_state_dict(state_dict.get("training") or {})
        if self._baseline is not None and self._baseline.get("complete"):
            self._pending = None  # the checkpoint's baseline is the one of the run this continues

    @property
    def results(self) -> dict[str, Any]:
        """The last report (what ``report.json`` holds); empty before the first fit ends."""
        return copy.deepcopy(self._results) if self._results is not None else {}

    @property
    def baseline(self) -> dict[str, Any] | None:
        """The float model's measurements taken before any other callback changed it."""
        return copy.deepcopy(self._baseline)

    def conflicts_with(self, other: AccelCallback) -> str | None:
        return same_output_files(self, other)

    # ------------------------------------------------------------------ lifecycle
    def accel_before_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Measure the float baseline, before any accel callback's ``accel_setup`` changed the model."""
        if stage != "fit" or self._fitting:
            return
        self._fitting = True
        self._reset_state()
        self._results = None
        self._meter = ThroughputMeter(self.throughput_skip, self.timer, trainer.strategy.root_device)
        self._export_how = self._exporter(trainer)
        self._training.capture(trainer, pl_module)
        example = getattr(pl_module, "example_input_array", None)
        self._example = _keep(example, max(self.batch_sizes)) if example is not None else None
        if self._example is None:
            self._hook = pl_module.register_forward_pre_hook(self._record_first_call, with_kwargs=True)
        self._baseline = self._measure(trainer, pl_module, role="baseline", inputs=False)
        if self._example is not None:
            self._complete_baseline(trainer, pl_module)
        else:
            try:
                self._pending = _copy_module(pl_module, trainer)
            except Exception as err:  # a model that cannot be deep-copied
                self._note(f"the baseline's MACs and latency are not measured: the model could not be copied ({type(err).__name__}: {err})")

    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing to change: the report only measures."""

    def accel_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        reset_peak_memory(device)
        self._meter.device = device
        self._meter.timer = self.timer
        self._meter.seen = 0
        self._meter.pause()
        self._training.fit_started()

    def accel_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trace(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None and self._example is not None:
            self._meter.pause()
            t0 = self.timer()
            self._complete_baseline(trainer, self._pending)
            self._training.pause(self.timer() - t0)
            self._pending = None
        self._training.batch_start(trainer, batch, batch_idx)
        self._meter.start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        try:
            samples = extract_batch_size(batch)
        except Exception:  # a batch Lightning cannot size
            samples = 1
        self._training.batch_end()
        self._meter.step(samples)
        if trainer.global_step % self.sparsity_every_n_steps == 0:
            self._trace(trainer, pl_module)
            self._meter.pause()
            self._meter.start()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trace(trainer, pl_module)
        self._meter.pause()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meter.pause()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._fitting:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val") and _is_number(v)}
        if trainer.sanity_checking:
            phase = "sanity"
        elif trainer.state.fn == TrainerFn.FITTING:
            phase = "fit"
        else:
            phase = "fit_end"  # a validation another callback runs from on_fit_end (before/after quantizing)
        if self.monitor is not None and phase in ("sanity", "fit"):  # the first point the metric can exist
            check_logged(self, self.monitor, trainer.callback_metrics, pl_module)
        self._history.append(
            {
                "phase": phase,
                "epoch": int(trainer.current_epoch),
                "step": int(trainer.global_step),
                "value": metrics.get(self.monitor) if self.monitor is not None else None,
                "metrics": metrics,
            }
        )

    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training.fit_ended()
        if self._pending is not None and self._example is not None:
            self._complete_baseline(trainer, self._pending)
        self._pending = None
        self._trace(trainer, pl_module)
        summaries = _summaries(trainer, pl_module)  # before measuring: a fit-end analysis restores the model it probes
        # the in-memory figures are eager, like the baseline's (taken before any compilation): what the user holds
        # once the fit ends and TorchCompile has removed its compiled wrappers
        with torch.compiler.set_stance("force_eager"):
            final = self._measure(trainer, pl_module, role="final", inputs=True)
        self._retime_exported(trainer, final)
        self._results = self._assemble(trainer, final)
        self._results["techniques"] = summaries
        self._results["training"] = training = self._training.results(compile_stats(trainer), self.regression_tolerance)
        self._results["regressions"] += training_regressions(training)
        out_dir = Path(self.output_dir) if self.output_dir is not None else Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self.json_path = out_dir / f"{self.filename}.json"
            self.figure_path = None
            if self.figure:
                self.figure_path = write_figure(self._results, out_dir / f"{self.filename}.png")
                if self.figure_path is None:
                    self._results["notes"].append("no figure: matplotlib is not installed")
            self._results["files"] = {"json": str(self.json_path), "figure": str(self.figure_path) if self.figure_path else None}
            write_json(self._results, self.json_path)
            if self.console:
                render_table(self._results)
                print_training_rows(training)
        metrics = {**flat_metrics(self._results), **training_metrics(training)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    def accel_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._fitting and stage != "fit":
            return  # a validation run from inside the fit (post-training quantization): the fit is not over
        self._cleanup()

    # ------------------------------------------------------------------ measuring
    def _cleanup(self) -> None:
        self._tmp = None  # the exported files stay in the run folder
        self._files = {}
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._pending = None
        self._example = None
        self._fitting = False
        self._meter.pause()

    def _record_first_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if args and kwargs:
            self._note("forward was first called with positional and keyword arguments; set `example_input_array` to measure MACs and latency")
            return
        example = kwargs if kwargs else (args[0] if len(args) == 1 else tuple(args))
        self._example = _keep(example, max(self.batch_sizes))

    def _measure(self, trainer: pl.Trainer, model: nn.Module, role: str, inputs: bool) -> dict[str, Any]:
        timed = self.latency and trainer.is_global_zero  # one rank times; the others would share its cores
        device = trainer.strategy.root_device
        example = self._example if inputs else None
        snap = measure_model(
            model,
            example,
            batch_sizes=self.batch_sizes,
            repeats=self.repeats,
            warmup=self.warmup,
            device=device,
            timer=self.timer,
            with_latency=timed,
        )
        snap["complete"] = example is not None
        snap["exported"] = None
        if example is not None and timed and self._export_how is not None:
            snap["exported"] = self._measure_exported(trainer, model, example, device, role)
        return snap

    def _exporter(self, trainer: pl.Trainer) -> tuple[AccelCallback | None, str] | None:
        """How this run's deployed file is made: ``(callback that exports it or None, format)``; ``None`` when the run
        does not export and ``export`` is off. A callback exports when it has an ``export_path`` set
        (``Quantization(export_path=...)``): the report then times that very file at fit end."""
        for cb in accel_callbacks(trainer):
            if cb is not self and getattr(cb, "export_path", None) and self.latency:
                return cb, "aoti" if getattr(cb, "export_compile", self.export_compile) else "program"
        return (None, self.export_format) if self.export else None

    def _measure_exported(self, trainer: pl.Trainer, model: nn.Module, example: Any, device: torch.device, role: str) -> dict[str, Any]:
        owner, fmt = self._export_how  # type: ignore[misc]
        existing = getattr(owner, "exported_path", None) if owner is not None and role == "final" else None
        if owner is not None and role == "final" and existing is None:
            self._note(f"{type(owner).__name__} did not export a file; the report exported the final model itself")
        if self._tmp is None:
            root = Path(self.output_dir) if self.output_dir is not None else Path(trainer.log_dir or trainer.default_root_dir)
            self._tmp = str(root / "exported")
        res = exported_latency(
            model,
            example,
            self._tmp,
            tag=role,
            batch_sizes=self.batch_sizes,
            format=fmt,
            repeats=self.repeats,
            warmup=self.warmup,
            device=device,
            timer=self.timer,
            existing=existing,
        )
        res["compiled"] = fmt == "aoti"
        res["format"] = res.get("format") or fmt
        self._files[role] = None if res["error"] else res["path"]
        if res["error"]:
            self._note(res["error"])
        return res

    def _retime_exported(self, trainer: pl.Trainer, final: dict[str, Any]) -> None:
        """Time the exported baseline and the exported final model again, in turn, so that the machine's load at fit
        start and at fit end does not decide the ratio (both files exist when the fit was not resumed)."""
        paths = {k: self._files.get(k) for k in ("baseline", "final")}
        base = (self._baseline or {}).get("exported") or {}
        fin = final.get("exported") or {}
        if not all(p and Path(p).exists() for p in paths.values()) or not base or not fin:
            return
        try:
            fns = {k: load_exported(str(p)) for k, p in paths.items()}
            spread: dict[str, dict[str, dict[str, float]]] = {}
            times = side_by_side_latency(
                fns, self._example, batch_sizes=self.batch_sizes, repeats=self.repeats, warmup=self.warmup,
                device=trainer.strategy.root_device, timer=self.timer, spread=spread,
            )
        except Exception as err:  # keep the separate timings
            self._note(f"the exported models could not be timed side by side ({type(err).__name__}: {err})")
            return
        base["latency_ms_at_fit_start"] = base.get("latency_ms")
        base["latency_ms"], fin["latency_ms"] = times["baseline"], times["final"]
        base["side_by_side"] = fin["side_by_side"] = True
        base["latency_spread"], fin["latency_spread"] = spread.get("baseline"), spread.get("final")

    def _complete_baseline(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """The baseline's input-dependent measures (MACs, latency) on the float model or its copy."""
        if self._baseline is None or self._baseline.get("complete"):
            return
        here = self._measure(trainer, model, role="baseline", inputs=True)
        for key in ("macs", "macs_counter", "latency_ms", "latency", "exported", "complete"):
            self._baseline[key] = here[key]

    def _trace(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        c = count_params(pl_module)
        sparsity = 1.0 - c["nonzero"] / c["params"] if c["params"] else 0.0
        point = {"step": step, "params": c["params"], "nonzero": c["nonzero"], "sparsity": sparsity}
        if self._sparsity and self._sparsity[-1]["step"] == step:
            self._sparsity[-1] = point  # the latest state at this step (e.g. pruned at epoch end, quantized at fit end)
        else:
            self._sparsity.append(point)

    def _note(self, msg: str) -> None:
        if msg not in self._notes:
            self._notes.append(msg)
            rank_zero_warn(f"AccelerationReport: {msg}", category=ReportWarning)

    def _assemble(self, trainer: pl.Trainer, final: dict[str, Any]) -> dict[str, Any]:
        base = self._baseline or {}
        latency: dict[str, dict[str, Any]] = {"eager": {}, "exported": {}, "exported_vs_eager": {}}
        regressions = []
        if self.latency and trainer.is_global_zero:
            pairs = [("eager", base.get("latency_ms") or {}, final.get("latency_ms") or {})]
            if self._export_how is not None:
                pairs.append(("exported", (base.get("exported") or {}).get("latency_ms") or {}, (final.get("exported") or {}).get("latency_ms") or {}))
            for kind, before, after in pairs:
                for b in self.batch_sizes:
                    key = str(b)
                    bm, fm = before.get(key), after.get(key)
                    speed = bm / fm if bm and fm else None
                    bad = bm is not None and fm is not None and fm > bm * (1.0 + self.regression_tolerance)
                    latency[kind][key] = {"baseline_ms": bm, "final_ms": fm, "speedup": speed, "regression": bad}
                    if bad and bm is not None and fm is not None:
                        label = "in memory" if kind == "eager" else "exported"
                        regressions.append(f"latency at batch {b} ({label}): {fm:.3f} ms vs {bm:.3f} ms baseline ({bm / fm:.2f}x)")
            fin_exp = (final.get("exported") or {}).get("latency_ms") or {}
            for b in self.batch_sizes:  # the deployed file against the float model in memory (fp32 eager, at fit start)
                eager, deployed = (base.get("latency_ms") or {}).get(str(b)), fin_exp.get(str(b))
                if eager and deployed and self._export_how is not None:
                    latency["exported_vs_eager"][str(b)] = {"eager_ms": eager, "deployed_ms": deployed, "speedup": eager / deployed}
        elif self.latency:
            self._notes.append("latency is measured on rank zero only")
        exported_bytes = {}
        bb, fb = (base.get("exported") or {}).get("file_bytes"), (final.get("exported") or {}).get("file_bytes")
        if bb is not None or fb is not None:
            exported_bytes = {"baseline": bb, "final": fb}
        peak, source = peak_memory(trainer.strategy.root_device)
        self._throughput = self._meter.state_dict()
        per_device = self._meter.samples_per_s
        history = copy.deepcopy(self._history)
        fit_vals = [h["value"] for h in history if h["phase"] == "fit" and h["value"] is not None]
        all_vals = [h["value"] for h in history if h["phase"] in ("fit", "fit_end") and h["value"] is not None]
        sanity = [h["value"] for h in history if h["phase"] == "sanity" and h["value"] is not None]
        before, after = (fit_vals[-1] if fit_vals else None), (all_vals[-1] if all_vals else None)
        worse = is_worse(before, after, self.monitor_mode)
        if self.monitor is not None and not all_vals:
            self._note(f"`monitor`={self.monitor!r} was never validated during the fit (no validation data or limit_val_batches=0)")
        return {
            "version": _VERSION,
            "device": str(trainer.strategy.root_device),
            "world_size": int(trainer.world_size),
            "batch_sizes": list(self.batch_sizes),
            "regression_tolerance": self.regression_tolerance,
            "baseline": copy.deepcopy(base),
            "final": final,
            "latency": latency,
            "exported_bytes": exported_bytes,
            "throughput": {
                "samples_per_s": per_device * trainer.world_size if per_device is not None else None,
                "samples_per_s_per_device": per_device,
                "steps": self._meter.steps,
                "skipped_steps_per_fit": self.throughput_skip,
                "seconds": self._meter.seconds,
            },
            "memory": {"peak_bytes": peak, "source": source},
            "metric": {
                "name": self.monitor,
                "mode": self.monitor_mode,
                "sanity_check": sanity[-1] if sanity else None,
                "before_fit_end": before,
                "final": after,
                "worse": worse,
                "history": history,
            },
            "sparsity": copy.deepcopy(self._sparsity),
            "regressions": regressions,
            "notes": list(self._notes),
        }


def _summaries(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
    """``report_summary(trainer, pl_module)`` of every other lightning-accel callback that has one (sensitivity
    analysis, pruning schedules with an accuracy guard), in pipeline order."""
    out = []
    for cb in accel_callbacks(trainer):
        summary = getattr(cb, "report_summary", None)
        if callable(summary):
            entry = summary(trainer, pl_module)
            if entry:
                out.append(entry)
    return out


def _is_number(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _keep(example: Any, n: int) -> Any:
    """A detached CPU copy of the first ``n`` samples of ``example`` (all of them if it has fewer)."""
    example = batch_inputs(example, n) if _has_more(example, n) else example
    with torch.inference_mode(False):
        return _map_tensors(example, lambda t: t.detach().to("cpu").clone())


def _has_more(example: Any, n: int) -> bool:
    from lightning_accel.report.measure import _leading

    lead = _leading(example)
    return lead is not None and lead > n


def _copy_module(pl_module: pl.LightningModule, trainer: pl.Trainer) -> nn.Module:
    """A deep copy of the model without its Trainer (shared by reference in the memo, then detached)."""
    memo: dict[int, Any] = {id(trainer): None}
    return copy.deepcopy(pl_module, memo)
