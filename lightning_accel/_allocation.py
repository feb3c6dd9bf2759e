"""Per-layer allocations as files: the ``layer_amounts`` / ``layer_bits`` arguments of the pruning and quantization
callbacks, given as a dict or as the ``sensitivity.json`` :class:`~lightning_accel.SensitivityAnalysis` writes.

Data only, importing nothing of the package but argument checks, so that the techniques that read an allocation
(pruning, quantization) and the analysis that writes one (sensitivity) do not import each other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_accel._validate import check_choice, check_number

__all__ = ["BITS", "check_layer_names", "load_layer_amounts", "load_layer_bits", "read_json"]

#: bits per weight of each quantization candidate (format names of :func:`lightning_accel.quantize_`)
BITS: dict[str, int] = {"int8": 8, "nf4": 4, "fp4": 4}


def read_json(source: str, what: str, value: str) -> Any:
    """The JSON in the file ``source`` (of ``{layer: <value>}`` or a ``sensitivity.json``); ``ValueError`` naming
    ``what`` for a missing file or invalid JSON."""
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"`{what}` must be a dict {{layer: {value}}} or the path of a sensitivity.json; {source!r} is not a file")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"`{what}`: {source!r} is not valid JSON ({err})") from err


def check_layer_names(source: Any, what: str, value: str) -> Mapping[str, Any]:
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
        data = read_json(source, what, "amount")
        if isinstance(data, dict) and "layers" in data and "recommendation" not in data:
            raise ValueError(
                f"`{what}`: {source!r} has no recommendation; run SensitivityAnalysis with `max_metric_drop` (or "
                "`sparsity`) set, or pass a dict"
            )
        if isinstance(data, dict) and isinstance(data.get("recommendation"), dict):
            data = data["recommendation"].get("layer_amounts")
        source = data
    out: dict[str, float] = {}
    for k, v in check_layer_names(source, what, "amount").items():
        check_number(f"{what}[{k!r}]", v, low=0.0, high=1.0, high_inclusive=False)
        out[k[: -len(".weight")] if k.endswith(".weight") else k] = float(v)
    return out


def load_layer_bits(source: str | Mapping[str, Any], what: str = "layer_bits") -> dict[str, str]:
    """Per-layer weight formats from a dict ``{layer: "int8" | "nf4" | "fp4" | "float"}`` or the path of a
    ``sensitivity.json`` (its ``recommendation.layer_bits``). Raises ``ValueError`` naming ``what``."""
    if isinstance(source, str):
        data = read_json(source, what, "format")
        if isinstance(data, dict) and "layers" in data:
            data = (data.get("recommendation") or {}).get("layer_bits")
            if not data:
                raise ValueError(
                    f"`{what}`: {source!r} recommends no formats; run SensitivityAnalysis with `bits` and `max_metric_drop` set"
                )
        source = data
    out: dict[str, str] = {}
    for k, v in check_layer_names(source, what, "format").items():
        check_choice(f"{what}[{k!r}]", v, (*BITS, "float"))
        out[k] = str(v)
    return out
