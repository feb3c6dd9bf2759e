"""Per-layer settings given as a dict or as the path of a ``sensitivity.json``: the reading and checking that
pruning's ``layer_amounts`` and the sensitivity analysis share. It imports nothing of the package but the argument
checks, so both sides use it without an import cycle."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_accel._validate import check_number

__all__ = ["check_layer_names", "load_layer_amounts", "read_layer_json"]


def read_layer_json(source: str, what: str, value: str) -> Any:
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
        data = read_layer_json(source, what, "amount")
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
