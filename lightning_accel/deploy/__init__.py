"""A deployable file of the compressed model, in the CPU runtime that runs it fastest.

    lightning_accel.export(model, torch.zeros(1, 1, 8, 8), "model.pt2")             # AOTInductor package
    lightning_accel.export(model, x, "model.onnx")                                  # ONNX Runtime (suffix picks)
    lightning_accel.export(model, x, "model.xml", calibration=batches)               # OpenVINO IR, int8 by NNCF
    lightning_accel.export(model, x, "model", format="auto", batch_sizes=[1, 256])  # measured: the fastest
    run = lightning_accel.load_exported("model.onnx")                               # run(x) / run(x=x) -> tensors

Formats (``format=``, else the path's suffix: ``.onnx``, ``.xml``, anything else ``"aoti"``):

* ``"aoti"``: ``torch.export`` compiled ahead of time by AOTInductor with frozen weights and the x86 int8 fusion
  passes (:mod:`lightning_accel.deploy.aoti`): torchao int8 Linear layers and int8 convolutions run as oneDNN
  quantized kernels; the pipeline's trained int8 weights and calibrated scales are used as they are.
* ``"program"``: the portable ``torch.export`` program (the eager ops; no compilation).
* ``"onnx"``: ONNX Runtime (:mod:`lightning_accel.deploy.onnx`, extra ``[onnx]``).
* ``"openvino"``: OpenVINO IR (:mod:`lightning_accel.deploy.openvino`, extra ``[openvino]``).
* ``"auto"``: each available format, float and int8, timed on this machine (:mod:`lightning_accel.deploy.auto`).

Pruned shapes are in every file (the model's own shapes). int8: AOTInductor and the program carry the pipeline's
int8 layers exactly. ONNX Runtime and OpenVINO need their own int8 graph: the file is the float model with the int8
layers' dequantized weights (on the pipeline's int8 grid), quantized by the runtime's library (ONNX Runtime's
``quantize_static`` QDQ, NNCF's post-training quantization) **only in the layers the pipeline made int8**, with
activation ranges calibrated on ``calibration`` (the pipeline's trained activation scales are not transferred).

Every file has a sidecar ``<file>.json`` (the model's ``forward`` signature, the output structure, the format, the
int8 layers): :func:`load_exported` returns a callable that takes the model's inputs positionally or by keyword and
returns torch tensors in the model's output structure, whatever form the example had.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lightning_accel.deploy.auto import Candidate, Timer, available_formats, choose
from lightning_accel.deploy.common import Exported
from lightning_accel.deploy.exporter import FORMATS, INT8_CHOICES, PRECISIONS, export_format, load_file
from lightning_accel.errors import ExportError

__all__ = ["FORMATS", "Candidate", "Exported", "ExportError", "available_formats", "export", "load_exported"]


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    format: str | None = None,
    *,
    compile: bool | None = None,
    dynamic_batch: bool = True,
    int8: str = "model",
    precision: str = "fp32",
    calibration: Iterable[Any] | None = None,
    inductor_configs: dict[str, Any] | None = None,
    batch_sizes: Sequence[int] = (1,),
    formats: Sequence[str] | None = None,
    tolerance: float = 0.1,
    metric: Callable[[Callable[..., Any]], float] | None = None,
    max_metric_drop: float = 0.01,
    repeats: int = 10,
    warmup: int = 2,
    timer: Timer | None = None,
    num_threads: int | None = None,
) -> Path:
    """Write ``model`` (in eval mode) as one file that runs without the training code.

    Args:
        model: the (compressed) model, e.g. a pruned LightningModule with int8 layers.
        example_inputs: one forward's inputs: a tensor, a tuple (positional) or a dict (keyword), e.g.
            ``torch.zeros(1, 1, 8, 8)``.
        path: the file to write, e.g. ``"model.pt2"``, ``"model.onnx"``, ``"model.xml"`` (OpenVINO); with
            ``"auto"`` the suffix is set by the chosen format.
        format: ``"aoti"``, ``"program"``, ``"onnx"``, ``"openvino"`` or ``"auto"``; ``None``: from the suffix
            (``.onnx``, ``.xml``), else ``"aoti"`` (``"program"`` with ``compile=False``).
        compile: the former switch, kept for callers: ``True`` is ``"aoti"``, ``False`` ``"program"``.
        dynamic_batch: the first dimension of every input tensor may vary (one file for every batch size).
        int8: ``"model"``: the layers the pipeline made int8 stay int8 (none if it made none); ``"none"``: a float
            file (int8 layers dequantized); ``"all"`` (ONNX / OpenVINO only): the runtime's post-training
            quantization of the whole model (every Linear / Conv for ONNX Runtime, NNCF's default scope for
            OpenVINO), e.g. to compare against an uncompressed model.
        precision: ``"fp32"``, or ``"bf16"`` (OpenVINO only: the CPU plugin's bf16 inference).
        calibration: inputs for the runtime's int8 calibration (ONNX / OpenVINO), an iterable of example inputs
            such as a few batches of training data; ``None``: the example (with an ``ExportWarning``).
        inductor_configs: extra AOTInductor options over ``{"freezing": True}``, e.g. ``{"max_autotune": True}``.
        batch_sizes: ``"auto"``: the batch sizes it times, e.g. ``[1, 256]``.
        formats: ``"auto"``: the formats it tries (default: every available one).
        tolerance: ``"auto"``: the largest output difference from the model, relative to the largest output
            magnitude, for a file to be kept (without ``metric``), e.g. ``0.1``.
        metric: ``"auto"``: ``metric(fn) -> float`` (higher is better), e.g. test accuracy of ``fn``; replaces
            ``tolerance``.
        max_metric_drop: ``"auto"``: how far below the model's ``metric`` a file may score, e.g. ``0.01``.
        repeats: ``"auto"``: timed rounds (the median is used), e.g. ``10``.
        warmup: ``"auto"``: untimed rounds first, e.g. ``2``.
        timer: ``"auto"``: ``timer(label, fn, (args, kwargs)) -> seconds`` (default: ``time.perf_counter``
            around one call).
        num_threads: ``"auto"``: threads of each runtime while timing (default: the runtime's own).

    Returns:
        The path written (with ``"auto"``: the chosen format's suffix).

    Raises:
        ExportError: ``torch.export`` cannot capture the model; the message names the failing module and gives
            torch's reason.
        ValueError: an argument is not one of the allowed values.
        ImportError: the runtime of the format is not installed (the message names the pip extra).
    """
    path = Path(path)
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"`compile` must be True, False or None; got {compile!r}")
    if format is None:
        if compile is False:
            format = "program"
        else:
            format = {".onnx": "onnx", ".xml": "openvino"}.get(path.suffix, "aoti")
    _check_choice("format", format, (*FORMATS, "auto"))
    if compile is not None and format not in ("auto", "aoti" if compile else "program"):
        raise ValueError(f"`compile`={compile} is the former switch between 'aoti' and 'program'; got format={format!r}: drop `compile`")
    _check_choice("int8", int8, INT8_CHOICES)
    _check_choice("precision", precision, PRECISIONS)
    if precision == "bf16" and format not in ("openvino",):
        raise ValueError(f"`precision`='bf16' is OpenVINO's CPU precision; got format={format!r} (use 'fp32')")
    if int8 == "all" and format in ("aoti", "program"):
        raise ValueError(
            f"`int8`='all' is the runtime's own quantization of the whole model (ONNX / OpenVINO); got format={format!r}: "
            "quantize the model with lightning_accel.Quantization instead"
        )
    if format == "openvino" and path.suffix != ".xml":
        raise ValueError(f"`path` of an OpenVINO file ends in '.xml' (the weights go to '.bin' beside it); got {str(path)!r}")
    if not isinstance(dynamic_batch, bool):
        raise ValueError(f"`dynamic_batch` must be True or False; got {dynamic_batch!r}")
    if not batch_sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batch_sizes):
        raise ValueError(f"`batch_sizes` must be a non-empty list of positive ints; got {batch_sizes!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"`tolerance` must be a number >= 0; got {tolerance!r}")
    if not (isinstance(max_metric_drop, (int, float)) and max_metric_drop >= 0):
        raise ValueError(f"`max_metric_drop` must be a number >= 0; got {max_metric_drop!r}")
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}; got {value!r}")
    if inductor_configs is not None and not isinstance(inductor_configs, dict):
        raise ValueError(f"`inductor_configs` must be a dict of inductor options or None; got {inductor_configs!r}")
    if format == "auto":
        here = available_formats()
        if formats is None:
            formats = here
        for f in formats:
            _check_choice("formats", f, FORMATS)
        missing = [f for f in formats if f not in here]
        if missing:
            raise ImportError(f"`formats` names {missing}, not installed here: pip install 'lightning-accel[onnx,openvino]'")
        if int8 != "model" or precision != "fp32":
            raise ValueError("format='auto' tries float and int8 (and OpenVINO's bf16) itself: leave `int8` and `precision` at their defaults")
        final, _ = choose(
            model, example_inputs, path, formats=list(formats), batch_sizes=list(batch_sizes), calibration=calibration,
            tolerance=float(tolerance), metric=metric, max_metric_drop=float(max_metric_drop), timer=timer,
            repeats=repeats, warmup=warmup, dynamic_batch=dynamic_batch, inductor_configs=inductor_configs,
            num_threads=num_threads,
        )
        return final
    export_format(
        model, example_inputs, path, format, dynamic_batch=dynamic_batch, int8=int8, precision=precision,
        calibration=calibration, inductor_configs=inductor_configs,
    )
    return path


def load_exported(path: str | Path, *, num_threads: int | None = None) -> Exported:
    """Load a file written by :func:`export` (any format) as a callable taking the model's inputs (positional or
    keyword) and returning torch tensors.

    Args:
        path: the file, e.g. ``"model.onnx"``.
        num_threads: CPU threads of the runtime, e.g. ``2``; ``None``: the runtime's default. For ``"aoti"`` and
            ``"program"`` files this is ``torch.set_num_threads`` (process-wide).

    Raises:
        FileNotFoundError: there is no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {str(path)!r}")
    if num_threads is not None and (not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1):
        raise ValueError(f"`num_threads` must be a positive int or None; got {num_threads!r}")
    return load_file(path, num_threads)
