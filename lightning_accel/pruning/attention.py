"""Attention layouts structured pruning knows: finding attention modules (an int head count and ``qkv`` or
``q``/``k``/``v`` Linear layers, ``nn.MultiheadAttention``), refusing unknown layouts before any pruning
(:func:`unknown_attention`, :func:`check_attention_layouts`), and keeping head counts, head sizes and Hugging Face
``config`` objects in step with pruned projections (:func:`set_heads`, :func:`sync_configs_`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeGuard

import torch
from torch import nn

from lightning_accel.errors import StructuredPruningError
from lightning_accel.pruning.tracing import resolve_exclude

__all__ = [
    "check_attention_layouts",
    "find_attention",
    "head_count",
    "set_heads",
    "sync_configs_",
    "unknown_attention",
]


#: Names of an attention module's query/key/value Linear layers: one fused ``qkv``, or one Linear each.
_QKV_NAMES = (("qkv",), ("q", "k", "v"), ("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))
#: Attribute names of an attention module's head count, head size and total width (heads x head size), in the
#: spellings of timm (``num_heads``, ``head_dim``, ``attn_dim``), Hugging Face BERT/RoBERTa (``num_attention_heads``,
#: ``attention_head_size``, ``all_head_size``), Hugging Face ViT (``num_attention_heads``, ``head_dim``), DistilBERT
#: (``n_heads``), T5 (``n_heads``, ``key_value_proj_dim``, ``inner_dim``) and nanoGPT-style code (``n_head``).
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
_ALL_HEADS_ATTRS = ("attn_dim", "all_head_size", "inner_dim")
#: Head counts that make a module look like attention when its layout is not one of the known ones.
_LOOKS_LIKE_HEADS = (*_HEAD_ATTRS, "heads", "nhead", "num_kv_heads", "num_key_value_heads")
#: Grouped-query attention: fewer key/value heads than query heads (not supported: refused).
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _heads_attr(m: nn.Module) -> str | None:
    """The name of ``m``'s head-count attribute (an int >= 1), or ``None``."""
    for name in _HEAD_ATTRS:
        value = m.__dict__.get(name)
        if _is_count(value) and value >= 1:
            return name
    return None


def _layout_problem(m: nn.Module) -> str | None:
    """Why ``m`` (a module with a head count) is not an attention layout this module can prune; ``None`` if it is."""
    attr = _heads_attr(m)
    if attr is None:
        return "no int `num_heads` / `num_attention_heads` / `n_heads` attribute"
    heads = int(getattr(m, attr))
    layers = _qkv_layers(m)
    if not layers:
        names = " / ".join("+".join(n) for n in _QKV_NAMES)
        return f"no query/key/value Linear layers under the known names ({names})"
    for kv in _KV_HEAD_ATTRS:
        value = m.__dict__.get(kv)
        if isinstance(value, int) and value != heads:
            return f"grouped-query attention (`{kv}`={value} != `{attr}`={heads})"
    widths = {layer.out_features for layer in layers}
    if len(widths) != 1:
        return f"query/key/value widths differ ({sorted(widths)})"
    width = _qkv_width(layers)
    if len(layers) == 1 and layers[0].out_features % 3:
        return f"fused `qkv` width {layers[0].out_features} is not a multiple of 3"
    if width % heads:
        return f"projection width {width} is not a multiple of `{attr}`={heads}"
    for name in _HEAD_DIM_ATTRS:
        value = m.__dict__.get(name)
        if isinstance(value, int) and value * heads != width:
            return f"`{name}`={value} x `{attr}`={heads} != projection width {width}"
    return None


def find_attention(model: nn.Module) -> dict[str, tuple[nn.Module, list[nn.Module]]]:
    """Attention modules of a known layout: an int head count (:data:`_HEAD_ATTRS`) and a fused ``qkv`` Linear
    (or separate query/key/value Linears, :data:`_QKV_NAMES`) of matching widths."""
    found: dict[str, tuple[nn.Module, list[nn.Module]]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) or _heads_attr(m) is None:
            continue
        if _layout_problem(m) is None:
            found[name] = (m, list(_qkv_layers(m)))
    return found


def unknown_attention(model: nn.Module, exclude: Sequence[str] | None = None) -> dict[str, str]:
    """Modules that look like multi-head attention (a head count above one and Linear layers of their own) but
    whose layout structured pruning does not know, ``{name: reason}``; modules matched by ``exclude`` (or inside
    one) are left out. Pruning their channels would mix heads, so they are refused before any pruning.

    Known layouts: ``nn.MultiheadAttention``; a module with an int ``num_heads`` / ``num_attention_heads`` /
    ``n_heads`` / ``n_head``, a fused ``qkv`` Linear or ``q``/``k``/``v`` (``q_proj``..., ``query``..., ``q_lin``...)
    Linears of equal width, and, if it keeps them, a head size (``head_dim``, ``attention_head_size``,
    ``head_size``) and total width (``attn_dim``, ``all_head_size``) that agree with those widths.
    """
    excluded, _ = resolve_exclude(model, exclude)
    known = {id(m) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    known.update(id(m) for _, (m, _) in find_attention(model).items())
    problems: dict[str, str] = {}
    for name, m in model.named_modules():
        if id(m) in known or m in excluded:
            continue
        if not any(_is_count(m.__dict__.get(a)) and m.__dict__[a] > 1 for a in _LOOKS_LIKE_HEADS):
            continue
        # two or more Linear(-like: Hugging Face GPT-2's ``Conv1D``) layers of its own: projections in, out
        linear = [c for c in m.children() if isinstance(getattr(c, "weight", None), torch.Tensor) and c.weight.dim() == 2]
        if len(linear) < 2 or any(id(sub) in known for sub in m.modules()):
            continue  # a classifier or a model that only stores the hyper-parameter of the attention it contains
        problem = _layout_problem(m)
        if problem is not None:
            problems[name] = problem
    return problems


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_attention_layouts(model: nn.Module, exclude: Sequence[str] | None = None) -> None:
    """Raise :class:`StructuredPruningError` naming every attention module of an unknown layout (see
    :func:`unknown_attention`) and the ``exclude`` that keeps it; no tracing, so it runs before training."""
    problems = unknown_attention(model, exclude)
    if problems:
        listed = "; ".join(f"{n!r} ({type(model.get_submodule(n)).__name__}): {why}" for n, why in problems.items())
        raise StructuredPruningError(
            f"structured pruning does not know the attention layout of {listed}. Pruning its channels would mix "
            f"its heads, so nothing was pruned. Keep it whole with `exclude={list(problems)!r}`, or give it a known "
            "layout (an int `num_heads` and `qkv` or `q`/`k`/`v` Linear layers; see the README)."
        )


def _qkv_layers(attn: nn.Module) -> list[nn.Linear]:
    """The ``qkv`` Linear, or the ``q``/``k``/``v`` Linears (by their usual names), of an attention module."""
    for names in _QKV_NAMES:
        layers = [attn._modules.get(n) for n in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return [layer for layer in layers if isinstance(layer, nn.Linear)]
    return []


def _qkv_width(layers: Sequence[nn.Linear]) -> int:
    """The width of one of the query, key and value projections (a third of a fused ``qkv``)."""
    return layers[0].out_features // (3 if len(layers) == 1 else 1)


def head_count(attn: nn.Module) -> int:
    attr = "num_heads" if isinstance(attn, nn.MultiheadAttention) else _heads_attr(attn)
    if attr is None:
        raise ValueError(f"{type(attn).__name__} has no int head count ({', '.join(_HEAD_ATTRS)})")
    return int(getattr(attn, attr))


def set_heads(model: nn.Module, name: str, heads: int) -> None:
    """Set an attention module's head count and, where it keeps them, its head size and total width
    (:data:`_HEAD_DIM_ATTRS`, :data:`_ALL_HEADS_ATTRS`) to match its projections. Scaling factors stay: a model
    whose head dimensions were pruned keeps the softmax temperature it was trained with."""
    attn = model.get_submodule(name)
    heads = int(heads)
    if isinstance(attn, nn.MultiheadAttention):
        attn.num_heads = heads
        attn.head_dim = attn.embed_dim // heads
        return
    attr = _heads_attr(attn)
    if attr is None:
        raise ValueError(f"module {name!r} ({type(attn).__name__}) has no int head count ({', '.join(_HEAD_ATTRS)})")
    setattr(attn, attr, heads)
    layers = _qkv_layers(attn)
    if not layers:
        return
    width = _qkv_width(layers)
    for key in _HEAD_DIM_ATTRS:
        if isinstance(attn.__dict__.get(key), int):
            setattr(attn, key, width // heads)
    for key in _ALL_HEADS_ATTRS:
        if isinstance(attn.__dict__.get(key), int):
            setattr(attn, key, width)


def sync_configs_(model: nn.Module) -> dict[str, int]:
    """Make Hugging Face style ``config`` objects agree with the pruned model: ``num_attention_heads`` (and
    ``head_dim``, where the config keeps one) become the attention modules' own values when every attention
    module sharing that config agrees (per-layer counts always live on the modules themselves).

    Returns:
        ``{attribute: value}`` set on the configs (empty when nothing changed).
    """
    by_config: dict[int, tuple[Any, list[nn.Module]]] = {}
    for m in model.modules():
        config = m.__dict__.get("config")
        if config is None or not isinstance(getattr(config, "num_attention_heads", None), int):
            continue
        if isinstance(m, nn.MultiheadAttention) or _heads_attr(m) is None or not _qkv_layers(m):
            continue
        by_config.setdefault(id(config), (config, []))[1].append(m)
    changed: dict[str, int] = {}
    for config, modules in by_config.values():
        heads = {head_count(m) for m in modules}
        if len(heads) == 1:
            h = heads.pop()
            if config.num_attention_heads != h:
                config.num_attention_heads = h
                changed["num_attention_heads"] = h
        dims = {int(m.__dict__[k]) for m in modules for k in _HEAD_DIM_ATTRS if isinstance(m.__dict__.get(k), int)}
        if len(dims) == 1 and isinstance(config.__dict__.get("head_dim"), int):
            d = dims.pop()
            if config.head_dim != d:
                config.head_dim = d
                changed["head_dim"] = d
    return changed
