"""Converting a torch optimizer into its bitsandbytes 8-bit counterpart (no Trainer needed).

8-bit optimizers keep their state (Adam's two moments, momentum, ...) in 8 bits with one float32 absmax per block
of 256 values: about 0.25x the bytes of 32-bit state. Tensors smaller than ``min_size`` keep 32-bit state.

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    opt = to_8bit_optimizer(opt)                 # bitsandbytes AdamW8bit, same param groups and hyper-parameters

A conversion is only made when bitsandbytes computes the same update rule; otherwise :func:`why_not_8bit` says why
(e.g. ``Adam(weight_decay>0)`` adds L2 to the gradient while bitsandbytes' Adam decays decoupled, like AdamW;
bitsandbytes' SGD has no Nesterov momentum and no dampening).

=================  ===============================  ==========================================================
torch optimizer    8-bit counterpart                convertible when
=================  ===============================  ==========================================================
``AdamW``          ``AdamW8bit`` / ``PagedAdamW8bit``  not ``amsgrad``, not ``maximize``
``Adam``           ``Adam8bit`` / ``PagedAdam8bit``    also ``weight_decay == 0`` or ``decoupled_weight_decay``
``SGD``            ``SGD8bit``                      ``momentum > 0``, ``dampening == 0``, not ``nesterov``
``RMSprop``        ``RMSprop8bit``                  ``momentum == 0``, not ``centered``
``Adagrad``        ``Adagrad8bit``                  ``lr_decay == 0``, ``initial_accumulator_value == 0``
``Lion`` (any)     ``Lion8bit`` / ``PagedLion8bit``    param groups with ``lr``, ``betas``, ``weight_decay``
=================  ===============================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_accel._validate import check_bool, check_int
from lightning_accel.errors import UnsupportedOptimizerError  # noqa: F401 (public here too)
from lightning_accel.quantization.bnb import require_bitsandbytes

__all__ = [
    "UnsupportedOptimizerError",
    "to_8bit_optimizer",
    "why_not_8bit",
    "is_8bit_optimizer",
    "has_paged_variant",
    "optimizer_state_bytes",
]


# keys of torch param groups that bitsandbytes does not read (their values are checked before they are dropped)
_TORCH_ONLY = {
    "amsgrad",
    "maximize",
    "foreach",
    "fused",
    "capturable",
    "differentiable",
    "decoupled_weight_decay",
    "momentum",
    "dampening",
    "nesterov",
    "alpha",
    "centered",
    "lr_decay",
    "initial_accumulator_value",
}


def _kind(optimizer: Optimizer) -> str | None:
    cls = type(optimizer)
    for torch_cls, kind in (
        (torch.optim.AdamW, "adamw"),
        (torch.optim.Adam, "adam"),
        (torch.optim.SGD, "sgd"),
        (torch.optim.RMSprop, "rmsprop"),
        (torch.optim.Adagrad, "adagrad"),
    ):
        if cls is torch_cls:
            return kind
    if cls.__name__ == "Lion" or cls.__name__ in ("Lion32bit", "PagedLion", "PagedLion32bit"):
        return "lion"
    return None


def is_8bit_optimizer(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is a bitsandbytes optimizer keeping 8-bit state (never imports bitsandbytes)."""
    args = getattr(optimizer, "args", None)
    return type(optimizer).__module__.startswith("bitsandbytes.optim") and getattr(args, "optim_bits", None) == 8


def has_paged_variant(optimizer: Optimizer) -> bool:
    """Whether the 8-bit counterpart of ``optimizer`` has a paged version (Adam, AdamW and Lion do)."""
    return _kind(optimizer) in ("adam", "adamw", "lion")


def _flag(group: dict[str, Any], key: str) -> bool:
    return bool(group.get(key, False))


def _has_stepped(optimizer: Optimizer) -> bool:
    """Whether the optimizer holds state from a step (torch's Adagrad creates zero state with step 0 up front)."""
    for state in optimizer.state.values():
        step = state.get("step")
        if step is not None:
            if float(step) > 0:
                return True
        elif any(isinstance(v, torch.Tensor) and bool(v.any()) for v in state.values()):
            return True
    return False


def why_not_8bit(optimizer: Optimizer) -> str | None:
    """Why ``optimizer`` cannot be converted by :func:`to_8bit_optimizer`, or ``None`` when it can."""
    name = type(optimizer).__name__
    if is_8bit_optimizer(optimizer):
        return f"{name} already keeps 8-bit state"
    kind = _kind(optimizer)
    if kind is None:
        return (
            f"{name} has no bitsandbytes 8-bit counterpart (supported: torch.optim.Adam, AdamW, SGD with momentum, "
            "RMSprop, Adagrad, and Lion)"
        )
    if _has_stepped(optimizer):
        return f"{name} already has optimizer state (convert it before the first step)"
    for i, g in enumerate(optimizer.param_groups):
        where = f"param group {i} of {name}"
        if _flag(g, "maximize"):
            return f"{where} has maximize=True, which bitsandbytes does not support"
        if kind in ("adam", "adamw") and _flag(g, "amsgrad"):
            return f"{where} has amsgrad=True, which bitsandbytes' 8-bit Adam does not support"
        if kind == "adam" and g.get("weight_decay", 0) and not _flag(g, "decoupled_weight_decay"):
            return (
                f"{where} has weight_decay={g['weight_decay']}: torch Adam adds it to the gradient (L2), bitsandbytes' "
                "Adam8bit decays the weights decoupled like AdamW; use torch.optim.AdamW, or weight_decay=0"
            )
        if kind == "sgd":
            if not g.get("momentum", 0):
                return f"{where} has momentum=0: plain SGD keeps no state, there is nothing to store in 8 bits"
            if _flag(g, "nesterov"):
                return f"{where} has nesterov=True; bitsandbytes' SGD8bit implements plain (heavy-ball) momentum only"
            if g.get("dampening", 0):
                return f"{where} has dampening={g['dampening']}; bitsandbytes' SGD8bit has no dampening"
        if kind == "rmsprop":
            if g.get("momentum", 0):
                return f"{where} has momentum={g['momentum']}; bitsandbytes' RMSprop8bit has no momentum buffer"
            if _flag(g, "centered"):
                return f"{where} has centered=True, which bitsandbytes' RMSprop8bit does not support"
            if not g.get("alpha", 0):
                return f"{where} has alpha=0, which bitsandbytes' RMSprop8bit does not support"
        if kind == "adagrad":
            if g.get("lr_decay", 0):
                return f"{where} has lr_decay={g['lr_decay']}, which bitsandbytes' Adagrad8bit does not support"
            if g.get("initial_accumulator_value", 0):
                return f"{where} has initial_accumulator_value={g['initial_accumulator_value']}, which Adagrad8bit does not support"
        if kind == "lion":
            betas = g.get("betas")
            if "lr" not in g or not isinstance(betas, (tuple, list)) or len(betas) != 2:
                return f"{where} lacks the `lr` / two `betas` a Lion optimizer has"
            if _flag(g, "decoupled_weight_decay") or _flag(g, "use_triton"):
                return f"{where} uses options bitsandbytes' Lion8bit does not have"
    return None


def _group(kind: str, group: dict[str, Any]) -> dict[str, Any]:
    """A param group in bitsandbytes' terms: ``lr``, ``betas``, ``eps``, ``weight_decay`` (+ the group's own keys)."""
    new = {k: v for k, v in group.items() if k not in _TORCH_ONLY}
    if isinstance(new.get("lr"), torch.Tensor):
        new["lr"] = float(new["lr"].item())
    new.setdefault("weight_decay", 0.0)
    if kind == "sgd":
        new["betas"], new["eps"] = (float(group["momentum"]), 0.0), 0.0
    elif kind == "rmsprop":
        new["betas"] = (float(group["alpha"]), 0.0)
    elif kind == "adagrad":
        new["betas"] = (0.0, 0.0)
    elif kind == "lion":
        new["betas"], new["eps"] = tuple(float(b) for b in group["betas"]), 0.0
    else:
        new["betas"] = tuple(float(b) for b in group["betas"])
    return new


def _factory(kind: str, paged: bool) -> Callable[..., Optimizer]:
    optim = require_bitsandbytes().optim
    table = {
        "adamw": optim.PagedAdamW8bit if paged else optim.AdamW8bit,
        "adam": optim.PagedAdam8bit if paged else optim.Adam8bit,
        "sgd": optim.SGD8bit,
        "rmsprop": optim.RMSprop8bit,
        "adagrad": optim.Adagrad8bit,
        "lion": optim.PagedLion8bit if paged else optim.Lion8bit,
    }
    return table[kind]


def to_8bit_optimizer(optimizer: Optimizer, *, paged: bool = False, min_size: int = 4096) -> Optimizer:
    """A bitsandbytes 8-bit optimizer over the same param groups, with the same hyper-parameters.

    The param groups keep their extra keys (``initial_lr`` set by LR schedulers, user keys); re-point LR schedulers
    to the returned optimizer (``scheduler.optimizer = new``).

    Args:
        optimizer: a torch ``Adam``, ``AdamW``, ``SGD`` (with momentum), ``RMSprop``, ``Adagrad`` or a ``Lion``,
            before its first step.
        paged: use the paged variant where one exists (Adam, AdamW, Lion; CUDA unified memory), e.g. ``False``.
        min_size: tensors with fewer elements keep 32-bit state, e.g. ``4096``.

    Returns:
        The new optimizer (``optimizer`` is left as it was).

    Raises:
        ImportError: bitsandbytes is not installed.
        ValueError: a bad argument.
        UnsupportedOptimizerError: the optimizer has no 8-bit counterpart with the same update rule (the message
            says why).
    """
    check_bool("paged", paged)
    check_int("min_size", min_size, low=0)
    reason = why_not_8bit(optimizer)
    if reason is not None:
        raise UnsupportedOptimizerError(reason)
    kind = _kind(optimizer)
    assert kind is not None
    factory = _factory(kind, paged and has_paged_variant(optimizer))
    groups = [_group(kind, g) for g in optimizer.param_groups]
    defaults = groups[0]  # constructor defaults (bitsandbytes validates them); every group keeps its own values
    kwargs: dict[str, Any] = {"lr": defaults["lr"], "weight_decay": defaults["weight_decay"], "min_8bit_size": min_size}
    if kind in ("adam", "adamw", "lion"):
        kwargs["betas"] = defaults["betas"]
    if kind in ("adam", "adamw", "rmsprop", "adagrad"):
        kwargs["eps"] = defaults["eps"]
    if kind == "sgd":
        kwargs["momentum"] = defaults["betas"][0]
    if kind == "rmsprop":
        kwargs["alpha"] = defaults["betas"][0]
    return factory(groups, **kwargs)


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` (shared tensors, such as 8-bit code tables, counted once)."""
    seen: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for state in optimizer.state.values():
        visit(state)
    return total
