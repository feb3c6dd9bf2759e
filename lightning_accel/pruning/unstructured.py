"""Unstructured pruning as plain functions on a ``torch.nn.Module``, usable without a Trainer.

A *mask* is a tensor shaped like the weight it masks: nonzero (``True`` / ``1``) keeps an entry, zero prunes
it. Masks are keyed by the parameter's qualified name (``"blocks.0.conv1.weight"``), so they survive
``state_dict`` round trips and need no hooks, parametrizations or extra buffers in the model: pruning
only writes zeros into the weights, and the model's ``state_dict`` keys never change.

    masks = prune_(model, 0.8)                       # 80% of all Linear/Conv weights (but the head) are zero
    masks = prune_(model, 0.9, masks=masks)          # 90%, keeping the first 80% pruned (nested masks)

Selection is exact: ``round(amount * n)`` entries are pruned (per layer with ``scope="layer"``, over all
selected weights together with ``scope="global"``), ties broken deterministically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_accel._select import DEFAULT_PRUNABLE, select_modules
from lightning_accel._validate import check_bool, check_choice, check_number, check_patterns

__all__ = [
    "CRITERIA",
    "REGULARIZATIONS",
    "SCOPES",
    "apply_masks_",
    "broadcast_masks",
    "compute_masks",
    "compute_masks_with_counts",
    "count_kept",
    "mask_grads_",
    "mask_sparsity",
    "pack_mask",
    "prunable_parameters",
    "prune_",
    "regularize_grads_",
    "unpack_mask",
]

Criterion = Literal["magnitude", "random"]
Scope = Literal["global", "layer"]
Regularization = Literal["none", "l1", "l2"]
CRITERIA: tuple[str, ...] = ("magnitude", "random")
SCOPES: tuple[str, ...] = ("global", "layer")
REGULARIZATIONS: tuple[str, ...] = ("none", "l1", "l2")

# Above this many candidates, the lowest scores are found from a bound estimated on a strided sample (one
# pass to gather the candidates below it, then an exact top-k among them) instead of one top-k over all.
_SAMPLED_SELECTION_MIN = 1 << 16
_SAMPLE = 1 << 14
_BIG = torch.finfo(torch.float32).max


def prunable_parameters(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    prune_head: bool = False,
) -> dict[str, nn.Parameter]:
    """The ``weight`` parameters unstructured pruning acts on, by qualified parameter name.

    Args:
        model: the model.
        modules: glob patterns on qualified module names or class names, e.g. ``["blocks.*.mlp.*"]``;
            ``None`` selects every ``Linear`` and ``Conv1d/2d/3d``.
        exclude: glob patterns removed from the selection, e.g. ``["stem.*"]``.
        prune_head: also select the output layer (the last Linear/Conv) when ``modules`` is ``None``.

    Returns:
        ``{"<module name>.weight": parameter}`` in registration order. Biases and norm layers are never
        selected.

    Raises:
        NoMatchError: a pattern matches no Linear/Conv module (the message lists module names), or nothing
            is left to prune.
        ValueError: a selected weight is not a floating-point tensor.
    """
    selected = select_modules(model, modules, exclude, types=DEFAULT_PRUNABLE, include_output=prune_head)
    params: dict[str, nn.Parameter] = {}
    for name, module in selected.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) has no floating-point `weight` to prune "
                f"(got {type(weight).__name__}); exclude it with `exclude=[{name!r}]`"
            )
        params[f"{name}.weight"] = weight  # type: ignore[assignment]
    return params


def _check_amount(amount: float) -> None:
    check_number("amount", amount, low=0.0, high=1.0, high_inclusive=False)


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` lowest entries of the 1-D ``scores``; exact and deterministic. Excluded entries
    (scored at the float maximum) are only chosen if ``k`` exceeds the others."""
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if n <= _SAMPLED_SELECTION_MIN or 4 * k > n:
        return torch.topk(scores, k, largest=False, sorted=False).indices
    # Bound the k-th value from above with a strided sample, gather the few candidates below the bound in
    # one pass, and pick exactly k among them: O(n) with a small constant instead of a top-k over all n.
    sample = scores[:: max(1, n // _SAMPLE)]
    m = sample.numel()
    rank = min(m, int(m * k / n * 1.5) + 16)
    while True:
        bound = torch.kthvalue(sample, rank).values
        candidates = torch.nonzero(scores <= bound).squeeze(1)
        if candidates.numel() >= k:
            break
        if rank == m:  # the bound is the sample maximum but not the true one: take everything
            return torch.topk(scores, k, largest=False, sorted=False).indices
        rank = min(m, 2 * rank)
    picked = torch.topk(scores[candidates], k, largest=False, sorted=False).indices
    return candidates[picked]


def _scores_into(weight: Tensor, criterion: str, generator: torch.Generator | None, out: Tensor) -> None:
    """Write the flat float32 pruning scores of ``weight`` (lowest is pruned first) into ``out``."""
    if criterion == "random":
        # drawn on the CPU so that a seeded generator gives the same masks on every device
        out.copy_(torch.rand(weight.numel(), generator=generator))
    elif weight.dtype == torch.float32 and weight.is_contiguous():
        torch.abs(weight.detach().reshape(-1), out=out)
    else:
        out.copy_(weight.detach().reshape(-1)).abs_()


def count_kept(keep: Tensor) -> int:
    """Nonzero entries of a float {0, 1} mask; float32 sums are exact up to 2**24 entries (and much faster
    than ``count_nonzero`` on floats), float64 beyond."""
    return round(float(keep.sum() if keep.numel() <= 1 << 24 else keep.sum(dtype=torch.float64)))


@torch.no_grad()
def compute_masks(
    weights: Mapping[str, Tensor],
    amount: float,
    *,
    criterion: Criterion = "magnitude",
    scope: Scope = "global",
    masks: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = torch.bool,
) -> dict[str, Tensor]:
    """Masks that prune ``amount`` of ``weights``, without changing anything.

    Args:
        weights: tensors to score, by name, e.g. ``prunable_parameters(model)``.
        amount: fraction of entries to prune, ``0 <= amount < 1``, e.g. ``0.9``: ``round(amount * n)``
            entries over all weights (``scope="global"``) or in each weight (``scope="layer"``).
        criterion: ``"magnitude"`` prunes the smallest ``|w|``; ``"random"`` prunes uniformly at random.
        scope: ``"global"`` ranks all weights together (layers end at different sparsities);
            ``"layer"`` gives every weight the same sparsity.
        masks: previous masks (nonzero keeps), e.g. the result of an earlier call. Entries they pruned stay
            pruned (masks are nested), so the reached sparsity is ``max(amount, previous sparsity)``.
        generator: the random source of ``criterion="random"`` (a CPU generator), e.g.
            ``torch.Generator().manual_seed(0)``.
        dtype: dtype of the returned masks, e.g. ``torch.bool``; ``None``: each weight's dtype (``1``
            keeps, ``0`` prunes), the fast form for multiplying in place.

    Returns:
        ``{name: mask}`` shaped like each weight, nonzero (``True``) where the entry is kept.

    Raises:
        ValueError: a bad ``amount``, ``criterion`` or ``scope``; a mask whose shape differs from its weight.
    """
    _check_amount(amount)
    check_choice("criterion", criterion, CRITERIA)
    check_choice("scope", scope, SCOPES)
    return compute_masks_with_counts(weights, amount, criterion, scope, masks, generator, dtype)[0]


def compute_masks_with_counts(
    weights: Mapping[str, Tensor],
    amount: float,
    criterion: str,
    scope: str,
    masks: Mapping[str, Tensor] | None,
    generator: torch.Generator | None,
    dtype: torch.dtype | None,
    kept: Mapping[str, int] | None = None,
    layer_amounts: Mapping[str, float] | None = None,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """:func:`compute_masks` without the argument checks, for callers that prune repeatedly: also takes and
    returns the kept entries per weight (``kept``: those of ``masks``, when the caller knows them, saving a
    pass over the masks). ``layer_amounts`` (``{weight name: amount}``) gives weights their own amount (the
    others keep ``amount``) and implies ``scope="layer"``. Returns ``(masks, kept)``."""
    names = list(weights)
    # keep masks as flat float32 {0, 1}: bool kernels are several times slower on CPUs
    keep: dict[str, Tensor] = {}
    for name in names:
        w = weights[name]
        prev = None if masks is None else masks.get(name)
        if prev is None:
            keep[name] = torch.ones(w.numel(), dtype=torch.float32, device=w.device)
        elif prev.shape != w.shape:
            raise ValueError(f"mask of {name!r} has shape {tuple(prev.shape)}, its weight {tuple(w.shape)}")
        else:
            keep[name] = prev.detach().reshape(-1).to(device=w.device, dtype=torch.float32, copy=True).ne_(0.0)
    kept = {name: count_kept(keep[name]) for name in names} if kept is None else dict(kept)

    def scores_into(name: str, out: Tensor) -> None:
        _scores_into(weights[name], criterion, generator, out)
        # already pruned: pushed to the float maximum (never chosen again); survivors' scores stay exact
        out.add_(keep[name].mul(-_BIG).add_(_BIG))

    if scope == "layer" or layer_amounts is not None:
        for name in names:
            n = keep[name].numel()
            a = amount if layer_amounts is None else layer_amounts.get(name, amount)
            extra = round(a * n) - (n - kept[name])
            if extra > 0:
                scores = torch.empty(n, dtype=torch.float32, device=keep[name].device)
                scores_into(name, scores)
                keep[name][_lowest(scores, extra)] = 0.0
                kept[name] -= extra
    elif names:
        sizes = [keep[n].numel() for n in names]
        total = sum(sizes)
        extra = round(amount * total) - (total - sum(kept.values()))
        if extra > 0:
            flat = torch.empty(total, dtype=torch.float32, device=keep[names[0]].device)
            for name, part in zip(names, flat.split(sizes)):
                scores_into(name, part)
            chosen = _lowest(flat, extra)
            offset = 0
            for name, n in zip(names, sizes):
                local = chosen[(chosen >= offset) & (chosen < offset + n)] - offset
                keep[name][local.to(keep[name].device)] = 0.0
                kept[name] -= local.numel()
                offset += n
    out = {name: keep[name].reshape(weights[name].shape).to(weights[name].dtype if dtype is None else dtype) for name in names}
    return out, kept


@torch.no_grad()
def apply_masks_(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned entries of ``weights`` in place.

    Args:
        weights: tensors or parameters by name, e.g. ``prunable_parameters(model)``.
        masks: masks by name (any dtype; nonzero keeps), e.g. the result of :func:`compute_masks`. Masks in
            the weight's own dtype and device take the fast path (one fused multiply); others are converted.

    Raises:
        KeyError: a mask names a weight missing from ``weights``.
    """
    ws, ms = [], []
    for name, mask in masks.items():
        w = weights[name]
        ws.append(w.data if isinstance(w, nn.Parameter) else w)
        ms.append(mask if mask.dtype == w.dtype and mask.device == w.device else mask.to(device=w.device, dtype=w.dtype))
    if ws:
        torch._foreach_mul_(ws, ms)


@torch.no_grad()
def mask_grads_(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero the gradients of pruned entries in place, so optimizer momentum of pruned entries stays zero.

    Args:
        params: parameters by name, e.g. ``prunable_parameters(model)``; those without a gradient are skipped.
        masks: masks by name (nonzero keeps), e.g. the result of :func:`compute_masks`.

    Raises:
        KeyError: a mask names a parameter missing from ``params``.
    """
    gs, ms = [], []
    for name, mask in masks.items():
        g = params[name].grad
        if g is not None:
            gs.append(g)
            ms.append(mask if mask.dtype == g.dtype and mask.device == g.device else mask.to(device=g.device, dtype=g.dtype))
    if gs:
        torch._foreach_mul_(gs, ms)


@torch.no_grad()
def regularize_grads_(params: Mapping[str, Tensor], kind: Regularization, strength: float) -> None:
    """Add the gradient of a sparsity-inducing penalty to ``params``' gradients in place.

    Args:
        params: parameters by name, e.g. ``prunable_parameters(model)``; those without a gradient are skipped.
        kind: ``"l1"``: ``strength * sum |w|`` (adds ``strength * sign(w)``); ``"l2"``:
            ``strength / 2 * sum w**2`` (adds ``strength * w``); ``"none"`` does nothing. E.g. ``"l1"``.
        strength: the penalty's coefficient, ``>= 0``, e.g. ``1e-5``.

    The training loss itself is untouched.

    Raises:
        ValueError: a bad ``kind`` or a negative ``strength``.
    """
    check_choice("regularization", kind, REGULARIZATIONS)
    check_number("regularization_strength", strength, low=0.0)
    if kind == "none" or strength == 0.0:
        return
    pairs = [(p.grad, p.detach()) for p in params.values() if p.grad is not None]
    if not pairs:
        return
    grads, ws = [g for g, _ in pairs], [w for _, w in pairs]
    direction = torch._foreach_sign(ws) if kind == "l1" else ws
    torch._foreach_add_(grads, direction, alpha=strength)


def mask_sparsity(masks: Mapping[str, Tensor]) -> float:
    """Fraction of pruned (zero) entries over all ``masks`` together (``0.0`` for none).

    Args:
        masks: masks by name (nonzero keeps), e.g. ``prune_(model, 0.5)``.
    """
    total = sum(m.numel() for m in masks.values())
    if not total:
        return 0.0
    kept = sum(int(torch.count_nonzero(m)) for m in masks.values())
    return 1.0 - kept / total


def prune_(
    model: nn.Module,
    amount: float,
    criterion: Criterion = "magnitude",
    scope: Scope = "global",
    modules: list[str] | None = None,
    exclude: list[str] | None = None,
    prune_head: bool = False,
    *,
    masks: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Prune ``model`` in place: zero a fraction ``amount`` of its selected weights and return the masks.

    No hooks, parametrizations or buffers are added; the model's ``state_dict`` keys stay the same.

    Args:
        model: any ``torch.nn.Module``.
        amount: final fraction of the selected weights that are zero, ``0 <= amount < 1``, e.g. ``0.8``.
        criterion: ``"magnitude"`` (smallest ``|w|`` first) or ``"random"``, e.g. ``"magnitude"``.
        scope: ``"global"`` (one ranking over all selected weights) or ``"layer"`` (each weight pruned to
            ``amount``), e.g. ``"global"``.
        modules: glob patterns on qualified module names, e.g. ``["blocks.*"]``; ``None``: every Linear
            and Conv layer but the output layer.
        exclude: glob patterns removed from the selection, e.g. ``["blocks.0.*"]``.
        prune_head: also prune the output layer, e.g. ``False``.
        masks: masks of an earlier call; what they pruned stays pruned, e.g. ``masks=prune_(model, 0.5)``.
        generator: CPU generator for ``criterion="random"``, e.g. ``torch.Generator().manual_seed(0)``.

    Returns:
        ``{"<module>.weight": bool mask}``, ``True`` where the weight is kept.

    Raises:
        ValueError: a bad argument.
        NoMatchError: a pattern matches no Linear/Conv module, or nothing is left to prune.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> masks = prune_(model, 0.5)
        >>> float((model[0].weight == 0).float().mean())
        0.5
    """
    _check_amount(amount)
    check_choice("criterion", criterion, CRITERIA)
    check_choice("scope", scope, SCOPES)
    check_patterns("modules", modules)
    check_patterns("exclude", exclude)
    check_bool("prune_head", prune_head)
    params = prunable_parameters(model, modules, exclude, prune_head=prune_head)
    new = compute_masks(params, amount, criterion=criterion, scope=scope, masks=masks, generator=generator)
    apply_masks_(params, new)
    return new


# ------------------------------------------------------------------ masks in checkpoints and across ranks
def broadcast_masks(masks: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Rank 0's masks on every rank (one collective on the masks' device), and whether a broadcast happened
    (not without a process group of 2 or more)."""
    dist = torch.distributed
    if not masks or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return masks, False
    names = list(masks)
    flat = torch.cat([masks[n].reshape(-1).to(torch.uint8) for n in names])
    dist.broadcast(flat, src=0)
    parts = flat.split([masks[n].numel() for n in names])
    return {n: part.reshape(masks[n].shape).to(masks[n].dtype) for n, part in zip(names, parts)}, True


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> dict[str, Any]:
    """A mask as 1 bit per entry (a fp32 weight's mask costs 1/32 of the weight in the checkpoint)."""
    flat = (mask.detach().reshape(-1) != 0).cpu().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    packed = (flat.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)
    return {"shape": list(mask.shape), "bits": packed}


def unpack_mask(packed: dict[str, Any]) -> Tensor:
    """The bool mask :func:`pack_mask` packed."""
    shape = torch.Size(packed["shape"])
    bits = packed["bits"].to(torch.uint8).unsqueeze(1).bitwise_and(_BITS).ne(0).reshape(-1)
    return bits[: shape.numel()].reshape(shape)
