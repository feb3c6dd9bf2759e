"""When the Trainer distills: :class:`KnowledgeDistillation`, the uncompressed model teaching its compressed self.

What is computed (losses, logits, feature projections, teacher copies) lives in
:mod:`lightning_accel.distillation.core`; this callback builds the teacher before any other callback changes
the model, wraps the module's ``training_step`` for the length of ``fit`` so the returned loss gains the
distillation term, trains the feature projections, keeps them (not the teacher) in its checkpoint state, and
removes every hook and wrapper when the Trainer call ends or fails.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._lifecycle import AccelCallback, detach_pipeline_hooks
from lightning_accel._validate import check_bool, check_choice, check_number
from lightning_accel.checkpoint import load_checkpoint
from lightning_accel.distillation.core import (
    LOSSES,
    FeatureProjection,
    distillation_loss,
    extract_logits,
    feature_loss,
    fingerprint,
    first_tensor,
    freeze_,
    frozen_copy,
    projection_dim,
)
from lightning_accel.errors import DistillationNoEffectWarning, DistillationWarning  # noqa: F401 (public here too)

__all__ = ["DistillationNoEffectWarning", "DistillationWarning", "KnowledgeDistillation"]

_STATE_VERSION = 1
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")
_TRUE_PRECISION = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


class KnowledgeDistillation(AccelCallback):
    """Train the model against a frozen teacher as well as its task loss: the proven way to win back the
    accuracy that pruning and quantization cost, with no change to the LightningModule.

    During ``fit`` the module's ``training_step`` is wrapped: the inputs and output of the (first) ``self(...)``
    call of each step are captured by a forward hook, the teacher runs on the same inputs (eval mode, no
    gradients, the student's device and precision: inside the same autocast region), and the loss
    ``training_step`` returns (a tensor, or a dict's ``"loss"``) becomes
    ``(1 - alpha) * task + alpha * distillation + feature_weight * sum(feature terms)``. Everything attached
    to the module is removed when ``fit`` ends or fails.

    The teacher is built in ``accel_before_setup`` of the pipeline's ``teacher`` stage, the first thing the
    lightning-accel pipeline does at ``setup``, before any other callback changes the model (in any list order:
    ``Quantization(when="setup")`` quantizes the student only, ``StructuredPruning`` prunes the student only). It is never saved in the student's checkpoint: the checkpoint records where it came
    from and a :func:`~lightning_accel.distillation.core.fingerprint` of its weights, checked on resume.

    With ``features``, intermediate outputs are matched too (MSE). Where a student module is narrower than the
    teacher's (structured pruning removed channels or neurons), a learned
    :class:`~lightning_accel.distillation.core.FeatureProjection` maps the student's width to the teacher's; it
    is created when the widths first differ (at the first step, or after a pruning event), initialized by least
    squares on that batch, and trained by an Adam optimizer of this callback (``projection_lr``) stepped with
    the model's optimizer; both are in the checkpoint state, so a resumed run continues them exactly. Under DDP
    projection gradients are averaged across ranks.

    Logged every step: ``distill/loss`` (the distillation term), ``distill/task_loss`` and
    ``distill/feature/<student module>`` per feature pair.

    Example::

        # compress a trained model while it teaches itself
        model.load_state_dict(trained)
        trainer = Trainer(callbacks=[KnowledgeDistillation(), StructuredPruning(amount=0.75, start=0, end=4)])
        KnowledgeDistillation(teacher="teacher.ckpt", temperature=4.0, alpha=0.7, features={"blocks.3": "blocks.3"})

    Args:
        teacher: ``None``: a frozen copy of the LightningModule as it is at ``fit`` start, before any
            compression (resuming needs the same weights passed to ``fit`` again; the fingerprint is checked). A
            string: a checkpoint path, loaded with :func:`lightning_accel.load_checkpoint` into a new instance of
            the module's class (built from the checkpoint's hyper-parameters; a compressed teacher's pruning and
            quantization are replayed), e.g. ``"teacher.ckpt"``. In Python an ``nn.Module`` is accepted too: it is
            put in eval mode without gradients and moved to the student's device for the fit, then restored.
        temperature: softening temperature of ``loss="kl"``, ``> 0``, e.g. ``4.0``.
        alpha: weight of the distillation term in ``[0, 1]``; the task loss keeps ``1 - alpha``, e.g. ``0.5``.
        loss: ``"kl"`` (KL divergence of the softened distributions times ``temperature**2``) or ``"mse"``
            (squared error of the logits), e.g. ``"kl"``.
        features: intermediate matching, student module name -> teacher module name, e.g.
            ``{"blocks.1": "blocks.1"}``; the output of each (its first element if a tuple) is compared by MSE.
        feature_weight: weight of each feature term, ``>= 0``, e.g. ``1.0``.
        output_key: where the logits are in the ``forward`` output: a dict key, an attribute, or a tuple index
            (``"0"``), e.g. ``"logits"``; ``None``: the ``logits`` key or attribute, else the output itself.
        projection_lr: learning rate of the feature projections' Adam optimizer, ``> 0``, e.g. ``1e-3``.
        init_student_from_teacher: load the teacher's weights into the student at ``setup``, before any
            compression (the teacher must share the student's architecture): the way to compress a trained
            checkpoint from a LightningCLI YAML, where the model is built fresh, e.g. ``true``.
        verbose: ``0`` only logs metrics, ``1`` adds a line naming the teacher at fit start, e.g. ``1``.

    Raises:
        ValueError: a bad argument (raised here); at ``setup``: ``init_student_from_teacher`` with weights that
            do not fit, manual optimization, a sharding strategy, a ``features`` name that is not a module; at
            fit start on resume: a teacher whose fingerprint differs from the checkpoint's; at the first step: a
            teacher whose logits shape differs from the student's (both shapes named).
        FileNotFoundError: at ``setup``, ``teacher`` is a path that does not exist.
        RuntimeError: after the first step, ``training_step`` never called the module's ``forward``.
        TypeError: ``teacher`` is not a string, module or ``None``; the logits cannot be found in the output.
    """

    stage: ClassVar[str] = "teacher"
    capabilities: ClassVar[frozenset[str]] = frozenset({"wraps_training_step", "needs_teacher_copy"})

    def __init__(
        self,
        teacher: str | nn.Module | None = None,
        temperature: float = 2.0,
        alpha: float = 0.5,
        loss: Literal["kl", "mse"] = "kl",
        features: dict[str, str] | None = None,
        feature_weight: float = 1.0,
        output_key: str | None = None,
        projection_lr: float = 1e-3,
        init_student_from_teacher: bool = False,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        if teacher is not None and not isinstance(teacher, (str, Path, nn.Module)):
            raise TypeError(f"`teacher` must be None, a checkpoint path or an nn.Module; got a {type(teacher).__name__}")
        if isinstance(teacher, (str, Path)):
            teacher = str(teacher)
            if not teacher.strip():
                raise ValueError(f"`teacher` must be None or a non-empty checkpoint path; got {teacher!r}")
        check_number("temperature", temperature, low=0.0, low_inclusive=False)
        check_number("alpha", alpha, low=0.0, high=1.0)
        check_choice("loss", loss, LOSSES)
        self.features = _check_features(features)
        check_number("feature_weight", feature_weight, low=0.0)
        if output_key is not None and (not isinstance(output_key, str) or not output_key):
            raise ValueError(f"`output_key` must be None or a non-empty key, attribute or index like 'logits' or '0'; got {output_key!r}")
        check_number("projection_lr", projection_lr, low=0.0, low_inclusive=False)
        check_bool("init_student_from_teacher", init_student_from_teacher)
        check_choice("verbose", verbose, (0, 1))
        if init_student_from_teacher and teacher is None:
            raise ValueError(
                "`init_student_from_teacher`=True needs a `teacher` path or module: with teacher=None the teacher is a "
                "copy of the student already"
            )
        if loss == "mse" and temperature != 2.0:
            rank_zero_warn("`temperature` has no effect with `loss`='mse' (the logits are matched as they are)", category=DistillationNoEffectWarning)
        if self.features is None and feature_weight != 1.0:
            rank_zero_warn("`feature_weight` has no effect without `features`", category=DistillationNoEffectWarning)
        if alpha == 0.0 and self.features is None:
            rank_zero_warn("KnowledgeDistillation(alpha=0) without `features` adds nothing to the loss", category=DistillationNoEffectWarning)
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.loss = loss
        self.feature_weight = float(feature_weight)
        self.output_key = output_key
        self.projection_lr = float(projection_lr)
        self.init_student_from_teacher = init_student_from_teacher
        self.verbose = verbose
        # across a fit (checkpointed): the feature projections and their optimizers
        self._projections: dict[str, FeatureProjection] = {}
        self._proj_optimizers: dict[str, torch.optim.Optimizer] = {}
        self._teacher_info: dict[str, Any] | None = None
        self._loaded: dict[str, Any] | None = None
        self._last_logs: dict[str, torch.Tensor] = {}
        self._clear_run()

    # ------------------------------------------------------------------ state
    def _clear_run(self) -> None:
        self._teacher_model: nn.Module | None = None
        self._user_teacher: tuple[bool, list[bool], torch.device | None, torch.dtype | None] | None = None
        self._module: pl.LightningModule | None = None
        self._handles: list[Any] = []
        self._student_hooked: dict[str, nn.Module] = {}
        self._student_handles: dict[str, Any] = {}
        self._wrapped: tuple[Any, bool] | None = None  # (previous instance attribute or None, had one)
        self._capturing = False
        self._calls = 0
        self._captured: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        self._student_feats: dict[str, torch.Tensor] = {}
        self._teacher_feats: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._warned: set[str] = set()
        self._trainer: pl.Trainer | None = None

    def state_dict(self) -> dict[str, Any]:
        projections = {}
        for name, proj in self._projections.items():
            projections[name] = {
                "in_features": proj.in_features,
                "out_features": proj.out_features,
                "dim": proj.dim,
                "weights": {k: v.detach().cpu().clone() for k, v in proj.state_dict().items()},
                "optimizer": self._proj_optimizers[name].state_dict(),
            }
        return {"version": _STATE_VERSION, "teacher": dict(self._teacher_info or {}), "projections": projections}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"KnowledgeDistillation state version {version!r} is not supported (expected {_STATE_VERSION})")
        self._loaded = dict(state_dict)

    @property
    def teacher_model(self) -> nn.Module | None:
        """The frozen teacher while ``fit`` runs (``None`` outside it)."""
        return self._teacher_model

    @property
    def metrics(self) -> dict[str, float]:
        """The values logged at the latest training step (``distill/loss``, ``distill/task_loss``, ...)."""
        return {k: float(v) for k, v in self._last_logs.items()}

    @property
    def projections(self) -> dict[str, FeatureProjection]:
        """The learned feature projections, by student module name (only where the widths differ)."""
        return dict(self._projections)

    # ------------------------------------------------------------------ set-up: the teacher, before any compression
    def accel_before_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._teacher_model is not None:
            return
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in _UNSUPPORTED_STRATEGIES):
            raise ValueError(f"KnowledgeDistillation supports single-device and DDP strategies; got {strategy}")
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"KnowledgeDistillation adds its term to the loss training_step returns, but {type(pl_module).__name__} "
                "uses manual optimization (automatic_optimization=False), which does not backpropagate that loss"
            )
        self._projections, self._proj_optimizers, self._loaded = {}, {}, None
        teacher, source = self._build_teacher(pl_module)
        if self.features:
            _resolve(teacher, list(self.features.values()), "teacher")
        if self.init_student_from_teacher:
            try:
                pl_module.load_state_dict(teacher.state_dict())
            except RuntimeError as err:
                raise ValueError(
                    f"`init_student_from_teacher`=True: the teacher's weights do not fit {type(pl_module).__name__}: "
                    f"{str(err).splitlines()[0]}; the teacher must share the student's architecture (and be uncompressed)"
                ) from err
        self._teacher_model = teacher
        self._teacher_info = {
            "source": source,
            "path": self.teacher if source == "path" else None,
            "class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
            "fingerprint": fingerprint(teacher),
        }

    def _build_teacher(self, pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
        if self.teacher is None:
            teacher = frozen_copy(pl_module)
            detach_pipeline_hooks(teacher)  # the pipeline's stand-in belongs to the student
            return teacher, "copy"
        if isinstance(self.teacher, nn.Module):
            if self.teacher is pl_module:
                raise ValueError("`teacher` is the student itself; pass teacher=None to distill from a frozen copy of it")
            first = next(self.teacher.parameters(), None)
            self._user_teacher = (
                self.teacher.training,
                [p.requires_grad for p in self.teacher.parameters()],
                first.device if first is not None else None,
                first.dtype if first is not None and first.is_floating_point() else None,
            )
            return freeze_(self.teacher), "module"
        path = Path(self.teacher)
        if not path.is_file():
            raise FileNotFoundError(f"`teacher`={self.teacher!r}: no such checkpoint file (working directory {Path.cwd()})")
        try:
            teacher = load_checkpoint(type(pl_module), path)
        except ValueError as err:
            raise ValueError(
                f"`teacher`={self.teacher!r}: the teacher is built as the student's class {type(pl_module).__name__} "
                f"from that checkpoint, and {err}. Pass a checkpoint of a {type(pl_module).__name__} (saved with "
                "save_hyperparameters() in its __init__), or the teacher as a module"
            ) from err
        return freeze_(teacher), "path"

    # ------------------------------------------------------------------ fit start: device, resume, hooks, wrapper
    def accel_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        teacher = self._teacher_model
        if teacher is None:  # set up by hand without setup
            self.accel_before_setup(trainer, pl_module, "fit")
            teacher = self._teacher_model
        assert teacher is not None and self._teacher_info is not None
        self._trainer = trainer
        self._module = pl_module
        device = pl_module.device
        dtype = _TRUE_PRECISION.get(str(trainer.precision))
        teacher.to(device=device, dtype=dtype) if dtype is not None else teacher.to(device)
        if trainer.world_size > 1 and self._teacher_info["source"] != "path":
            # ranks may have built different models (unseeded); every rank distills from rank zero's
            _broadcast(list(teacher.parameters()) + list(teacher.buffers()))
            self._teacher_info["fingerprint"] = fingerprint(teacher)
        if self._loaded is not None:
            self._resume(trainer, device)
        if self.features:
            self._hook_student_features(pl_module)
            for s_name, t_name in self.features.items():
                module = teacher.get_submodule(t_name)
                self._handles.append(module.register_forward_hook(self._teacher_feature_hook(s_name, t_name)))
        self._handles.append(pl_module.register_forward_hook(self._on_student_forward, with_kwargs=True))
        self._wrap_training_step(pl_module)
        if self.verbose:
            info = self._teacher_info
            what = {"copy": f"a frozen copy of {type(pl_module).__name__}", "path": repr(info["path"]), "module": type(teacher).__name__}
            feats = f"; features {self.features} (weight {self.feature_weight:g})" if self.features else ""
            temp = f", temperature {self.temperature:g}" if self.loss == "kl" else ""
            rank_zero_info(
                f"KnowledgeDistillation: teacher {what[info['source']]} (fingerprint {info['fingerprint']}), {self.loss} loss"
                f"{temp}, alpha {self.alpha:g}{feats}"
            )

    def _resume(self, trainer: pl.Trainer, device: torch.device) -> None:
        state, self._loaded = self._loaded or {}, None
        saved = state.get("teacher") or {}
        info = self._teacher_info or {}
        if saved.get("fingerprint") and saved["fingerprint"] != info.get("fingerprint"):
            how = {
                "copy": "teacher=None copies the module passed to fit(): load the same trained weights into it before "
                "resuming, or give `teacher` the path of a checkpoint of them",
                "path": "the teacher checkpoint file changed since the run started",
                "module": "pass the same teacher module as the interrupted run",
            }.get(str(info.get("source")), "")
            raise ValueError(
                f"KnowledgeDistillation: the teacher of this run (fingerprint {info.get('fingerprint')}, {info.get('source')}) "
                f"is not the one the checkpoint was trained with (fingerprint {saved['fingerprint']}, {saved.get('source')}); {how}"
            )
        for name, rec in (state.get("projections") or {}).items():
            proj = FeatureProjection(rec["in_features"], rec["out_features"], rec["dim"]).to(device)
            proj.load_state_dict(rec["weights"])
            opt = torch.optim.Adam(proj.parameters(), lr=self.projection_lr)
            opt.load_state_dict(rec["optimizer"])
            self._projections[name], self._proj_optimizers[name] = proj, opt

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        previous = pl_module.__dict__.get("training_step")
        inner = pl_module.training_step
        callback = self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return callback._training_step(inner, *args, **kwargs)

        training_step.__wrapped__ = inner  # type: ignore[attr-defined]
        training_step._knowledge_distillation = self  # type: ignore[attr-defined]
        self._wrapped = (previous, previous is not None)
        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _hook_student_features(self, pl_module: pl.LightningModule) -> None:
        assert self.features is not None
        modules = _resolve(pl_module, list(self.features), "student")
        for name, module in modules.items():
            if self._student_hooked.get(name) is module:
                continue
            old = self._student_handles.pop(name, None)
            if old is not None:
                old.remove()
            self._student_handles[name] = module.register_forward_hook(self._student_feature_hook(name))
            self._student_hooked[name] = module

    # ------------------------------------------------------------------ hooks
    def _on_student_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self._capturing:
            return
        self._calls += 1
        if self._calls == 1:
            self._captured = (args, kwargs, output)

    def _student_feature_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._capturing and name not in self._student_feats:
                self._student_feats[name] = first_tensor(output, f"student module {name!r}")

        return hook

    def _teacher_feature_hook(self, s_name: str, t_name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if s_name not in self._teacher_feats:
                self._teacher_feats[s_name] = first_tensor(output, f"teacher module {t_name!r}")

        return hook

    # ------------------------------------------------------------------ the wrapped training step
    def _training_step(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        self._calls, self._captured, self._student_feats, self._teacher_feats = 0, None, {}, {}
        self._capturing = True
        try:
            out = inner(*args, **kwargs)
        finally:
            self._capturing = False
        try:
            return self._combine(out)
        finally:
            self._captured, self._student_feats, self._teacher_feats = None, {}, {}
            self._steps += 1

    def _combine(self, out: Any) -> Any:
        module = self._module
        teacher = self._teacher_model
        assert module is not None and teacher is not None
        if out is None:
            return None  # the step is skipped
        if isinstance(out, torch.Tensor):
            task = out
        elif isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
            task = out["loss"]
        else:
            raise TypeError(
                f"KnowledgeDistillation: training_step of {type(module).__name__} returned a {type(out).__name__}; it must "
                "return a loss tensor or a dict with a 'loss' tensor (or None to skip the step)"
            )
        if self._captured is None:
            if self._steps == 0:
                raise RuntimeError(
                    f"KnowledgeDistillation: training_step of {type(module).__name__} never called the module's forward "
                    "(self(...)); the distillation term needs the student's output. Call self(x) in training_step, or "
                    "compute the distillation loss yourself with lightning_accel.distillation.distillation_loss"
                )
            self._warn_once("no-forward", "KnowledgeDistillation: a training_step did not call forward; that step is not distilled")
            return out
        if self._calls > 1:
            self._warn_once(
                "calls",
                f"KnowledgeDistillation: training_step called forward {self._calls} times in one step; the first call is distilled",
            )
        c_args, c_kwargs, s_out = self._captured
        s_logits = extract_logits(s_out, self.output_key)
        with torch.no_grad():
            t_out = teacher(*c_args, **c_kwargs)
        t_logits = extract_logits(t_out, self.output_key)
        if s_logits.shape != t_logits.shape:
            raise ValueError(
                f"KnowledgeDistillation: the teacher's output has shape {tuple(t_logits.shape)} but the student's has shape "
                f"{tuple(s_logits.shape)}; the teacher must predict the same outputs (classes, positions) for the same batch"
            )
        kd = distillation_loss(s_logits, t_logits, loss=self.loss, temperature=self.temperature)
        total = (1.0 - self.alpha) * task + self.alpha * kd
        logs = {"distill/loss": kd.detach(), "distill/task_loss": task.detach()}
        if self.features:
            for s_name in self.features:
                term = self._feature_term(s_name)
                total = total + self.feature_weight * term
                logs[f"distill/feature/{s_name}"] = term.detach()
        for k, v in logs.items():
            module.log(k, v, on_step=True, on_epoch=False)
        self._last_logs = logs
        if isinstance(out, torch.Tensor):
            return total
        return {**out, "loss": total}

    def _feature_term(self, s_name: str) -> torch.Tensor:
        assert self.features is not None
        t_name = self.features[s_name]
        s = self._student_feats.get(s_name)
        t = self._teacher_feats.get(s_name)
        if s is None or t is None:
            which = f"student module {s_name!r}" if s is None else f"teacher module {t_name!r}"
            raise RuntimeError(f"KnowledgeDistillation `features`: {which} was not called during forward")
        try:
            dim = projection_dim(s.shape, t.shape)
        except ValueError as err:
            raise ValueError(f"KnowledgeDistillation `features` {s_name!r} -> {t_name!r}: {err}") from err
        proj = self._projections.get(s_name)
        if dim is None:
            if proj is not None:  # widths match again: the projection is no longer needed
                del self._projections[s_name], self._proj_optimizers[s_name]
            return feature_loss(s, t)
        if proj is None or proj.dim != dim or proj.in_features != s.shape[dim] or proj.out_features != t.shape[dim]:
            proj = self._new_projection(s_name, s, t, dim)
        return feature_loss(s, t, proj)

    def _new_projection(self, name: str, s: torch.Tensor, t: torch.Tensor, dim: int) -> FeatureProjection:
        proj = FeatureProjection(s.shape[dim], t.shape[dim], dim).to(s.device)
        proj.fit_(s, t)
        if self._trainer is not None and self._trainer.world_size > 1:
            _broadcast(list(proj.parameters()))
        self._projections[name] = proj
        self._proj_optimizers[name] = torch.optim.Adam(proj.parameters(), lr=self.projection_lr)
        if self.verbose:
            rank_zero_info(
                f"KnowledgeDistillation: feature {name!r} is {s.shape[dim]} wide, the teacher's {t.shape[dim]}: a learned "
                "projection bridges them (least-squares start)"
            )
        return proj

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=DistillationWarning)

    # ------------------------------------------------------------------ projections train with the model
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._projections:
            return
        params = [p for proj in self._projections.values() for p in proj.parameters()]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [cast(torch.Tensor, p.grad) for p in params]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for g in grads:
                torch.distributed.all_reduce(g)
                g.div_(trainer.world_size)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # fp16: the loss was scaled, our gradients are too
            inv = 1.0 / float(scaler.get_scale())
            for g in grads:
                g.mul_(inv)
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        for opt in self._proj_optimizers.values():
            if finite:
                opt.step()
            opt.zero_grad(set_to_none=True)

    def on_structure_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: AccelCallback) -> None:
        if self.features and self._module is pl_module:
            self._hook_student_features(pl_module)  # a swapped module under the same name gets the hook again

    # ------------------------------------------------------------------ clean-up
    def accel_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._cleanup()
        else:
            self._loaded = None

    def _cleanup(self) -> None:
        for handle in [*self._handles, *self._student_handles.values()]:
            handle.remove()
        module = self._module
        if module is not None and self._wrapped is not None:
            current = module.__dict__.get("training_step")
            if getattr(current, "_knowledge_distillation", None) is self:
                previous, had = self._wrapped
                if had:
                    module.training_step = previous  # type: ignore[method-assign]
                else:
                    del module.__dict__["training_step"]
        if isinstance(self.teacher, nn.Module) and self._user_teacher is not None:
            training, grads, device, dtype = self._user_teacher
            for p, g in zip(self.teacher.parameters(), grads):
                p.requires_grad_(g)
            self.teacher.train(training)
            if device is not None:
                self.teacher.to(device=device, dtype=dtype) if dtype is not None else self.teacher.to(device)
        self._loaded = None
        self._clear_run()


def _check_features(features: Any) -> dict[str, str] | None:
    if features is None:
        return None
    if not isinstance(features, Mapping) or not features:
        raise ValueError(
            f"`features` must be None or a non-empty mapping of student module name -> teacher module name like "
            f"{{'blocks.1': 'blocks.1'}}; got {features!r}"
        )
    for k, v in features.items():
        if not isinstance(k, str) or not k or not isinstance(v, str) or not v:
            raise ValueError(f"`features` must map non-empty module names to non-empty module names; got {k!r}: {v!r}")
    return dict(features)


def _resolve(model: nn.Module, names: list[str], who: str) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=4)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"`features` names {name!r}, which is not a module of the {who} ({type(model).__name__}){hint}")
        found[name] = modules[name]
    return found


def _broadcast(tensors: list[torch.Tensor]) -> None:
    """Give every rank rank zero's values (a teacher copied from differently initialized ranks, a projection
    fitted on each rank's own batch)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    with torch.no_grad():
        for t in tensors:
            if t.is_floating_point():
                torch.distributed.broadcast(t.data, src=0)
