"""What knowledge distillation computes, on plain tensors and modules (no Trainer).

* :func:`distillation_loss`: the soft-target term, ``"kl"`` (Hinton et al.: KL divergence between the
  temperature-softened distributions, scaled by ``temperature**2`` so its gradients keep their size when the
  temperature changes) or ``"mse"`` (squared error between the logits).
* :func:`extract_logits`: the logits tensor in whatever a ``forward`` returns (a tensor, a dict, a Hugging Face
  ``ModelOutput``, a tuple).
* :class:`FeatureProjection` and :func:`projection_dim`: intermediate-feature matching when a student layer
  is narrower than the teacher's (after structured pruning): a learned linear map over the one dimension
  that differs, initialized by least squares on a batch (:meth:`FeatureProjection.fit`).
* :func:`frozen_copy`, :func:`freeze_` and :func:`fingerprint`: a teacher that is an exact, frozen copy of a
  model, and a short digest naming a model's weights (what a checkpoint records instead of the teacher).

    loss = (1 - alpha) * task_loss + alpha * distillation_loss(student(x), teacher(x), temperature=2.0)
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "FeatureProjection",
    "distillation_loss",
    "extract_logits",
    "feature_loss",
    "fingerprint",
    "first_tensor",
    "freeze_",
    "frozen_copy",
    "kl_distillation_loss",
    "mse_distillation_loss",
    "projection_dim",
]

LOSSES: tuple[str, ...] = ("kl", "mse")


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------
def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"the teacher's logits have shape {tuple(teacher.shape)} but the student's have shape "
            f"{tuple(student.shape)}: the teacher must predict the same classes for the same batch"
        )


def kl_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over every position but the last
    (class) dimension, in float32.

    >>> kl_distillation_loss(torch.zeros(4, 10), torch.zeros(4, 10))
    tensor(0.)
    """
    _check_pair(student_logits, teacher_logits)
    c = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, c) / temperature
    t = teacher_logits.detach().float().reshape(-1, c) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


def mse_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the logits (logit matching), in float32."""
    _check_pair(student_logits, teacher_logits)
    return F.mse_loss(student_logits.float(), teacher_logits.detach().float())


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss: Literal["kl", "mse"] = "kl",
    temperature: float = 2.0,
) -> torch.Tensor:
    """The soft-target term: :func:`kl_distillation_loss` (``loss="kl"``) or :func:`mse_distillation_loss`
    (``"mse"``, where ``temperature`` has no effect). Gradients flow to the student only.

    Raises:
        ValueError: the two shapes differ (the message names both), or ``loss`` is unknown.
    """
    if loss == "kl":
        return kl_distillation_loss(student_logits, teacher_logits, temperature)
    if loss == "mse":
        return mse_distillation_loss(student_logits, teacher_logits)
    raise ValueError(f"`loss` must be one of {', '.join(map(repr, LOSSES))}; got {loss!r}")


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, projection: nn.Module | None = None) -> torch.Tensor:
    """Mean squared error between a student feature (through ``projection`` if given) and the teacher's, in
    float32.

    Raises:
        ValueError: the (projected) shapes differ; the message names both.
    """
    s = projection(student) if projection is not None else student
    if s.shape != teacher.shape:
        raise ValueError(
            f"the student feature has shape {tuple(s.shape)} and the teacher's {tuple(teacher.shape)}; they must "
            "match (up to one width dimension, bridged by a projection)"
        )
    return F.mse_loss(s.float(), teacher.detach().float())


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
def extract_logits(output: Any, key: str | None = None) -> torch.Tensor:
    """The logits in a ``forward`` output.

    ``key=None``: the output itself if it is a tensor, else its ``"logits"`` key (a dict, a Hugging Face
    ``ModelOutput``) or ``.logits`` attribute. With ``key``: that key of a mapping, that attribute, or, for a
    tuple/list, the element at that index (``"0"``).

    >>> extract_logits({"logits": torch.ones(2, 3), "loss": torch.tensor(1.0)}).shape
    torch.Size([2, 3])

    Raises:
        TypeError: no tensor is found; the message names what the output holds and how to set ``output_key``.
    """
    if key is None:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        value = getattr(output, "logits", None)
        if isinstance(value, torch.Tensor):
            return value
        raise TypeError(
            f"forward returned a {type(output).__name__}{_describe(output)} without a `logits` tensor; set "
            "`output_key` to the key, attribute or (for a tuple) index of the logits, e.g. output_key='0'"
        )
    if isinstance(output, Mapping):
        if key not in output:
            raise TypeError(f"`output_key`={key!r} is not a key of the forward output; its keys are {list(output)}")
        value = output[key]
    elif isinstance(output, (tuple, list)) and key.lstrip("-").isdigit():
        i = int(key)
        if not -len(output) <= i < len(output):
            raise TypeError(f"`output_key`={key!r} is out of range: forward returned a {type(output).__name__} of {len(output)}")
        value = output[i]
    elif hasattr(output, key):
        value = getattr(output, key)
    else:
        raise TypeError(f"`output_key`={key!r} is neither a key nor an attribute of the forward output ({type(output).__name__}{_describe(output)})")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`output_key`={key!r} selects a {type(value).__name__}, not a logits tensor")
    return value


def _describe(output: Any) -> str:
    if isinstance(output, Mapping):
        return f" with keys {list(output)}"
    if isinstance(output, (tuple, list)):
        return f" of {len(output)} ({', '.join(type(o).__name__ for o in output[:4])})"
    return ""


def first_tensor(output: Any, where: str) -> torch.Tensor:
    """A module output as one tensor: the tensor itself, or the first element of a tuple/list (the hidden
    states of most Transformer layers).

    Raises:
        TypeError: no tensor there; the message names ``where``.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the output of {where} is a {type(output).__name__}, not a tensor (or a tuple starting with one)")


# ---------------------------------------------------------------------------------------------------------
# Feature projections
# ---------------------------------------------------------------------------------------------------------
def projection_dim(student_shape: torch.Size | tuple[int, ...], teacher_shape: torch.Size | tuple[int, ...]) -> int | None:
    """The one dimension in which a student feature differs from the teacher's (``None``: same shape).

    >>> projection_dim((8, 16, 4, 4), (8, 32, 4, 4))   # channels of a conv feature map
    1
    >>> projection_dim((8, 4, 32), (8, 4, 64))         # width of Transformer tokens
    2

    Raises:
        ValueError: the shapes differ in rank or in more than one dimension; the message names both.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t:
        return None
    differ = [i for i, (a, b) in enumerate(zip(s, t)) if a != b] if len(s) == len(t) else []
    if len(differ) != 1 or len(s) < 2 or differ[0] == 0:
        raise ValueError(
            f"student feature of shape {s} and teacher feature of shape {t} cannot be matched: they may differ in "
            "one non-batch dimension only (a width a projection can bridge)"
        )
    return differ[0]


class FeatureProjection(nn.Module):
    """A learned linear map of one dimension of a feature tensor, from a student's width to the teacher's:
    a 1x1 convolution for ``dim=1`` of a feature map, a Linear layer for ``dim=-1`` of tokens.

    Args:
        in_features: the student's width, e.g. ``16``.
        out_features: the teacher's width, e.g. ``32``.
        dim: the dimension it maps, ``>= 1``, e.g. ``1`` (channels of ``[B, C, H, W]``).
    """

    def __init__(self, in_features: int, out_features: int, dim: int) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.dim = int(dim)
        self.linear = nn.Linear(self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(self.dim, -1)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.linear.weight.dtype)  # a bf16-true student, a float32 projection
        return self.linear(x).movedim(-1, self.dim)

    @torch.no_grad()
    def fit_(self, student: torch.Tensor, teacher: torch.Tensor, ridge: float = 1e-3, max_rows: int = 16384) -> FeatureProjection:
        """Set the weights to the ridge least-squares map from ``student`` to ``teacher`` features (rows: every
        position but ``dim``), so matching starts from the best linear fit rather than from noise."""
        x = student.detach().float().movedim(self.dim, -1).reshape(-1, self.in_features)
        y = teacher.detach().float().movedim(self.dim, -1).reshape(-1, self.out_features)
        if x.shape[0] > max_rows:
            idx = torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).long()
            x, y = x[idx], y[idx]
        mx, my = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
        xc, yc = x - mx, y - my
        gram = xc.T @ xc
        lam = ridge * (gram.diagonal().mean().clamp_min(1e-12))
        gram = gram + lam * torch.eye(self.in_features, device=x.device)
        w = torch.linalg.solve(gram, xc.T @ yc)  # [in, out]
        self.linear.weight.copy_(w.T)
        self.linear.bias.copy_((my - mx @ w).squeeze(0))
        return self

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features} over dim {self.dim}"


# ---------------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------------
def freeze_(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter, in place; returns ``module``."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode without gradients: the teacher of a model that is about to be
    compressed. A LightningModule's copy is detached from its Trainer (``LightningModule.__getstate__``)."""
    memo: dict[int, Any] = {}
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        memo[id(trainer)] = None
    return freeze_(copy.deepcopy(module, memo))


def fingerprint(module: nn.Module, samples: int = 65536) -> str:
    """A short digest of a model's ``state_dict``: names, shapes, dtypes and up to ``samples`` evenly spaced
    values of every tensor (every value of a small model). Equal models have equal fingerprints; a retrained
    or differently initialized model has another."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.reshape(-1)
        if flat.numel() > samples:
            flat = flat[:: max(1, flat.numel() // samples)]
        flat = flat.to("cpu").contiguous()
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
