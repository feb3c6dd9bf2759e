"""Teacher checkpoints for configs that name one (examples/configs/distillation.yaml)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import yaml


def teacher_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Write the minimal checkpoint :func:`lightning_accel.load_checkpoint` reads: weights and hyper-parameters,
    with the keys LightningCLI adds to them."""
    hparams = dict(getattr(model, "hparams", {}))
    hparams.update(_class_path=f"{type(model).__module__}.{type(model).__qualname__}",  # as LightningCLI saves them
                   _instantiator="lightning.pytorch.cli.instantiate_module")
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, path)
    return path


def config_with_teacher(config: Path, tmp_path: Path) -> Path:
    """A copy of ``config`` whose ``KnowledgeDistillation(teacher=...)`` / ``AutoCompress(teacher=...)`` paths point at a checkpoint of the
    config's model (freshly initialized) under ``tmp_path``; ``config`` itself if it names no teacher."""
    data: dict[str, Any] = yaml.safe_load(config.read_text())
    kds = [
        cb
        for cb in (data.get("trainer") or {}).get("callbacks") or []
        if str(cb.get("class_path", "")).endswith(("KnowledgeDistillation", "AutoCompress")) and (cb.get("init_args") or {}).get("teacher")
    ]
    if not kds:
        return config
    module, _, name = data["model"]["class_path"].rpartition(".")
    model = getattr(importlib.import_module(module), name)(**(data["model"].get("init_args") or {}))
    ckpt = teacher_checkpoint(model, tmp_path / "teacher.ckpt")
    for cb in kds:
        cb["init_args"]["teacher"] = str(ckpt)
    out = tmp_path / config.name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out
