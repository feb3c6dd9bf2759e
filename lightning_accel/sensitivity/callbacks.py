"""When the Trainer measures sensitivity: :class:`SensitivityAnalysis`, at fit start or fit end, on the fit's own
validation data and the LightningModule's own ``validation_step`` (what it analyses is in
:mod:`lightning_accel.sensitivity.core`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_accel._lifecycle import AccelCallback, same_output_files
from lightning_accel._validate import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_patterns,
    check_stem,
    check_str,
)
from lightning_accel.evaluation import MonitoredMetric, validation_batches
from lightning_accel.quantization.backends import get_backend
from lightning_accel.sensitivity import render
from lightning_accel.sensitivity.core import (
    GRANULARITIES,
    QUANT_BACKEND,
    SensitivityWarning,
    analyze_sensitivity,
    check_amounts,
    check_bits,
)

__all__ = ["SensitivityAnalysis"]

_STATE_VERSION = 1


class SensitivityAnalysis(AccelCallback):
    """Measure, layer by layer, how much the validation metric drops when that layer alone is pruned to each of
    ``amounts`` (and quantized to each of ``bits``), cross-validated over ``folds`` folds of the validation batches,
    and recommend per-layer amounts for :class:`~lightning_accel.ScheduledPruning` /
    :class:`~lightning_accel.StructuredPruning` (``layer_amounts``) that keep the predicted drop within
    ``max_metric_drop`` while removing the most weights.

    **How the metric is measured.** The fit's validation batches (the first validation dataloader, within
    ``limit_val_batches``; under DDP every rank's shard, gathered so each rank measures all of them) are kept in
    memory. For each measurement the callback runs the LightningModule's own ``validation_step`` on each fold's
    batches, in eval mode under ``torch.no_grad()`` and the precision plugin's validation context, with
    ``self.log`` / ``self.log_dict`` captured (nothing reaches the loggers or ``trainer.callback_metrics``): the
    value logged under ``monitor`` is averaged over the fold's batches weighted by batch size (Lightning's epoch
    mean), or, when a torchmetrics ``Metric`` object is logged, that metric's ``compute()`` over the fold. So any
    LightningModule that logs ``monitor`` in its ``validation_step`` works unchanged. Without a Trainer, use
    :func:`lightning_accel.analyze_sensitivity` with a torchmetrics metric or a callable.

    Each layer is compressed on the model in place and restored exactly (weights copied back, the float layer
    swapped back, the structured snapshot restored), so the fit continues on the same model.

    At the end: a per-layer table on the console (rich if installed), ``<filename>.json`` (what
    :attr:`results` holds; pass its path as ``layer_amounts`` to a pruning callback) and ``<filename>.png`` in
    ``output_dir`` (rank zero writes). The results live in ``state_dict()``: a resumed run keeps them and does not
    measure again. With :class:`~lightning_accel.AccelerationReport` in the same Trainer the report lists a
    summary row and the json path.

    Example::

        trainer = Trainer(callbacks=[SensitivityAnalysis(amounts=[0.5, 0.8, 0.9], folds=3, max_metric_drop=0.01)])

    Args:
        amounts: candidate fractions removed per layer, each in ``(0, 1)``, e.g. ``[0.5, 0.7, 0.8, 0.9, 0.95]``.
        bits: candidate weight formats of Linear layers (bitsandbytes), from ``"int8"``, ``"nf4"``, ``"fp4"``, e.g.
            ``["int8", "nf4"]``; ``[]`` for pruning only.
        folds: K of the K-fold estimate over the validation batches (mean and std of the drop across folds), e.g.
            ``3``.
        when: ``"fit_start"`` (the model as loaded, e.g. pretrained) or ``"fit_end"`` (the trained model), e.g.
            ``"fit_end"``.
        monitor: the metric ``validation_step`` logs, e.g. ``"val_acc"``.
        monitor_mode: ``"max"`` if a higher ``monitor`` is better, ``"min"`` if lower is, e.g. ``"max"``.
        max_metric_drop: budget of the recommendation: the most predicted drop of ``monitor``, e.g. ``0.01``;
            ``None``: recommend by ``sparsity`` instead (or not at all).
        sparsity: recommend the allocation that removes this fraction of the analysed weights with the least
            predicted drop, e.g. ``0.9`` (only with ``max_metric_drop=None``).
        granularity: ``"weights"`` (each Linear/Conv layer, unstructured magnitude pruning, for ``ScheduledPruning``)
            or ``"channels"`` (each torch-pruning group, for ``StructuredPruning``), e.g. ``"weights"``.
        modules: glob patterns of the Linear/Conv layers to analyse, e.g. ``["blocks.*"]``; ``None``: all but the
            output layer (``"weights"`` only).
        exclude: glob patterns left out, e.g. ``["stem.*"]``.
        prune_head: also analyse the output layer when ``modules`` is ``None``, e.g. ``False``.
        compute_dtype: compute dtype of the quantized layers while measuring ``bits``: ``"fp32"``, ``"bf16"`` or
            ``"auto"``, e.g. ``"fp32"``.
        output_dir: directory of the json and png, e.g. ``"sensitivity"``; ``None``: the Trainer's ``log_dir``.
        filename: stem of the files, e.g. ``"sensitivity"``.
        figure: draw the png (needs matplotlib), e.g. ``True``.
        console: print the table, e.g. ``True``.

    Attributes:
        results: the analysis (see :func:`lightning_accel.analyze_sensitivity`); empty before it ran.
        json_path: where the json was written (rank zero), or ``None``.

    Raises:
        ValueError: a bad argument (here, before any model is touched); at the analysis: no validation data or
            ``validation_step``, ``monitor`` not logged by ``validation_step``. Fewer validation batches than
            ``folds`` warn (:class:`~lightning_accel.SensitivityWarning`) and use one fold per batch.
        ImportError: ``bits`` without bitsandbytes (at setup).
    """

    stage: ClassVar[str] = "measurement"
    capabilities: ClassVar[frozenset[str]] = frozenset({"measures"})

    def __init__(
        self,
        amounts: list[float] | None = None,
        bits: list[str] | None = None,
        folds: int = 1,
        when: Literal["fit_start", "fit_end"] = "fit_end",
        monitor: str = "val_acc",
        monitor_mode: Literal["max", "min"] = "max",
        max_metric_drop: float | None = 0.01,
        sparsity: float | None = None,
        granularity: Literal["weights", "channels"] = "weights",
        modules: list[str] | None = None,
        exclude: list[str] | None = None,
        prune_head: bool = False,
        compute_dtype: Literal["fp32", "bf16", "auto"] = "fp32",
        output_dir: str | None = None,
        filename: str = "sensitivity",
        figure: bool = True,
        console: bool = True,
    ) -> None:
        super().__init__()
        self.amounts = check_amounts([0.5, 0.7, 0.8, 0.9, 0.95] if amounts is None else amounts)
        self.bits = check_bits([] if bits is None else bits)
        self.folds = check_int("folds", folds, low=1)
        self.when = check_choice("when", when, ("fit_start", "fit_end"))
        self.monitor = check_str("monitor", monitor, "the name of a metric logged by validation_step, like 'val_acc'")
        self.monitor_mode = check_choice("monitor_mode", monitor_mode, ("max", "min"))
        self.max_metric_drop = check_number("max_metric_drop", max_metric_drop, low=0.0, allow_none=True)
        self.sparsity = check_number("sparsity", sparsity, low=0.0, high=1.0, high_inclusive=False, allow_none=True)
        if max_metric_drop is not None and sparsity is not None:
            raise ValueError(
                f"`sparsity`={sparsity} and `max_metric_drop`={max_metric_drop} are two ways to recommend; set one "
                "(the other to null)"
            )
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        self.modules = check_patterns("modules", modules)
        self.exclude = check_patterns("exclude", exclude)
        self.prune_head = check_bool("prune_head", prune_head)
        if granularity == "channels" and (self.bits or modules is not None or prune_head):
            raise ValueError(
                f"`granularity`='channels' analyses torch-pruning groups: `bits`, `modules` and `prune_head` do not apply "
                f"(got bits={self.bits}, modules={modules}, prune_head={prune_head}); use `exclude`"
            )
        self.compute_dtype = check_choice("compute_dtype", compute_dtype, ("fp32", "bf16", "auto"))
        self.output_dir = check_str("output_dir", output_dir, "a directory path", allow_none=True)
        self.filename = check_stem("filename", filename, "sensitivity")
        self.figure = check_bool("figure", figure)
        self.console = check_bool("console", console)
        self._results: dict[str, Any] = {}
        self.json_path: str | None = None
        self.figure_path: str | None = None

    # ------------------------------------------------------------------ state
    @property
    def results(self) -> dict[str, Any]:
        return copy.deepcopy(self._results)

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "results": copy.deepcopy(self._results), "json_path": self.json_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"SensitivityAnalysis state version {state_dict.get('version')!r} is not supported (expected {_STATE_VERSION})")
        self._results = copy.deepcopy(state_dict.get("results") or {})
        self.json_path = state_dict.get("json_path")

    def conflicts_with(self, other: AccelCallback) -> str | None:
        if "freezes_weights" in frozenset(getattr(other, "capabilities", frozenset())):
            return (
                "the analysis prunes and quantizes float Linear/Conv layers one at a time, and layers quantized at setup "
                "hold frozen integer weights; analyse the float model (quantize with when='fit_end', or in another run)"
            )
        return same_output_files(self, other)

    # ------------------------------------------------------------------ lifecycle
    def accel_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.bits:
            get_backend(QUANT_BACKEND).require()
        if stage == "fit" and trainer.global_step == 0:
            self._results = {}  # a fresh fit; a resumed one loads the checkpoint's results after this

    def accel_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_start":
            self.analyze(trainer, pl_module)

    def accel_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self.analyze(trainer, pl_module)

    def report_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """What :class:`~lightning_accel.AccelerationReport` shows (it runs a fit-end analysis first if the report's
        fit end comes earlier): the baseline, the recommendation and the json path."""
        if self.when == "fit_end" and not self._results:
            self.analyze(trainer, pl_module)
        if not self._results:
            return None
        r = self._results
        rec = r.get("recommendation") or {}
        measured = (rec.get("measured_drop") or {}).get("prune") or {}
        return {
            "technique": "SensitivityAnalysis",
            "metric": r["metric"],
            "baseline": r["baseline"]["mean"],
            "layers": len(r["layers"]),
            "folds": r["folds"],
            "seconds": r.get("seconds"),
            "recommended_sparsity": rec.get("sparsity"),
            "predicted_drop": (rec.get("predicted_drop") or {}).get("prune"),
            "measured_drop": measured.get("mean"),
            "layer_amounts": rec.get("layer_amounts"),
            "layer_bits": rec.get("layer_bits"),
            "json": self.json_path,
        }

    # ------------------------------------------------------------------ the analysis
    def analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Run the analysis now (once per fit: a result already there, e.g. from the checkpoint, is kept)."""
        if self._results:
            return self.results
        batches = validation_batches(trainer, pl_module, "SensitivityAnalysis")
        if not batches:
            raise ValueError("SensitivityAnalysis needs validation batches; the validation dataloader gave none")
        folds = self.folds
        if len(batches) < folds:
            folds = len(batches)
            rank_zero_warn(
                f"SensitivityAnalysis `folds`={self.folds} needs at least {self.folds} validation batches; got "
                f"{len(batches)} (limit_val_batches / fast_dev_run?), so it uses {folds} folds",
                category=SensitivityWarning,
            )
        example = getattr(pl_module, "example_input_array", None)  # None: the first batch's inputs (analyze_sensitivity)
        if isinstance(example, torch.Tensor):
            example = example.to(pl_module.device)
        evaluate = MonitoredMetric(trainer, pl_module, self.monitor, "SensitivityAnalysis")
        result = analyze_sensitivity(
            pl_module,
            batches,
            amounts=self.amounts,
            bits=self.bits,
            folds=folds,
            granularity=self.granularity,
            modules=self.modules,
            exclude=self.exclude,
            prune_head=self.prune_head,
            mode=self.monitor_mode,
            max_metric_drop=self.max_metric_drop,
            sparsity=self.sparsity,
            evaluate=evaluate,
            example_inputs=example,
            compute_dtype=self.compute_dtype,
            name=self.monitor,
        )
        evaluate.reset_metrics()
        result["when"] = self.when
        result["step"] = int(trainer.global_step)
        result = trainer.strategy.broadcast(result, src=0)  # every rank holds rank zero's numbers
        out_dir = Path(self.output_dir) if self.output_dir is not None else Path(trainer.log_dir or trainer.default_root_dir)
        self.json_path = str(out_dir / f"{self.filename}.json")
        png = str(out_dir / f"{self.filename}.png") if self.figure else None
        result["files"] = {"json": self.json_path, "figure": png}  # the same on every rank; rank zero writes them
        if trainer.is_global_zero:
            if png is not None:
                fig = render.write_figure(result, png)
                self.figure_path = str(fig) if fig is not None else None
                result["files"]["figure"] = self.figure_path
            render.write_json(result, self.json_path)
            if self.console:
                render.render_table(result)
            else:
                rank_zero_info(f"SensitivityAnalysis: wrote {self.json_path}")
        self._results = result
        return self.results
