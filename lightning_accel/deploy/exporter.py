"""One format: write the file (and its sidecar) and load it back as a callable of the model's own inputs."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lightning_accel.deploy.aoti as aoti
import lightning_accel.deploy.layers as layers
import lightning_accel.deploy.onnx as onnx
import lightning_accel.deploy.openvino as openvino
from lightning_accel.deploy.common import (
    Exported,
    calibration_list,
    capture,
    check_inputs,
    failing_module,
    read_sidecar,
    trace_inputs,
    write_sidecar,
)
from lightning_accel.deploy.signature import dump_outputs_spec
from lightning_accel.errors import ExportError, ExportWarning

__all__ = ["FORMATS", "INT8_CHOICES", "PRECISIONS", "SUFFIXES", "export_format", "format_of", "load_file"]

#: the formats a file can have (``"auto"`` chooses one of them by measuring)
FORMATS = ("aoti", "program", "onnx", "openvino")
INT8_CHOICES = ("model", "none", "all")
PRECISIONS = ("fp32", "bf16")
SUFFIXES = {"aoti": ".pt2", "program": ".pt2", "onnx": ".onnx", "openvino": ".xml"}
_CALIBRATION_BATCHES = 64  # at most this many calibration batches are used
_AOTI_CHECK = 0.05  # an AOTInductor file further than this from the model (relative to its largest output) is wrong


def _relative_error(got: Any, want: Any) -> float:
    from torch.utils import _pytree as pytree

    g = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    w = [t for t in pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    if len(g) != len(w) or any(a.shape != b.shape for a, b in zip(g, w)):
        return float("inf")
    return max((float((a.float() - b.float()).abs().max()) / (float(b.float().abs().max()) or 1.0) for a, b in zip(g, w)), default=0.0)


def export_format(
    model: nn.Module,
    example_inputs: Any,
    path: Path,
    fmt: str,
    *,
    dynamic_batch: bool = True,
    int8: str = "model",
    precision: str = "fp32",
    calibration: Iterable[Any] | None = None,
    inductor_configs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` in format ``fmt`` to ``path`` (validated by :func:`lightning_accel.export`); returns the sidecar
    metadata written beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    calibration = list(calibration) if calibration is not None else None
    scope = layers.int8_scope(model)
    was_training = model.training
    model.eval()
    try:
        traced = trace_inputs(model, example_inputs, dynamic_batch)
        if fmt in ("aoti", "program"):
            # int8 layers (tensor-subclass weights) are traced on a copy: torch.export leaves weak references to the
            # parameters it traced, and `Module.cpu()` / `.to()` must swap subclass parameters, which a weakly
            # referenced tensor refuses (a Trainer's teardown after the export failed: "Couldn't swap Linear.weight")
            source = _copy(model) if int8 == "model" and scope else model if int8 == "model" else layers.float_view(model)
        else:  # the float model, batch norms folded into their convolutions (the int8 layers keep their names)
            source = layers.float_view(model)
            layers.fold_batch_norms_(source, layers.conv_batch_norm_pairs(capture(source, traced)))
        outputs = _run(source, traced)
        meta: dict[str, Any] = {
            "format": fmt,
            "signature": traced.spec.to_json() if traced.spec is not None else None,
            "outputs": dump_outputs_spec(outputs),
            "precision": precision,
            "int8": int8,
            "int8_layers": [],
        }
        if fmt in ("aoti", "program"):
            program = capture(source, traced)
            meta["int8_layers"] = sorted(scope) if int8 == "model" else []
            if fmt == "aoti":
                meta["inductor_configs"] = aoti.save_aoti(program, path, inductor_configs)
                compiled = aoti.load_aoti(path)
                error = 0.0
                for inputs in check_inputs(example_inputs, calibration):
                    args, kwargs = traced.normalize(inputs)
                    with torch.no_grad():
                        error = max(error, _relative_error(compiled(*args, **kwargs), source(*args, **kwargs)))
                if error > _AOTI_CHECK and meta["inductor_configs"].get("freezing"):
                    # measured: torch 2.13 + torchao 0.18 freeze int8 convolutions into wrong outputs in some graphs
                    # (a flatten after the conv; the digits ResidualCNN: 11% test accuracy); compiled again unfrozen
                    warnings.warn(
                        f"the AOTInductor file compiled with frozen weights computed outputs {error:.2g} (relative) away "
                        "from the model's; compiled again without freezing (slower, correct)",
                        ExportWarning,
                        stacklevel=3,
                    )
                    meta["inductor_configs"] = aoti.save_aoti(program, path, {**(inductor_configs or {}), "freezing": False})
                    meta["freezing_fallback"] = error
            else:
                aoti.save_program(program, path)
        else:
            if int8 == "model":
                modules: list[str] | None = sorted(scope)
            elif int8 == "none":
                modules = []
            else:
                modules = None if fmt == "openvino" else layers.quantizable_layers(model)
            calib = calibration_list(calibration, example_inputs, traced, _CALIBRATION_BATCHES) if modules != [] else []
            if calibration is None and modules != []:
                warnings.warn(
                    f"int8 {fmt} export calibrated on the example inputs only: pass `calibration` (an iterable of "
                    "the model's inputs, e.g. a few hundred training samples) for the activation ranges",
                    ExportWarning,
                    stacklevel=3,
                )
            if fmt == "onnx":
                nodes = onnx.save_onnx(source, traced, path, int8_modules=modules, calibration=calib)
                meta["int8_layers"] = sorted(modules) if nodes and modules is not None else []
                meta["int8_nodes"] = nodes
            else:
                program = capture(source, traced)
                meta["int8_layers"] = openvino.save_openvino(program, path, int8_modules=modules, calibration=calib)
    finally:
        model.train(was_training)
    write_sidecar(path, meta)
    return meta


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without its Trainer (a LightningModule's ``_trainer`` is shared, then dropped)."""
    trainer = getattr(model, "_trainer", None)
    clone = copy.deepcopy(model, {id(trainer): None} if trainer is not None else {})
    return clone.eval()


def _run(model: nn.Module, traced: Any) -> Any:
    """The model's outputs on the example (their structure goes to the sidecar).

    Raises:
        ExportError: the model fails on the example; the message names the failing module.
    """
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return model(*traced.args, **traced.kwargs)
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(
                f"{type(model).__name__} fails on the example inputs: it failed in {failing_module(model, err)}: "
                f"{type(err).__name__}: {reason}"
            ) from err


def format_of(path: Path, meta: dict[str, Any]) -> str:
    """The format of an exported file: its sidecar, else its suffix / contents."""
    if meta.get("format") in FORMATS:
        return str(meta["format"])
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".xml":
        return "openvino"
    return "aoti" if aoti.is_aoti_package(path) else "program"


def load_file(path: Path, num_threads: int | None = None) -> Exported:
    meta = read_sidecar(path)
    fmt = format_of(path, meta)
    if fmt == "aoti":
        return Exported(aoti.load_aoti(path, num_threads), fmt, meta)
    if fmt == "program":
        return Exported(aoti.load_program(path, num_threads), fmt, meta)
    if fmt == "onnx":
        return Exported(onnx.load_onnx(path, num_threads), fmt, meta, flat=True)
    return Exported(openvino.load_openvino(path, meta.get("precision", "fp32"), num_threads), fmt, meta, flat=True)
