"""Checkpoints of models that lightning-accel callbacks changed: one replay path, with or without a Trainer.

A checkpoint of a pruned, quantized or adapted model does not fit a freshly built model. Every callback whose
change must exist before the weights load (``required_on_load``) provides a static ``replay(model, state)``
that re-applies the change from its own checkpoint state. The pipeline writes a *manifest* into every
checkpoint (``checkpoint["lightning_accel"]``: each callback's state key, public name and stage), and
:func:`replay_checkpoint` runs the recorded replays in pipeline order. The same function serves
``Trainer.fit/validate/test/predict(ckpt_path=...)`` (through the pipeline's stand-in for the module's
``on_load_checkpoint``) and :func:`load_checkpoint`, for inference without a Trainer:

    model = lightning_accel.load_checkpoint(ResidualCNN, "last.ckpt")        # class: built from hparams
    lightning_accel.load_checkpoint(my_model, "last.ckpt")                     # or an instance, in place

``LightningModule.load_from_checkpoint`` builds the module and loads the weights without any callback, so
nothing can replay the changes there: it fails with a size mismatch on a pruned or quantized checkpoint.
:func:`load_checkpoint` is the way to load them.

Checkpoints written by lightning-accel 0.1.0 have no manifest; their callback states are recognised by the
state keys 0.1.0 wrote (:data:`_V0_1_REPLAYS`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_accel._vocabulary import STAGES, public_name, resolve_callback

__all__ = ["load_checkpoint", "register_replay", "replay_checkpoint", "write_manifest"]

_MANIFEST_KEY = "lightning_accel"
_MANIFEST_VERSION = 2  # 1: "class_path" held the defining module's path; 2: "name", the public name

#: Callback classes whose checkpoint states 0.1.0 wrote without a manifest, by state-key prefix.
_V0_1_REPLAYS: dict[str, str] = {
    "StructuredPruning": "lightning_accel.StructuredPruning",
    "Quantization": "lightning_accel.Quantization",
}

#: Replays registered by :func:`register_replay` (deprecated), by state-key prefix: (stage index, function).
_REGISTERED: dict[str, tuple[float, Callable[[nn.Module, dict[str, Any]], None]]] = {}


def write_manifest(checkpoint: dict[str, Any], callbacks: Iterable[Any], module: Any = None) -> None:
    """Record which lightning-accel callback wrote which state of ``checkpoint``: its public name
    (``lightning_accel.StructuredPruning``, never a module path) and its stage; and the class of the ``module``
    whose weights it holds (for the error when another class loads it)."""
    entries = {cb.state_key: {"name": public_name(type(cb)), "stage": cb.stage} for cb in callbacks}
    checkpoint[_MANIFEST_KEY] = {"version": _MANIFEST_VERSION, "callbacks": entries}
    if module is not None:
        checkpoint[_MANIFEST_KEY]["module"] = f"{type(module).__module__}.{type(module).__qualname__}"


def _written_by(ckpt: dict[str, Any]) -> str:
    """Which model class wrote ``ckpt``, as far as it says (our manifest, else LightningCLI's ``_class_path``)."""
    recorded = (ckpt.get(_MANIFEST_KEY) or {}).get("module") or (ckpt.get("hyper_parameters") or {}).get("_class_path")
    return f"a {recorded}" if recorded else "a model it does not name"


def _mismatch(model: nn.Module, state: dict[str, Any]) -> str:
    """A short account of why ``state`` does not fit ``model`` (torch's own message lists every key)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and hasattr(own[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("size mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
    return "; ".join(parts) or "torch refused it"


def _prefix(state_key: str) -> str:
    return state_key.split("{", 1)[0]


def _entry_name(entry: dict[str, Any]) -> str:
    return str(entry.get("name") or entry["class_path"])  # manifest version 1 wrote "class_path"


def _replays(checkpoint: dict[str, Any]) -> list[tuple[float, str, Callable[[nn.Module, dict[str, Any]], None]]]:
    states = checkpoint.get("callbacks") or {}
    manifest = (checkpoint.get(_MANIFEST_KEY) or {}).get("callbacks") or {}
    found = []
    for position, key in enumerate(states):
        entry = manifest.get(key)
        name = _entry_name(entry) if entry else _V0_1_REPLAYS.get(_prefix(key))
        if name is not None:
            cls = resolve_callback(name)
            stage, replay = getattr(cls, "stage", None), getattr(cls, "replay", None)
            if getattr(cls, "required_on_load", False) and stage in STAGES and callable(replay):
                found.append((STAGES.index(stage) + position * 1e-6, key, replay))
        elif _prefix(key) in _REGISTERED:
            order, fn = _REGISTERED[_prefix(key)]
            found.append((order + position * 1e-6, key, fn))
    return sorted(found, key=lambda t: t[0])


def replay_checkpoint(model: nn.Module, checkpoint: dict[str, Any]) -> list[str]:
    """Re-apply, in pipeline order, every change recorded in ``checkpoint`` that must exist before its weights
    load (structure, quantized layers, adapters); returns the state keys replayed.

    Replays are idempotent: a change the model already has is left as it is.
    """
    states = checkpoint.get("callbacks") or {}
    done = []
    for _, key, fn in _replays(checkpoint):
        fn(model, states[key])
        done.append(key)
    return done


def load_checkpoint(
    model: nn.Module | type,
    checkpoint: str | Path | dict[str, Any],
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    **init_kwargs: Any,
) -> nn.Module:
    """Build (or take) a model, replay the recorded lightning-accel changes, then load the weights.

    Example::

        model = load_checkpoint(ResidualCNN, "last.ckpt")

    Args:
        model: a model instance (changed in place) or a LightningModule class (built from the checkpoint's
            ``hyper_parameters``, updated by ``init_kwargs``).
        checkpoint: a path, or an already loaded checkpoint dict.
        map_location: as for :func:`torch.load`.
        strict: as for :meth:`torch.nn.Module.load_state_dict`.

    Returns:
        The model, in eval mode.

    Raises:
        TypeError: ``model`` is neither an ``nn.Module`` nor a class.
        ValueError: the class cannot be built from the checkpoint's hyper-parameters, or its weights do not fit
            (another class or width: the message names the class that wrote it and a few mismatched keys); or a
            recorded change does not fit the model, which is then left unchanged by that change.
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location=map_location, weights_only=False)
    source = "the checkpoint" if isinstance(checkpoint, dict) else f"the checkpoint {str(checkpoint)!r}"
    if isinstance(model, type):
        hparams = dict(ckpt.get("hyper_parameters") or {})
        for key in ("_class_path", "_instantiator"):  # written by LightningCLI, not arguments of the class
            hparams.pop(key, None)
        hparams.update(init_kwargs)
        try:
            model = model(**hparams)
        except TypeError as err:
            raise ValueError(
                f"cannot build {model.__name__} from the hyper-parameters of {source}, written by {_written_by(ckpt)} "
                f"({err}); load it with the class that wrote it, or pass `init_kwargs` / a built model"
            ) from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module instance or class; got {type(model).__name__}")
    replay_checkpoint(model, ckpt)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=strict)
    except RuntimeError as err:
        raise ValueError(
            f"the weights of {source}, written by {_written_by(ckpt)}, do not fit {type(model).__name__}: "
            f"{_mismatch(model, ckpt['state_dict'])}"
        ) from err
    return model.eval()


def register_replay(name: str, order: int, fn: Callable[[nn.Module, dict[str, Any]], None]) -> None:
    """Deprecated: register how to re-apply the change of a callback that is not an :class:`AccelCallback`.

    Callbacks that subclass :class:`AccelCallback` set ``required_on_load = True`` and implement a static
    ``replay(model, state)`` instead; the checkpoint's manifest then names them.

    Args:
        name: the callback's state-key prefix (its class name).
        order: where it replays relative to the pipeline's stages (0 = before the first stage).
        fn: ``fn(model, state)``, changing ``model`` in place from the callback's ``state_dict()``.
    """
    warnings.warn(
        "register_replay is deprecated: subclass lightning_accel.AccelCallback, set `required_on_load = True` and "
        "implement a static `replay(model, state)`",
        DeprecationWarning,
        stacklevel=2,
    )
    _REGISTERED[name] = (order / 10.0, fn)  # 0.1.0's orders: 10 prune -> stage 1 (structure), 20 -> 2 (quantization)
