"""ONNX files run by ONNX Runtime (``pip install 'lightning-accel[onnx]'``).

The float model (:func:`~lightning_accel.deploy.layers.float_view`: pruned shapes, int8 layers as float layers of
their dequantized int8 weights) is exported by ``torch.onnx.export(dynamo=True)``. int8 is ONNX Runtime's own
static post-training quantization (``onnxruntime.quantization.quantize_static``, QDQ format: QuantizeLinear /
DequantizeLinear pairs, int8 weights per output channel, uint8 activations per tensor) calibrated on the given
batches, applied only to the Conv / MatMul / Gemm nodes of the layers the pipeline made int8 (each ONNX node names
the module it came from). The weights it quantizes are already on the pipeline's int8 grid, so it reproduces them;
the activation ranges are ONNX Runtime's calibration (MinMax) of the same batches.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_accel.deploy.common import Traced

__all__ = ["INT8_OP_TYPES", "load_onnx", "module_of_node", "require_onnx", "save_onnx"]

INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")
_HINT = "pip install 'lightning-accel[onnx]' (onnx, onnxruntime, onnxscript)"



def _owner(folded: dict[str, str], module: str | None) -> str | None:
    """The module a node belongs to, a folded batch norm's node to its convolution."""
    return folded.get(module, module) if module is not None else None

def require_onnx() -> Any:
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"lightning_accel.export(format='onnx') needs ONNX Runtime: {_HINT}") from err
    return onnx


def module_of_node(node: Any) -> str | None:
    """The qualified name of the module an ONNX node came from, read from the exporter's ``namespace`` metadata
    (``": M/fc: torch.nn.modules.linear.Linear/linear: aten.linear.default"`` -> ``"fc"``)."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            parts = prop.value.split("/")[1:-1]  # the root module, ..., the op
            return parts[-1].split(":")[0].strip() if parts else ""
    return None


def _folded_batch_norms(program: Any) -> dict[str, str]:
    """``{batch norm module: the convolution module before it}``: the exporter folds a batch norm into the Conv
    before it, and the folded Conv node carries the batch norm's name."""
    out: dict[str, str] = {}
    if program is None:
        return out

    def module(node: Any) -> str | None:
        stack = node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else None

    for node in program.graph.nodes:
        if node.op == "call_function" and "batch_norm" in str(node.target) and node.args:
            src = node.args[0]
            if getattr(src, "op", None) == "call_function" and "conv" in str(src.target):
                bn, conv = module(node), module(src)
                if bn and conv:
                    out[bn] = conv
    return out


def save_onnx(
    view: nn.Module,
    traced: Traced,
    path: Path,
    *,
    int8_modules: Sequence[str] | None,
    calibration: list[list[torch.Tensor]],
) -> list[str]:
    """Export ``view`` to ``path``; with ``int8_modules`` (``None``: every Conv / MatMul / Gemm) quantize those
    layers' nodes statically. Returns the names of the quantized ONNX nodes."""
    onnx = require_onnx()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            view, traced.args, kwargs=traced.kwargs or None, dynamic_shapes=traced.dynamic, dynamo=True, verbose=False
        )
    if program is None:  # dynamo=True always returns a program; None is the legacy exporter's answer
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNX program")
    if int8_modules is not None and not int8_modules:
        program.save(str(path))
        return []
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        program.save(str(float_path))
        graph = onnx.load(str(float_path)).graph
        wanted = None if int8_modules is None else set(int8_modules)
        folded = _folded_batch_norms(program.exported_program)
        nodes = [
            n.name
            for n in graph.node
            if n.op_type in INT8_OP_TYPES and (wanted is None or _owner(folded, module_of_node(n)) in wanted)
        ]
        names = [i.name for i in graph.input]
        if not nodes:
            program.save(str(path))
            return []
        _quantize_static(float_path, path, nodes, names, calibration)
    return nodes


def _quantize_static(src: Path, dst: Path, nodes: list[str], input_names: list[str], calibration: list[list[torch.Tensor]]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter([{n: t.numpy() for n, t in zip(input_names, batch)} for batch in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs a pre-processing hint on the root logger
    try:
        _run_quantize_static(quantize_static, QuantFormat, QuantType, _Reader(), src, dst, nodes)
    finally:
        root.setLevel(level)


def _run_quantize_static(quantize_static: Any, QuantFormat: Any, QuantType: Any, reader: Any, src: Path, dst: Path, nodes: list[str]) -> None:
    quantize_static(
        str(src),
        str(dst),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(INT8_OP_TYPES),
        nodes_to_quantize=nodes,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )


def load_onnx(path: Path, num_threads: int | None = None) -> Any:
    """An ONNX Runtime session on the CPU as a function of a flat list of input tensors."""
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if num_threads is not None:
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]

    run.session = session  # type: ignore[attr-defined]
    return run
