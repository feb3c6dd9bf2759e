"""Optimizer state after pruning: :func:`slice_optimizer_` re-binds an optimizer's parameters to the pruned ones in
place and slices their state (momentum, Adam moments, bitsandbytes' block-wise 8-bit state) to the kept indices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_accel.pruning.apply import ParamSlice

__all__ = ["slice_optimizer_"]


_BNB_BLOCK = 256  # bitsandbytes' block-wise 8-bit optimizer state: one absmax per 256 values of the flattened tensor


def _slice_state(state: Mapping[str, Any], s: ParamSlice) -> dict[str, Any] | None:
    """``state`` of the parameter ``s.old`` indexed like ``s.new``; ``None`` where it cannot be (its tensors are
    neither shaped like the parameter nor scalars, e.g. per-tensor 8-bit state). Block-wise 8-bit state
    (bitsandbytes' ``state1``/``absmax1``/``qmap1``) is dequantized, sliced and quantized again in new blocks."""
    if s.ops is None:
        return None
    out: dict[str, Any] = {}
    for k, v in state.items():
        if k.startswith(("absmax", "qmap")) and f"state{k[6:] if k.startswith('absmax') else k[4:]}" in state:
            continue  # written with its state tensor below
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == s.old.shape:
            n = k[len("state"):] if k.startswith("state") else None
            blockwise = v.dtype == torch.uint8 and f"absmax{n}" in state and f"qmap{n}" in state
            if v.dtype == torch.uint8 and not blockwise:
                return None
            if blockwise:
                import bitsandbytes.functional as bnbf

                code = state[f"qmap{n}"]
                v = bnbf.dequantize_blockwise(v, absmax=state[f"absmax{n}"], code=code, blocksize=_BNB_BLOCK)
            for dim, keep in s.ops:
                v = torch.index_select(v, dim, keep.to(v.device))
            v = v.contiguous()
            if blockwise:
                v, qstate = bnbf.quantize_blockwise(v, code=code, blocksize=_BNB_BLOCK)
                out[f"absmax{n}"], out[f"qmap{n}"] = qstate.absmax, code
            out[k] = v
        elif isinstance(v, torch.Tensor) and v.numel() > 1:
            return None  # state of another shape: it cannot be sliced
        else:
            out[k] = v
    return out


def slice_optimizer_(optimizer: torch.optim.Optimizer, slices: Sequence[ParamSlice], *, reset: bool = False) -> list[str]:
    """Re-bind ``optimizer`` to the pruned parameters in place and slice their state to the kept indices.

    ``param_groups[i]["params"]`` is edited in place, so LR schedulers and hyper-parameters are untouched.
    State tensors shaped like the parameter (momentum, ``exp_avg``, ``exp_avg_sq``) are indexed like the
    parameter; scalars (``step``) are kept.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (bitsandbytes' included).
        slices: :attr:`PruningResult.slices`.
        reset: drop the state of re-bound parameters instead (the optimizer restarts their statistics).

    Returns:
        Names of parameters whose state could not be sliced and was dropped (e.g. per-tensor 8-bit
        state); empty when everything was sliced.
    """
    by_old = {id(s.old): s for s in slices}
    dropped = []
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            s = by_old.get(id(p))
            if s is None:
                continue
            params[i] = s.new
            state = optimizer.state.pop(p, None)
            if not state or reset:
                continue
            new_state = _slice_state(state, s)
            if new_state is None:
                dropped.append(s.name)
            else:
                optimizer.state[s.new] = new_state
    return dropped
