"""OpenVINO IR files (``model.xml`` + ``model.bin``) run by OpenVINO's CPU plugin (``pip install 'lightning-accel[openvino]'``).

The float model (:func:`~lightning_accel.deploy.layers.float_view`) is captured by ``torch.export`` and converted
with ``openvino.convert_model`` (weights kept in float32). int8 is NNCF's post-training quantization
(``nncf.quantize``: FakeQuantize nodes that the CPU plugin runs as int8 kernels; int8 weights per output channel)
calibrated on the given batches, restricted by an ``IgnoredScope`` to the layers the pipeline made int8 (each
OpenVINO op is named after the ``torch.export`` node it came from, whose module path is known). Their weights are
already on the pipeline's int8 grid. SmoothQuant is off (``smooth_quant_alpha=-1``): on the digits Transformers it
cost up to 74 points of accuracy.
The program is decomposed with OpenVINO's own table (a Linear stays one MatMul) and a model with attention is
quantized with NNCF's ``ModelType.TRANSFORMER`` rules (no int8 on layer norms and residual adds): with torch's
default decomposition and no model type, NNCF's whole-model int8 of MiniLM fell to 35% accuracy (84% float).
Bias correction is off for the pipeline's int8 layers (their trained biases are kept; NNCF's fast bias correction
cost a pruned ResidualCNN 4 points of accuracy) and on, as NNCF's default, for ``int8="all"``.

``precision``: ``"fp32"`` pins the CPU plugin to float32 (``INFERENCE_PRECISION_HINT="f32"``); ``"bf16"`` is the
plugin's default on a CPU with AVX512-BF16 or AMX (faster, about 3 significant digits).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["PRECISION_HINTS", "decompositions", "is_transformer", "load_openvino", "op_modules", "require_openvino", "save_openvino"]

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
_HINT = "pip install 'lightning-accel[openvino]' (openvino, nncf)"


def require_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as err:
        raise ImportError(f"lightning_accel.export(format='openvino') needs OpenVINO: {_HINT}") from err
    return ov


def _require_nncf() -> Any:
    try:
        import nncf
    except ImportError as err:
        raise ImportError(f"int8 OpenVINO files are quantized by NNCF: {_HINT}") from err
    return nncf


def decompositions() -> Any:
    """The decomposition table ``openvino.convert_model`` applies to a ``torch.export`` program (torch's default
    table less OpenVINO's ``ops_to_not_decompose``, as ``TorchFXPythonDecoder.from_exported_program`` builds it;
    verified on openvino 2026.4.1, torch 2.13); ``None`` (torch's default) where that internal has moved."""
    try:
        from openvino.frontend.pytorch.torchdynamo.export_decompositions import ops_to_not_decompose
        from torch.export.decomp_utils import CustomDecompTable
    except ImportError:
        return None
    table = CustomDecompTable()
    for op in ops_to_not_decompose():
        if op in table:
            table.pop(op)
    return table


def is_transformer(program: torch.export.ExportedProgram) -> bool:
    """Whether the program computes attention (a softmax or a fused attention op): NNCF's ``ModelType.TRANSFORMER``
    rules apply (no int8 on layer norms and residual adds; measured faster and as accurate on the digits Transformer
    and MiniLM)."""
    return any(
        node.op == "call_function" and ("softmax" in str(node.target) or "scaled_dot_product" in str(node.target))
        for node in program.graph.nodes
    )


def op_modules(program: torch.export.ExportedProgram) -> dict[str, str]:
    """``{torch.export node name: qualified name of the innermost module it ran in}``."""
    out = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            out[node.name] = path
    return out


def save_openvino(
    program: torch.export.ExportedProgram,
    path: Path,
    *,
    int8_modules: Sequence[str] | None,
    calibration: list[list[torch.Tensor]],
) -> list[str]:
    """Convert ``program`` to ``path`` (``.xml``); with ``int8_modules`` (``None``: NNCF's default scope, the whole
    model) quantize with NNCF. Returns the quantized modules (``["*"]`` for the whole model)."""
    ov = require_openvino()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # OpenVINO names its ops after the decomposed program's nodes: decompose as convert_model does, so the names
        # are known here and the graph is the one OpenVINO's own conversion gives (torch's default table decomposes
        # `linear` too: measured, NNCF then put FakeQuantize on reshapes and layer norms instead of the MatMuls)
        program = program.run_decompositions(decompositions())
        model = ov.convert_model(program)
    quantized: list[str] = []
    if int8_modules is None or int8_modules:
        nncf = _require_nncf()
        ignored = None
        if int8_modules is not None:
            modules = op_modules(program)
            wanted = set(int8_modules)
            keep = {n for n, m in modules.items() if m in wanted}
            ignored = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_friendly_name().split("/")[0] not in keep]
            quantized = sorted({modules[n] for n in keep})
        else:
            quantized = ["*"]
        if quantized:
            names = [i.get_any_name() for i in model.inputs]
            data = nncf.Dataset([dict(zip(names, (t.numpy() for t in batch))) for batch in calibration])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = nncf.quantize(
                    model,
                    data,
                    subset_size=max(1, len(calibration)),
                    model_type=nncf.ModelType.TRANSFORMER if is_transformer(program) else None,
                    ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored is not None else None,
                    # the pipeline's layers keep their trained biases: NNCF's (fast) bias correction moved the
                    # logits of a pruned int8 ResidualCNN by 38% of their range (test accuracy 91.6% -> 87.5%; 2%
                    # and 91.6% without it)
                    advanced_parameters=nncf.AdvancedQuantizationParameters(
                        smooth_quant_alpha=-1, disable_bias_correction=int8_modules is not None
                    ),
                )
    ov.save_model(model, str(path), compress_to_fp16=False)
    return quantized


def load_openvino(path: Path, precision: str = "fp32", num_threads: int | None = None) -> Any:
    """A compiled OpenVINO model on the CPU as a function of a flat list of input tensors."""
    ov = require_openvino()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = num_threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        result = request.infer([t.detach().cpu().numpy() for t in inputs], share_inputs=True)
        return [torch.from_numpy(np.array(result[o])) for o in compiled.outputs]

    run.compiled = compiled  # type: ignore[attr-defined]
    return run
