"""Per-layer settings a user or a sensitivity analysis writes: ``{layer: amount}`` for pruning, ``{layer: format}``
for quantization, as a dict or the path of a ``sensitivity.json`` (its ``recommendation``).

Shared by the pruning and quantization callbacks (``layer_amounts=``, ``layer_bits=``) and the sensitivity analysis
that writes the file; it imports no technique, so none of them imports another through it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_accel._validate import check_choice, check_number

__all__ = ["BITS", "load_layer_amounts", "load_layer_bits"]

#: Weight formats a layer may be quantized to, with their bits per weight.
BITS: dict[str, int] = {"int8": 8, "nf4": 4, "fp4": 4}


def _read_json(source: str, what: str, value: str) -> Any:
    """The JSON in the file ``source`` (of ``{layer: <value>}`` or a ``sensitivity.json``); ``ValueError`` naming
    ``what`` for a missing file or invalid JSON."""
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"`{what}` must be a dict {{layer: {value}}} or the path of a sensitivity.json; {source!r} is not a file")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"`{what}`: {source!r} is not valid JSON ({err})") from err


def _check_layer_names(source: Any, what: str, value: str) -> Mapping[str, Any]:
    """``source`` as a non-empty mapping with non-empty string keys; ``ValueError`` naming ``what`` otherwise."""
    if not isinstance(source, Mapping) or not source:
        raise ValueError(f"`{what}` must be a non-empty dict {{layer name: {value}}} or a sensitivity.json path; got {source!r}")
    for k in source:
        if not isinstance(k, str) or not k:
            raise ValueError(f"`{what}` keys must be layer names; got {k!r}")
    return source


def load_layer_amounts(source: str | Mapping[str, Any], what: str = "layer_amounts") -> dict[str, float]:
    """Per-layer amounts from a dict ``{layer: amount}`` or the path of a ``sensitivity.json`` (its
    ``recommendation.layer_amounts``, or a JSON object of ``{layer: amount}``). Keys may end in ``.weight``
    (dropped). Raises ``ValueError`` naming ``what`` for a missing file or a bad value."""
    if isinstance(source, str):
        data = _read_json(source, what, "amount")
        if isinstance(data, dict) and "layers" in data and "recommendation" not in data:
            raise ValueError(
                f"`{what}`: {source!r} has no recommendation; run SensitivityAnalysis with `max_metric_drop` (or "
                "`sparsity`) set, or pass a dict"
            )
        if isinstance(data, dict) and isinstance(data.get("recommendation"), dict):
            data = data["recommendation"].get("layer_amounts")
        source = data
    out: dict[str, float] = {}
    for k, v in _check_layer_names(source, what, "amount").items():
        check_number(f"{what}[{k!r}]", v, low=0.0, high=1.0, high_inclusive=False)
        out[k[: -len(".weight")] if k.endswith(".weight") else k] = float(v)
    return out


def load_layer_bits(source: str | Mapping[str, Any], what: str = "layer_bits") -> dict[str, str]:
    """Per-layer weight formats from a dict ``{layer: "int8" | "nf4" | "fp4" | "float"}`` or the path of a
    ``sensitivity.json`` (its ``recommendation.layer_bits``). Raises ``ValueError`` naming ``what``."""
    if isinstance(source, str):
        data = _read_json(source, what, "format")
        if isinstance(data, dict) and "layers" in data:
            data = (data.get("recommendation") or {}).get("layer_bits")
            if not data:
                raise ValueError(
                    f"`{what}`: {source!r} recommends no formats; run SensitivityAnalysis with `bits` and `max_metric_drop` set"
                )
        source = data
    out: dict[str, str] = {}
    for k, v in _check_layer_names(source, what, "format").items():
        check_choice(f"{what}[{k!r}]", v, (*BITS, "float"))
        out[k] = str(v)
    return out
