"""Width attributes that libraries read back after structured pruning: timm's ``num_features`` /
``head_hidden_size`` / ``embed_dim`` (read by ``reset_classifier`` and ``forward_head``) and Hugging Face
``config.hidden_size`` / ``intermediate_size`` (read by ``save_pretrained`` + ``from_pretrained`` and by heads
built later). Pruning changes the layers; :func:`sync_widths_` makes these attributes say what the layers now are.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from lightning_accel.errors import StructuredPruningWarning

__all__ = ["sync_widths_"]

#: timm-style model attributes that hold the width of the features fed to the classifier.
_FEATURE_ATTRS = ("num_features", "head_hidden_size")
#: Hugging Face FFN input layers, by the config attribute that holds their width (BERT/RoBERTa/ViT/MiniLM: the
#: ``intermediate.dense`` Linear; DistilBERT: ``ffn.lin1``).
_FFN_LAYERS = {"intermediate_size": ("intermediate.dense",), "hidden_dim": ("ffn.lin1",)}
#: Hugging Face config attributes of the residual width (DistilBERT spells it ``dim``).
_HIDDEN_ATTRS = ("hidden_size", "dim")


def _classifier_width(model: nn.Module) -> int | None:
    """The input width of a timm-style model's classifier (``get_classifier()``, else ``head``/``fc``/
    ``classifier``), or of its final norm when the head is an ``Identity``."""
    head: Any = None
    if callable(getattr(model, "get_classifier", None)):
        try:
            head = model.get_classifier()  # type: ignore[operator]
        except Exception:  # a model's own method: whatever it raises, fall back to the attributes
            head = None
    for name in ("head", "fc", "classifier"):
        if head is None or not isinstance(head, nn.Linear):
            candidate = getattr(model, name, None)
            head = candidate if isinstance(candidate, nn.Linear) else head
    if isinstance(head, nn.Linear):
        return int(head.in_features)
    norm = getattr(model, "norm", None) or getattr(model, "fc_norm", None)
    if isinstance(norm, nn.LayerNorm):
        return int(norm.normalized_shape[-1])
    return None


def _residual_width(model: nn.Module) -> int | None:
    """A timm ViT's embedding width: the last dimension of its class token or position embedding."""
    for name in ("cls_token", "pos_embed"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter) and p.dim() >= 2:
            return int(p.shape[-1])
    return None


def _set(obj: Any, attr: str, value: int, changed: dict[str, int], where: str) -> None:
    if getattr(obj, attr) != value:
        setattr(obj, attr, value)
        changed[f"{where}{attr}"] = value


def _sync_timm(model: nn.Module, changed: dict[str, int]) -> None:
    for name, m in model.named_modules():
        where = f"{name}." if name else ""
        if isinstance(m.__dict__.get("embed_dim"), int) and (width := _residual_width(m)) is not None:
            _set(m, "embed_dim", width, changed, where)
        if not isinstance(m.__dict__.get("num_features"), int) or next(m.children(), None) is None:
            continue  # a norm layer's own num_features (torch-pruning keeps those), not a model's
        width = _classifier_width(m)
        if width is None:
            continue
        old = m.num_features
        _set(m, "num_features", width, changed, where)
        if isinstance(m.__dict__.get("head_hidden_size"), int) and m.head_hidden_size == old:
            _set(m, "head_hidden_size", width, changed, where)


def _sync_hf_configs(model: nn.Module, changed: dict[str, int]) -> None:
    users: dict[int, tuple[Any, list[tuple[str, nn.Module]]]] = {}
    for name, m in model.named_modules():
        config = m.__dict__.get("config")
        if config is not None and hasattr(config, "__dict__"):
            users.setdefault(id(config), (config, []))[1].append((name, m))
    for config, owners in users.values():
        root_name, root = min(owners, key=lambda o: len(o[0]))
        prefix = f"{root_name}." if root_name else ""
        layers = {n[len(prefix):] if n.startswith(prefix) else n: m for n, m in root.named_modules()}
        for attr, suffixes in _FFN_LAYERS.items():
            if not isinstance(config.__dict__.get(attr), int):
                continue
            widths = {int(m.out_features) for n, m in layers.items() if isinstance(m, nn.Linear) and n.endswith(suffixes)}
            if len(widths) == 1:
                _set(config, attr, widths.pop(), changed, "config.")
            elif len(widths) > 1:
                warnings.warn(
                    f"structured pruning left the feed-forward layers of {type(root).__name__} with different widths "
                    f"{sorted(widths)}; its config's `{attr}` holds one width, so save_pretrained + from_pretrained "
                    "cannot rebuild the pruned model (use lightning_accel.load_checkpoint, or scope='layer' with one "
                    "amount for every layer)",
                    StructuredPruningWarning,
                    stacklevel=3,
                )
        embeddings = [m for n, m in layers.items() if isinstance(m, nn.Embedding) and n.endswith("word_embeddings")]
        norms = {int(m.normalized_shape[-1]) for m in layers.values() if isinstance(m, nn.LayerNorm)}
        hidden = {int(e.embedding_dim) for e in embeddings} or norms
        for attr in _HIDDEN_ATTRS:
            if isinstance(config.__dict__.get(attr), int) and len(hidden) == 1:
                _set(config, attr, next(iter(hidden)), changed, "config.")


def sync_widths_(model: nn.Module) -> dict[str, int]:
    """Make the width attributes libraries read agree with the (pruned) layers of ``model``.

    * timm-style models: ``num_features`` (and ``head_hidden_size`` where it was the same) become the classifier's
      input width, ``embed_dim`` the class token's / position embedding's width, so ``reset_classifier(n)`` builds
      a head that fits.
    * Hugging Face ``config`` objects: ``intermediate_size`` (``hidden_dim``) becomes the feed-forward width when
      every layer has the same one (else a ``StructuredPruningWarning`` says ``from_pretrained`` cannot rebuild
      it), ``hidden_size`` (``dim``) the residual width.

    Returns:
        ``{attribute: value}`` of what changed (``"config.intermediate_size"``, ``"num_features"``, ...).
    """
    changed: dict[str, int] = {}
    _sync_timm(model, changed)
    _sync_hf_configs(model, changed)
    return changed
