"""KnowledgeDistillation: the pure core (losses, logits, projections, fingerprints) and the callback (loss mixes,
features after pruning, outputs of every shape, errors, composition, checkpoints, resume, YAML)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_accel
from lightning_accel import (
    CompositionError,
    KnowledgeDistillation,
    MixedPrecision,
    Quantization,
    StructuredPruning,
)
from lightning_accel._lifecycle import accel_callbacks, find_conflict
from lightning_accel.demos import DigitsDataModule, DigitsTransformer
from lightning_accel.distillation import (
    DistillationNoEffectWarning,
    FeatureProjection,
    distillation_loss,
    extract_logits,
    fingerprint,
    frozen_copy,
    projection_dim,
)
from tests.helpers import RandomDataModule, TinyConvNet, TinyMLP, tiny_trainer
from tests.helpers.teacher import config_with_teacher, teacher_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- core
def test_kl_loss_is_hinton_with_temperature_squared_and_mse_matches_logits():
    s, t = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    T = 3.0
    expected = (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    kl = distillation_loss(s, t, loss="kl", temperature=T)
    assert torch.allclose(kl, expected, atol=1e-6)
    kl.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert float(distillation_loss(t, t, temperature=T)) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(distillation_loss(s, t, loss="mse"), F.mse_loss(s, t))
    # sequence logits [B, L, C]: averaged over every position
    s3, t3 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(distillation_loss(s3, t3), distillation_loss(s3.reshape(6, 4), t3.reshape(6, 4)))
    with pytest.raises(ValueError, match=r"shape \(6, 4\) but the student's have shape \(6, 5\)"):
        distillation_loss(s, torch.randn(6, 4))
    with pytest.raises(ValueError, match="`loss` must be one of 'kl', 'mse'; got 'l1'"):
        distillation_loss(s, t, loss="l1")  # type: ignore[arg-type]


@dataclasses.dataclass
class _HFOutput:  # the shape of a Hugging Face ModelOutput: attributes, logits among them
    loss: torch.Tensor | None
    logits: torch.Tensor


def test_extract_logits_from_every_output_shape():
    x = torch.randn(2, 3)
    assert extract_logits(x) is x
    assert extract_logits({"logits": x, "aux": 1}) is x
    assert extract_logits(_HFOutput(None, x)) is x
    assert extract_logits((torch.zeros(1), x), "1") is x
    assert extract_logits({"scores": x}, "scores") is x
    with pytest.raises(TypeError, match=r"dict with keys \['scores'\] without a `logits` tensor; set `output_key`"):
        extract_logits({"scores": x})
    with pytest.raises(TypeError, match=r"`output_key`='out' is not a key .* its keys are \['scores'\]"):
        extract_logits({"scores": x}, "out")
    with pytest.raises(TypeError, match="out of range"):
        extract_logits((x,), "3")


def test_projection_dim_and_least_squares_start():
    assert projection_dim((8, 16, 4, 4), (8, 32, 4, 4)) == 1 and projection_dim((8, 4, 32), (8, 4, 64)) == 2
    assert projection_dim((8, 4), (8, 4)) is None
    with pytest.raises(ValueError, match=r"\(8, 16, 2\) and teacher feature of shape \(8, 32, 4\) cannot be matched"):
        projection_dim((8, 16, 2), (8, 32, 4))
    s = torch.randn(64, 6, 3, 3)
    w = torch.randn(10, 6)
    t = torch.einsum("oc,bchw->bohw", w, s) + 0.5
    proj = FeatureProjection(6, 10, dim=1).fit_(s, t, ridge=1e-8)
    assert torch.allclose(proj(s), t, atol=1e-3)


def test_frozen_copy_and_fingerprint():
    model = TinyMLP()
    teacher = frozen_copy(model)
    assert teacher is not model and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert fingerprint(teacher) == fingerprint(model)
    with torch.no_grad():
        model.fc1.weight[0, 0] += 1.0
    assert fingerprint(teacher) != fingerprint(model)


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(teacher=3), TypeError, "`teacher` must be None, a checkpoint path or an nn.Module; got a int"),
        (dict(teacher=" "), ValueError, "`teacher` must be None or a non-empty checkpoint path; got ' '"),
        (dict(temperature=0.0), ValueError, r"`temperature` must be a number > 0.0; got 0.0"),
        (dict(alpha=1.5), ValueError, r"`alpha` must be a number in \[0.0, 1.0\]; got 1.5"),
        (dict(loss="kld"), ValueError, "`loss` must be one of 'kl', 'mse'; got 'kld'"),
        (dict(features=["blocks.1"]), ValueError, "`features` must be None or a non-empty mapping"),
        (dict(features={"a": ""}), ValueError, "`features` must map non-empty module names"),
        (dict(feature_weight=-1.0, features={"a": "a"}), ValueError, "`feature_weight` must be a number >= 0.0; got -1.0"),
        (dict(output_key=""), ValueError, "`output_key` must be None or a non-empty key"),
        (dict(projection_lr=0), ValueError, "`projection_lr` must be a number > 0.0; got 0"),
        (dict(init_student_from_teacher="yes"), ValueError, "`init_student_from_teacher` must be a bool"),
        (dict(init_student_from_teacher=True), ValueError, "`init_student_from_teacher`=True needs a `teacher` path"),
        (dict(verbose=2), ValueError, "`verbose` must be one of 0, 1; got 2"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        KnowledgeDistillation(**kwargs)


def test_options_without_effect_warn():
    with pytest.warns(DistillationNoEffectWarning, match="`temperature` has no effect with `loss`='mse'"):
        KnowledgeDistillation(loss="mse", temperature=4.0)
    with pytest.warns(DistillationNoEffectWarning, match="adds nothing to the loss"):
        KnowledgeDistillation(alpha=0.0)


def test_setup_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="`teacher`='missing.ckpt': no such checkpoint file"):
        tiny_trainer(tmp_path, callbacks=[KnowledgeDistillation(teacher="missing.ckpt")]).fit(TinyMLP(), RandomDataModule())
    with pytest.raises(ValueError, match=r"`features` names 'fc3', which is not a module of the teacher \(TinyMLP\); did you mean 'fc2', 'fc1'"):
        tiny_trainer(tmp_path, callbacks=[KnowledgeDistillation(features={"fc1": "fc3"})]).fit(TinyMLP(), RandomDataModule())
    assert find_conflict(KnowledgeDistillation(), KnowledgeDistillation())  # both wrap training_step


# ----------------------------------------------------------------------------------------------- behaviour
class _Probe(pl.Callback):
    """After every step: the loss Lightning optimized, the callback's logged terms, the teacher's state."""

    def __init__(self, kd: KnowledgeDistillation) -> None:
        self.kd = kd
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        teacher = self.kd.teacher_model
        self.steps.append(
            {
                "loss": float(outputs["loss"]),
                **self.kd.metrics,
                "teacher_training": teacher.training,
                "teacher_grad": any(p.requires_grad for p in teacher.parameters()),
                "teacher_fp": fingerprint(teacher),
                "logged": set(trainer.callback_metrics),
            }
        )


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(alpha=1.0, loss="mse"), dict(alpha=0.25, temperature=4.0)], ids=["kl-0.5", "mse-1.0", "kl-0.25-T4"]
)
def test_loss_mix_and_a_frozen_untouched_teacher(tmp_path, kwargs):
    model = TinyMLP()
    start_fp = fingerprint(model)
    keys_before = set(model.__dict__)
    kd = KnowledgeDistillation(verbose=0, **kwargs)
    probe = _Probe(kd)
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=4, callbacks=[kd, probe]).fit(model, RandomDataModule())
    alpha = kd.alpha
    assert len(probe.steps) == 4
    first = probe.steps[0]
    assert first["distill/loss"] == pytest.approx(0.0, abs=1e-6)  # the teacher is the student at fit start
    for s in probe.steps:
        assert s["loss"] == pytest.approx((1 - alpha) * s["distill/task_loss"] + alpha * s["distill/loss"], rel=1e-5)
        assert not s["teacher_training"] and not s["teacher_grad"] and s["teacher_fp"] == start_fp
        assert {"distill/loss", "distill/task_loss"} <= s["logged"]
    assert probe.steps[-1]["distill/loss"] > 0  # the student moved away from its teacher
    assert fingerprint(model) != start_fp
    # nothing stays on the module: no wrapper, no hook, no replay stand-in; the teacher is released
    assert not {"training_step", "on_load_checkpoint"} & (set(model.__dict__) - keys_before)
    assert not model._forward_hooks and kd.teacher_model is None


def test_a_teacher_module_is_restored_and_a_dict_loss_keeps_its_other_keys(tmp_path):
    class DictStep(TinyMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return {"loss": F.cross_entropy(self(x), y), "n": len(y)}

    teacher = TinyMLP(hidden=64)
    teacher.train()
    kd = KnowledgeDistillation(teacher=teacher, verbose=0)
    probe = _Probe(kd)
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[kd, probe]).fit(DictStep(), RandomDataModule())
    assert probe.steps[0]["distill/loss"] > 0 and not probe.steps[0]["teacher_training"]
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # as the user left it


class _DictOut(TinyMLP):
    """forward returns a dict (``output="dict"``) or a Hugging Face-like object (``"hf"``) or a tuple."""

    def __init__(self, output: str = "dict", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.output = output

    def forward(self, x):
        logits = super().forward(x)
        if self.output == "dict":
            return {"scores": logits, "hidden": logits.detach()}
        if self.output == "hf":
            return _HFOutput(None, logits)
        return (logits.detach() * 0, logits)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        logits = {"dict": lambda: out["scores"], "hf": lambda: out.logits, "tuple": lambda: out[1]}[self.output]()
        return F.cross_entropy(logits, y)


@pytest.mark.parametrize("output, key", [("dict", "scores"), ("hf", None), ("tuple", "1")])
def test_output_key_finds_logits_in_dicts_objects_and_tuples(tmp_path, output, key):
    kd = KnowledgeDistillation(output_key=key, alpha=1.0, verbose=0)
    probe = _Probe(kd)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[kd, probe])
    trainer.fit(_DictOut(output), RandomDataModule())
    assert probe.steps[-1]["distill/loss"] > 0
    assert probe.steps[-1]["loss"] == pytest.approx(probe.steps[-1]["distill/loss"], rel=1e-5)


def test_dict_output_without_output_key_is_refused_with_its_keys(tmp_path):
    with pytest.raises(TypeError, match=r"dict with keys \['scores', 'hidden'\] without a `logits` tensor"):
        tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                     callbacks=[KnowledgeDistillation(verbose=0)]).fit(_DictOut("dict"), RandomDataModule())


def test_a_training_step_that_never_calls_forward_fails_after_the_first_step(tmp_path):
    class NoForward(TinyMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.head(F.relu(self.fc2(F.relu(self.fc1(x))))), y)

    model = NoForward()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[KnowledgeDistillation(verbose=0)])
    with pytest.raises(RuntimeError, match="training_step of NoForward never called the module's forward"):
        trainer.fit(model, RandomDataModule())
    assert trainer.global_step == 0 and "training_step" not in model.__dict__ and not model._forward_hooks


def test_a_teacher_with_other_outputs_is_refused_with_both_shapes(tmp_path):
    kd = KnowledgeDistillation(teacher=TinyMLP(classes=7), verbose=0)
    with pytest.raises(ValueError, match=r"the teacher's output has shape \(16, 7\) but the student's has shape \(16, 4\)"):
        tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[kd]).fit(TinyMLP(), RandomDataModule())


def test_features_get_a_learned_projection_after_structured_pruning(tmp_path):
    model = TinyConvNet(width=8)
    kd = KnowledgeDistillation(features={"bn1": "bn1", "conv2": "conv2"}, feature_weight=0.5, verbose=0)
    prune = StructuredPruning(amount=0.5, schedule="one_shot", start=1, verbose=0)
    probe = _Probe(kd)
    tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[prune, kd, probe]).fit(model, RandomDataModule(shape=(1, 8, 8)))
    assert model.conv1.out_channels == 4  # the student is pruned, the teacher was not
    before, after = probe.steps[2], probe.steps[3]  # pruned at the end of epoch 0
    assert {"distill/feature/bn1", "distill/feature/conv2"} <= set(before)
    projections = kd.projections
    assert set(projections) == {"bn1", "conv2"}
    assert (projections["bn1"].in_features, projections["bn1"].out_features, projections["bn1"].dim) == (4, 8, 1)
    assert after["loss"] == pytest.approx(
        0.5 * after["distill/task_loss"] + 0.5 * after["distill/loss"]
        + 0.5 * (after["distill/feature/bn1"] + after["distill/feature/conv2"]), rel=1e-5
    )


# ----------------------------------------------------------------------------------------------- composition
def _compress_pipeline():
    return [
        StructuredPruning(amount=0.5, schedule="one_shot", start=1, verbose=0),
        Quantization(mode="nf4", backend="bitsandbytes", when="fit_end", monitor=None, save_checkpoint=False),
        MixedPrecision(dtype="bf16"),
        KnowledgeDistillation(features={"blocks.0.mlp.0": "blocks.0.mlp.0"}, verbose=0),
    ]


@pytest.mark.parametrize("perm", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 3, 0, 1)], ids=["kd-last", "kd-first", "shuffled"])
def test_with_structured_pruning_nf4_and_mixed_precision_in_any_order(tmp_path, perm):
    cbs = _compress_pipeline()
    kd = cbs[3]

    class Check(pl.Callback):
        def __init__(self) -> None:
            self.widths: list[tuple[int, int]] = []
            self.teacher_dtypes: list[torch.dtype] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                kd.teacher_model.head.register_forward_hook(lambda m, a, out: self.teacher_dtypes.append(out.dtype))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.widths.append((pl_module.blocks[0].mlp[0].out_features, kd.teacher_model.blocks[0].mlp[0].out_features))

    check = Check()
    pl.seed_everything(0)
    model = DigitsTransformer(dim=32, depth=1, heads=2)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0,
                           callbacks=[*(cbs[i] for i in perm), check])
    trainer.fit(model, DigitsDataModule(batch_size=32, drop_last=True))
    assert [type(cb).__name__ for cb in accel_callbacks(trainer)] == [
        "KnowledgeDistillation", "StructuredPruning", "Quantization", "MixedPrecision"]
    # the student was pruned during fit while the teacher kept every neuron, both ran under bf16 autocast
    assert check.widths == [(64, 64)] * 3 + [(32, 64)] * 3
    assert check.teacher_dtypes[:1] == [torch.bfloat16]  # in the student's autocast region
    assert kd.projections["blocks.0.mlp.0"].in_features == 32
    # the student is 4-bit after fit; nothing of the distillation stays on it
    assert type(model.blocks[0].mlp[0]).__name__.endswith("Linear4bit")
    assert "training_step" not in model.__dict__ and not model._forward_hooks
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_a_student_quantized_at_setup_learns_from_a_float_teacher(tmp_path):
    kd = KnowledgeDistillation(verbose=0)
    probe = _Probe(kd)
    q = Quantization(mode="nf4", backend="bitsandbytes", when="setup", monitor=None)
    model = DigitsTransformer(dim=32, depth=1, heads=2)
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[q, kd, probe]).fit(
        model, DigitsDataModule(batch_size=32))
    assert type(model.blocks[0].mlp[0]).__name__.endswith("Linear4bit")
    assert probe.steps[0]["distill/loss"] > 0  # the 4-bit student differs from its float teacher from step one


# ----------------------------------------------------------------------------------------------- checkpoints
class _Stop(pl.Callback):
    """Interrupt the fit with an exception when a batch starts at ``global_step == step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("interrupted")


def _run(root: Path, ckpt_path: str | None = None, stop: int | None = None, seed: int = 0):
    pl.seed_everything(seed)
    model = TinyConvNet(width=8)  # built unpruned, with the same initial weights: the teacher copy matches
    pl.seed_everything(0)
    kd = KnowledgeDistillation(features={"bn1": "bn1"}, verbose=0)
    prune = StructuredPruning(amount=0.5, schedule="one_shot", start=1, verbose=0)
    ckpt = ModelCheckpoint(dirpath=root / "ckpts", every_n_epochs=1, save_top_k=-1)
    cbs = [kd, prune, ckpt] + ([_Stop(stop)] if stop is not None else [])
    trainer = tiny_trainer(root, max_epochs=4, limit_train_batches=3, limit_val_batches=0, callbacks=cbs,
                           enable_checkpointing=True)
    trainer.fit(model, RandomDataModule(shape=(1, 8, 8)), ckpt_path=ckpt_path)
    return model, kd, trainer


def test_interrupted_and_resumed_equals_uninterrupted_and_the_teacher_is_not_saved(tmp_path):
    full, full_kd, full_trainer = _run(tmp_path / "full")
    full_proj = full_kd.projections["bn1"]
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(tmp_path / "killed", stop=8)
    ckpt_file = tmp_path / "killed" / "ckpts" / "epoch=1-step=6.ckpt"
    saved = torch.load(ckpt_file, weights_only=False)
    # the checkpoint holds the student only (pruned), the teacher's name and fingerprint, the projection
    student_keys = set(TinyConvNet(width=8).state_dict())
    assert set(saved["state_dict"]) == student_keys and saved["state_dict"]["conv1.weight"].shape[0] == 4
    state = saved["callbacks"][full_kd.state_key]
    assert state["teacher"]["source"] == "copy" and len(state["teacher"]["fingerprint"]) == 16
    assert set(state["projections"]) == {"bn1"} and state["projections"]["bn1"]["in_features"] == 4
    tensors = [v for rec in state["projections"].values() for v in rec["weights"].values()]
    assert sum(t.numel() for t in tensors) == 4 * 8 + 8  # only the projection's weights, not a teacher
    # resumed into a freshly built (unpruned) model
    resumed, resumed_kd, trainer = _run(tmp_path / "resumed", ckpt_path=str(ckpt_file))
    assert trainer.global_step == full_trainer.global_step == 12
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    for k, v in full_proj.state_dict().items():
        assert torch.equal(resumed_kd.projections["bn1"].state_dict()[k], v), k
    # test(ckpt_path=) replays the pruning into a fresh model; distillation stays out of evaluation
    fresh = TinyConvNet(width=8)
    kd = KnowledgeDistillation(verbose=0)  # any lightning-accel callback makes the Trainer replay the pruning
    tester = tiny_trainer(tmp_path, callbacks=[kd])
    got = tester.test(fresh, RandomDataModule(shape=(1, 8, 8)), ckpt_path=str(tmp_path / "full" / "ckpts" / "epoch=3-step=12.ckpt"),
                      verbose=False)[0]["test_acc"]
    want = tiny_trainer(tmp_path).test(full, RandomDataModule(shape=(1, 8, 8)), verbose=False)[0]["test_acc"]
    assert got == pytest.approx(want) and fresh.conv1.out_channels == 4 and kd.teacher_model is None
    assert "training_step" not in fresh.__dict__ and "on_load_checkpoint" not in fresh.__dict__


def test_resuming_with_another_teacher_is_refused(tmp_path):
    _run(tmp_path / "a")
    with pytest.raises(ValueError, match="is not the one the checkpoint was trained with"):
        _run(tmp_path / "b", ckpt_path=str(tmp_path / "a" / "ckpts" / "epoch=1-step=6.ckpt"), seed=1)


# ----------------------------------------------------------------------------------------------- YAML
def test_lightning_cli_yaml_with_a_teacher_checkpoint_path(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train import main
    finally:
        sys.path.remove(str(ROOT / "examples"))
    config = config_with_teacher(ROOT / "examples" / "configs" / "distillation.yaml", tmp_path)
    cli = main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"])
    (kd,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, KnowledgeDistillation)]
    assert kd.teacher == str(tmp_path / "teacher.ckpt") and kd.init_student_from_teacher
    assert kd.metrics["distill/loss"] >= 0 and "distill/task_loss" in kd.metrics
    assert lightning_accel.KnowledgeDistillation is KnowledgeDistillation
    # the teacher as a path: a checkpoint written by lightning_accel (or any Lightning checkpoint) of the same class
    torch.manual_seed(1)
    trained = teacher_checkpoint(TinyMLP(), tmp_path / "mlp.ckpt")
    kd = KnowledgeDistillation(teacher=str(trained), verbose=0)
    probe = _Probe(kd)
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[kd, probe]).fit(TinyMLP(), RandomDataModule())
    assert probe.steps[0]["distill/loss"] > 0


def test_pipeline_refuses_two_distillations(tmp_path):
    with pytest.raises((CompositionError, RuntimeError), match="KnowledgeDistillation"):
        tiny_trainer(tmp_path, callbacks=[KnowledgeDistillation(verbose=0), KnowledgeDistillation(verbose=0)]).fit(
            TinyMLP(), RandomDataModule())


# ----------------------------------------------------------------------------------------------- a foreign teacher
def test_a_teacher_checkpoint_of_another_class_is_refused_in_a_few_lines(tmp_path):
    """A teacher path is built as the student's class: a checkpoint of another class (here a TinyConvNet's for a
    TinyMLP student, with init_student_from_teacher too) names `teacher`, the path and the class that wrote it."""
    trained = teacher_checkpoint(TinyConvNet(), tmp_path / "conv.ckpt")
    for init in (False, True):
        kd = KnowledgeDistillation(teacher=str(trained), init_student_from_teacher=init, verbose=0)
        with pytest.raises(ValueError, match=r"`teacher`=.*conv\.ckpt") as info:
            tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[kd]).fit(TinyMLP(), RandomDataModule())
        message = str(info.value)
        assert len(message) < 1200, message
        assert "TinyMLP" in message and "TinyConvNet" in message


def test_load_checkpoint_of_another_width_says_what_does_not_fit(tmp_path):
    path = teacher_checkpoint(TinyMLP(hidden=64), tmp_path / "wide.ckpt")
    with pytest.raises(ValueError, match=r"written by a tests\.helpers\.tiny\.TinyMLP, do not fit TinyMLP: \d+ size mismatches") as info:
        lightning_accel.load_checkpoint(TinyMLP, path, hidden=32)
    assert len(str(info.value)) < 1200


class _OtherArgs(TinyMLP):
    def __init__(self, depth: int = 1) -> None:
        super().__init__()


def test_load_checkpoint_with_a_class_that_takes_other_arguments(tmp_path):
    ckpt = {"state_dict": {}, "hyper_parameters": {"width": 4, "_class_path": "somewhere.WideNet"}}
    with pytest.raises(ValueError, match=r"cannot build _OtherArgs from the hyper-parameters of the checkpoint, written by a "
                       r"somewhere\.WideNet .*unexpected keyword argument 'width'"):
        lightning_accel.load_checkpoint(_OtherArgs, ckpt)
