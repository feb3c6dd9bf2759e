"""What AutoCompress decides, as plain data and pure functions (no Trainer, no timing).

The inputs are measurements (:mod:`lightning_accel.auto.measure` takes them on the model):

* per prunable group (a torch-pruning group: channels of a convolution stack, neurons of an MLP, heads of an
  attention module), the metric drop and the model's MACs and parameters when that group alone loses each
  candidate fraction of its units (:class:`GroupCost`);
* a :class:`LatencyModel` of the deployed runtime at the deployed batch size: latency as ``fixed + per_mac * MACs``,
  fitted to the float file of the unpruned model and of a uniformly pruned copy, the int8 file's ratio to the float
  one, and the fp32 eager latency of the uncompressed model the speed-up is counted against;
* the goal (``speedup`` and/or ``smaller``).

:func:`choose_amounts` picks per-group amounts greedily: the step (one group to its next candidate amount) that buys
the most of what the goal still lacks per unit of predicted metric drop, until the predicted MACs and parameters
reach their targets or no group can go further (``max_amount``). :func:`plan_targets` turns the goal into those
targets, deciding int8 first (it is taken when the measured int8 file is faster than the float one here, or when
the size goal needs it). The caller re-counts the MACs of the real pruned model (groups interact: two pruned
neighbours shrink the layer between them twice) and calls again with corrected targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "GOAL_KEYS",
    "INT8_FASTER",
    "AutoPlan",
    "GroupCost",
    "LatencyModel",
    "Targets",
    "choose_amounts",
    "plan_targets",
    "predicted",
    "speedup_of",
]

#: what a goal may name: ``speedup`` (deployed file vs the fp32 eager model, at ``batch_size``), ``smaller`` (stored bytes)
GOAL_KEYS: tuple[str, ...] = ("speedup", "smaller")

#: int8 is taken for speed only when its file is at least this much faster than the float file (timing noise)
INT8_FASTER = 0.95

#: bytes per weight of an int8 layer (weight plus per-channel scales), relative to fp32's 4
_INT8_BYTES = 1.05


@dataclass
class GroupCost:
    """One prunable group: its metric drop, the model's MACs and parameters with it alone pruned, per amount."""

    key: str
    kind: str
    units: int
    drop: dict[str, float]  # amount ("0.5") -> drop of the metric (positive: worse)
    macs: dict[str, int]  # amount -> MACs of the whole model with this group alone pruned
    params: dict[str, int]  # amount -> parameters of the whole model with this group alone pruned


@dataclass
class LatencyModel:
    """The deployed runtime's latency at one batch size, in milliseconds, as a function of the model's MACs."""

    runtime: str  # "onnx", "openvino", "aoti" or "eager" (what was timed)
    batch_size: int
    eager_ms: float  # the uncompressed model, fp32 eager: what the speed-up is counted against
    float_ms: float  # the uncompressed model's float file
    fixed_ms: float
    ms_per_mmac: float  # per million MACs (of one sample's forward)
    int8_ratio: float | None  # int8 file / float file of the pruned copy; None: not measured
    base_macs: int
    points: list[dict[str, Any]] = field(default_factory=list)  # what was timed: macs, float_ms, int8_ms, spread

    def float_latency(self, macs: float) -> float:
        return max(self.fixed_ms + self.ms_per_mmac * macs / 1e6, 1e-6)

    def latency(self, macs: float, int8: bool) -> float:
        ms = self.float_latency(macs)
        return ms * self.int8_ratio if int8 and self.int8_ratio is not None else ms

    @property
    def int8_faster(self) -> bool:
        return self.int8_ratio is not None and self.int8_ratio < INT8_FASTER


@dataclass
class Targets:
    """What the pruning must reach: the model's MACs and parameters at most (``None``: no bound), with int8 or not."""

    int8: bool
    macs: float | None
    params: float | None
    why_int8: str
    limits: list[str] = field(default_factory=list)  # goals no pruning can reach, said before training


@dataclass
class AutoPlan:
    """The recipe: per group amount, int8 or not, and what was predicted. JSON-able (:meth:`to_dict`)."""

    goal: dict[str, float]
    batch_size: int
    amounts: dict[str, float]
    int8: bool
    why_int8: str
    predicted: dict[str, Any]
    groups: dict[str, dict[str, Any]]
    latency: dict[str, Any]
    limits: list[str]
    measured_seconds: float = 0.0
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AutoPlan:
        if not isinstance(data, Mapping) or data.get("version") != 1:
            raise ValueError(f"not an AutoCompress plan of version 1: {str(data)[:120]!r}")
        known = {f for f in cls.__dataclass_fields__}
        missing = sorted(known - set(data) - {"measured_seconds", "version"})
        if missing:
            raise ValueError(f"an AutoCompress plan lacks {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})


def _key(a: float) -> str:
    return f"{a:g}"


def _levels(group: GroupCost, max_amount: float) -> list[float]:
    return [0.0] + sorted(float(a) for a in group.drop if 0.0 < float(a) <= max_amount + 1e-9)


def _monotone_drop(group: GroupCost, levels: Sequence[float]) -> dict[float, float]:
    """The group's drop per level, never smaller than at a lower level (a noisy measurement does not make a
    larger cut look free), and never negative."""
    out, worst = {}, 0.0
    for a in levels:
        worst = max(worst, float(group.drop.get(_key(a), 0.0)) if a > 0 else 0.0)
        out[a] = worst
    return out


def predicted(
    groups: Mapping[str, GroupCost], amounts: Mapping[str, float], base_macs: int, base_params: int
) -> tuple[float, float, float]:
    """MACs, parameters and metric drop of ``amounts``, each group's saving and drop added as measured alone."""
    macs, params, drop = float(base_macs), float(base_params), 0.0
    for key, a in amounts.items():
        if a <= 0:
            continue
        g = groups[key]
        macs -= base_macs - g.macs[_key(a)]
        params -= base_params - g.params[_key(a)]
        drop += max(0.0, float(g.drop[_key(a)]))
    return max(macs, 0.0), max(params, 0.0), drop


def plan_targets(
    goal: Mapping[str, float],
    latency: LatencyModel | None,
    base_params: int,
    quantizable_fraction: float,
    int8_allowed: bool,
) -> Targets:
    """The MACs and parameters the pruning must reach for ``goal``, and whether int8 is used.

    int8 is used when allowed and its file is faster than the float file here (``latency.int8_ratio`` below
    :data:`INT8_FASTER`), or, for a size goal, when the float model would have to lose more than the goal asks
    otherwise. ``quantizable_fraction`` is the share of parameters int8 stores in one byte (Linear/Conv weights).
    """
    limits: list[str] = []
    int8, why = False, "not allowed (`techniques` leaves out 'int8')" if not int8_allowed else ""
    if int8_allowed:
        if latency is not None and latency.int8_ratio is not None:
            if latency.int8_faster:
                int8, why = True, f"the int8 file ran {1 / latency.int8_ratio:.2f}x faster than the float file here"
            else:
                why = f"the int8 file ran at {1 / latency.int8_ratio:.2f}x of the float file here (not faster)"
        elif "speedup" in goal:
            why = "int8 was not timed here"
        if "smaller" in goal and not int8:
            int8 = True
            why = (why + "; " if why else "") + "taken for the size goal"
    targets = Targets(int8=int8, macs=None, params=None, why_int8=why, limits=limits)
    if "speedup" in goal:
        if latency is None:
            limits.append("speed: no latency model (nothing timed)")
        else:
            want_ms = latency.eager_ms / float(goal["speedup"])
            q = latency.int8_ratio if int8 and latency.int8_ratio is not None else 1.0
            float_ms = want_ms / q
            if latency.ms_per_mmac <= 0:
                if latency.float_latency(latency.base_macs) * q > want_ms:
                    limits.append(
                        f"speed: pruning did not make the {latency.runtime} file faster at batch {latency.batch_size} "
                        "(latency does not follow MACs here)"
                    )
                targets.macs = None if latency.float_latency(latency.base_macs) * q <= want_ms else 0.0
            else:
                need = (float_ms - latency.fixed_ms) / latency.ms_per_mmac * 1e6
                if need <= 0:
                    limits.append(
                        f"speed: the {latency.runtime} file's fixed cost ({latency.fixed_ms:.3g} ms at batch "
                        f"{latency.batch_size}) is above the {want_ms:.3g} ms the goal allows"
                    )
                targets.macs = max(need, 0.0)
    if "smaller" in goal:
        float_bytes = 4.0 * base_params
        want = float_bytes / float(goal["smaller"])
        per_param = 4.0 * ((1 - quantizable_fraction) + quantizable_fraction * _INT8_BYTES / 4.0) if int8 else 4.0
        targets.params = want / per_param
    return targets


def choose_amounts(
    groups: Mapping[str, GroupCost],
    base_macs: int,
    base_params: int,
    targets: Targets,
    max_amount: float,
    fixed: Mapping[str, float] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Per-group amounts reaching ``targets`` at the lowest predicted drop (greedy), and the limits that stopped it.

    Each step raises one group to its next candidate amount: the one with the largest share of the missing MACs
    and parameters bought per unit of predicted drop. ``fixed`` holds groups at an amount (AutoCompress backing off).
    """
    fixed = dict(fixed or {})
    amounts = {k: float(fixed.get(k, 0.0)) for k in groups}
    levels = {k: _levels(g, max_amount) for k, g in groups.items()}
    drops = {k: _monotone_drop(g, levels[k]) for k, g in groups.items()}

    def missing(macs: float, params: float) -> tuple[float, float]:
        m = max(0.0, macs - targets.macs) if targets.macs is not None else 0.0
        p = max(0.0, params - targets.params) if targets.params is not None else 0.0
        return m, p

    limits: list[str] = []
    while True:
        macs, params, _ = predicted(groups, amounts, base_macs, base_params)
        miss_m, miss_p = missing(macs, params)
        if miss_m <= 0 and miss_p <= 0:
            return amounts, limits
        best: tuple[float, str, float] | None = None
        for key, g in groups.items():
            if key in fixed:
                continue
            here = amounts[key]
            higher = [a for a in levels[key] if a > here + 1e-9]
            if not higher:
                continue
            nxt = higher[0]
            gain_m = (g.macs[_key(here)] if here > 0 else base_macs) - g.macs[_key(nxt)]
            gain_p = (g.params[_key(here)] if here > 0 else base_params) - g.params[_key(nxt)]
            gain = (min(gain_m, miss_m) / miss_m if miss_m > 0 else 0.0) + (min(gain_p, miss_p) / miss_p if miss_p > 0 else 0.0)
            if gain <= 0:
                continue
            cost = max(drops[key][nxt] - drops[key][here], 0.0) + 1e-4 * (nxt - here)  # ties: the smaller cut
            score = gain / cost
            if best is None or score > best[0] + 1e-12:
                best = (score, key, nxt)
        if best is None:
            if miss_m > 0:
                limits.append(
                    f"speed: every group at its largest allowed amount (`max_layer_amount`={max_amount:g}) leaves "
                    f"{macs / 1e6:.3g}M MACs, above the {float(targets.macs or 0) / 1e6:.3g}M the goal needs"
                )
            if miss_p > 0:
                limits.append(
                    f"size: every group at its largest allowed amount (`max_layer_amount`={max_amount:g}) leaves "
                    f"{params:,.0f} parameters, above the {float(targets.params or 0):,.0f} the goal needs"
                )
            return amounts, limits
        amounts[best[1]] = best[2]


def speedup_of(latency: LatencyModel, macs: float, int8: bool) -> float:
    """Predicted speed-up of the deployed file over the fp32 eager model."""
    return latency.eager_ms / latency.latency(macs, int8)

