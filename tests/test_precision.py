"""MixedPrecision: dtype choice by hardware, fp32 islands, fp16 loss scaling, conflicts, resume, DDP."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import Precision
from torch import nn

from lightning_accel import (
    CompositionError,
    MixedPrecision,
    NoMatchError,
    PrecisionNoEffectWarning,
    PrecisionWarning,
    choose_precision,
    fp32_islands_,
    remove_fp32_islands_,
    resolve_precision,
)
from lightning_accel._lifecycle import find_conflict
from lightning_accel.demos import DigitsDataModule, DigitsTransformer
from tests.helpers import RandomDataModule, TinyMLP, run_python, tiny_trainer


def _cpu_bf16(monkeypatch, avx512_bf16: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


# --------------------------------------------------------------------------- choosing the dtype (pure core)
@pytest.mark.parametrize(
    "avx, amx, dtype, words",
    [
        (True, False, torch.bfloat16, "AVX512-BF16"),
        (False, True, torch.bfloat16, "AMX"),
        (False, False, torch.float32, "neither AVX512-BF16 nor AMX"),
    ],
)
def test_choose_precision_on_cpu(monkeypatch, avx, amx, dtype, words):
    _cpu_bf16(monkeypatch, avx, amx)
    dt, reason = choose_precision("cpu")
    assert dt == dtype and words in reason
    assert choose_precision(torch.device("cpu")).name == {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


@pytest.mark.parametrize(
    "model, dtype",
    [
        (DigitsTransformer(dim=64, depth=2, heads=4), torch.float32),  # largest Linear 192 x 64: bf16 is slower here
        (DigitsTransformer(dim=256, depth=1, heads=4), torch.bfloat16),  # 768 x 256
        (nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8, 2)), torch.bfloat16),  # convolutions gain when narrow
        (nn.Sequential(nn.LayerNorm(4)), torch.bfloat16),  # no Linear layer: nothing to judge by
    ],
    ids=["narrow-transformer", "wide-transformer", "narrow-cnn", "no-linear"],
)
def test_auto_on_a_bf16_cpu_picks_float32_for_a_narrow_linear_model(monkeypatch, model, dtype):
    _cpu_bf16(monkeypatch, True)
    choice = resolve_precision("auto", "cpu", model)
    assert choice.dtype == dtype and choose_precision("cpu", model) == choice
    assert ("Linear weight has" in choice.reason) == (dtype == torch.float32)
    assert choose_precision("cpu").dtype == torch.bfloat16  # without a model: the device alone decides
    explicit = resolve_precision("bf16", "cpu", model)  # an explicit request is honoured, with the reason
    assert explicit.dtype == torch.bfloat16 and ("slower than float32" in explicit.reason) == (dtype == torch.float32)
    with pytest.raises(ValueError, match="`model` must be a torch.nn.Module or None; got str"):
        choose_precision("cpu", "DigitsTransformer")


def test_mixed_precision_auto_trains_a_narrow_transformer_in_float32_and_warns_for_explicit_bf16(tmp_path, monkeypatch):
    _cpu_bf16(monkeypatch, True)
    data = DigitsDataModule(batch_size=64, drop_last=True)
    auto = MixedPrecision()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[auto])
    trainer.fit(DigitsTransformer(dim=64, depth=2, heads=4), data)
    assert auto.choice.dtype == torch.float32 and trainer.precision == "32-true"
    explicit = MixedPrecision("bf16")
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[explicit])
    with pytest.warns(PrecisionWarning, match="may be slower than float32"):
        trainer.fit(DigitsTransformer(dim=64, depth=2, heads=4), data)
    assert explicit.choice.dtype == torch.bfloat16


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_choose_precision_on_cuda_never_picks_fp32_and_prefers_bf16(monkeypatch, native, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0) if native else (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    choice = choose_precision("cuda:0")
    assert choice.dtype == dtype
    assert ("natively" in choice.reason) == native and ("loss scaling" in choice.reason) == (not native)


def test_resolve_precision_honours_explicit_requests(monkeypatch):
    _cpu_bf16(monkeypatch, False)
    assert resolve_precision("fp32", "cpu").dtype == torch.float32
    bf16 = resolve_precision("bf16", "cpu")
    assert bf16.dtype == torch.bfloat16 and "emulated" in bf16.reason
    fp16 = resolve_precision("fp16", "cpu")
    assert fp16.dtype == torch.float16 and "emulated" in fp16.reason
    assert resolve_precision("auto", "cpu").dtype == torch.float32  # fp16 is never auto-chosen on a CPU
    assert resolve_precision("fp16", "cuda").dtype == torch.float16
    with pytest.raises(ValueError, match="`dtype` must be one of 'auto', 'bf16', 'fp16', 'fp32'; got 'int8'"):
        resolve_precision("int8", "cpu")
    with pytest.raises(ValueError, match="`device`"):
        choose_precision("gpu-please")


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="bfloat16"), "`dtype` must be one of 'auto', 'bf16', 'fp16', 'fp32'; got 'bfloat16'"),
        (dict(fp32_modules="LayerNorm"), "`fp32_modules` must be None or a non-empty list of glob patterns"),
        (dict(fp32_modules=[]), "`fp32_modules` must be None or a non-empty list"),
        (dict(init_scale=0.0), "`init_scale` must be a number > 0.0; got 0.0"),
        (dict(init_scale=float("inf")), "`init_scale` must be a finite number > 0; got inf"),
        (dict(growth_interval=0), "`growth_interval` must be an integer >= 1; got 0"),
        (dict(growth_interval=2.5), "`growth_interval` must be an integer >= 1; got 2.5"),
    ],
)
def test_misconfiguration_is_rejected_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixedPrecision(**kwargs)


class _CustomPrecision(Precision):
    pass


@pytest.mark.parametrize(
    "trainer_kwargs, match",
    [
        (dict(precision="bf16-mixed"), r"cannot be combined with Trainer\(precision='bf16-mixed'\)"),
        (dict(precision="64-true"), r"cannot be combined with Trainer\(precision='64-true'\)"),
        (dict(plugins=[_CustomPrecision()]), "cannot be combined with the precision plugin _CustomPrecision"),
    ],
)
def test_conflicting_trainer_precision_is_named(tmp_path, trainer_kwargs, match):
    model = TinyMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[MixedPrecision("bf16")], **trainer_kwargs)
    with pytest.raises(CompositionError, match=match):
        trainer.fit(model, RandomDataModule())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing touched


def test_two_mixed_precision_callbacks_conflict(tmp_path):
    assert "would install a precision plugin each" in find_conflict(MixedPrecision(), MixedPrecision("fp32"))
    with pytest.raises(CompositionError, match=r"callbacks\[0\] and callbacks\[1\] are both MixedPrecision"):
        tiny_trainer(tmp_path, callbacks=[MixedPrecision(), MixedPrecision("fp32")])  # refused by Trainer() already


# --------------------------------------------------------------------------- fp32 islands (pure core)
def test_fp32_islands_compute_in_float32_inside_autocast_and_keep_keys():
    torch.manual_seed(0)
    model = DigitsTransformer(dim=16, heads=2, depth=2)
    x = torch.rand(4, 1, 8, 8)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
    out_dtypes: dict[str, torch.dtype] = {}
    for name in ("blocks.0.norm1", "head", "blocks.0.mlp.0"):
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: out_dtypes.__setitem__(name, o.dtype))
    names = fp32_islands_(model, ["LayerNorm", "head"])
    assert names == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm", "head"]
    assert fp32_islands_(model, ["LayerNorm", "head"]) == names  # idempotent
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # no autocast: unchanged
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out_dtypes == {"blocks.0.norm1": torch.float32, "head": torch.float32, "blocks.0.mlp.0": torch.bfloat16}
    assert out.dtype == torch.float32
    assert sorted(remove_fp32_islands_(model)) == sorted(names)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
    with pytest.raises(NoMatchError, match="`fp32_modules` pattern 'BatchNorm' matches no"):
        fp32_islands_(model, ["BatchNorm"])


# --------------------------------------------------------------------------- training
class _DtypeProbe(pl.Callback):
    """Records output dtypes of a few modules during the first training and test batches."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.seen: dict[tuple[str, str], torch.dtype] = {}
        self.handles: list = []

    def _hook(self, pl_module, stage):
        for name in self.names:
            fn = lambda m, a, o, name=name: self.seen.setdefault((stage, name), o.dtype) and None  # noqa: E731
            self.handles.append(pl_module.get_submodule(name).register_forward_hook(fn))

    def on_train_start(self, trainer, pl_module):
        self._hook(pl_module, "train")

    def on_test_start(self, trainer, pl_module):
        self._hook(pl_module, "test")

    def on_train_end(self, trainer, pl_module):
        for h in self.handles:
            h.remove()


def test_bf16_trains_with_fp32_islands_and_restores_the_trainer(tmp_path):
    pl.seed_everything(0)
    model = DigitsTransformer(dim=32, heads=2, depth=1)
    keys = list(model.state_dict())
    probe = _DtypeProbe(["blocks.0.mlp.0", "blocks.0.norm1", "head"])
    mp = MixedPrecision("bf16", fp32_modules=["LayerNorm"])
    dm = DigitsDataModule(batch_size=64)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=16, limit_val_batches=2, callbacks=[mp, probe])
    trainer.fit(model, dm)
    assert probe.seen[("train", "blocks.0.mlp.0")] == torch.bfloat16
    assert probe.seen[("train", "blocks.0.norm1")] == torch.float32
    assert probe.seen[("train", "head")] == torch.bfloat16
    assert mp.choice.dtype == torch.bfloat16 and mp.fp32_module_names == ["blocks.0.norm1", "blocks.0.norm2", "norm"]
    assert trainer.callback_metrics["train_loss"] < 1.5  # it learns (chance is ln 10 = 2.3)
    # after the run: no islands left, keys unchanged, the Trainer's own precision is back
    assert list(model.state_dict()) == keys and "forward" not in model.blocks[0].norm1.__dict__
    assert type(trainer.strategy.precision_plugin) is Precision
    # a later stage of the same Trainer sets up again without a conflict and runs under autocast
    trainer.test(model, dm, verbose=False)
    assert probe.seen[("test", "blocks.0.mlp.0")] == torch.bfloat16
    assert probe.seen[("test", "blocks.0.norm1")] == torch.float32


def test_auto_on_a_cpu_without_bf16_stays_float32_and_says_islands_do_nothing(tmp_path, monkeypatch):
    _cpu_bf16(monkeypatch, False)
    mp = MixedPrecision(fp32_modules=["head"])
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[mp])
    with pytest.warns(PrecisionNoEffectWarning, match="`fp32_modules`=\\['head'\\] has no effect: training runs in float32"):
        trainer.fit(TinyMLP(), RandomDataModule())
    assert mp.choice.dtype == torch.float32 and trainer.precision == "32-true"


def test_fp16_counts_and_logs_skipped_steps_and_checkpoints_the_scaler(tmp_path):
    pl.seed_everything(0)
    model = TinyMLP(lr=1e-2)
    mp = MixedPrecision("fp16", init_scale=2.0**28)  # far too high: the first fp16 gradients overflow
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=8, limit_val_batches=0, callbacks=[mp, ckpt], enable_checkpointing=True)
    trainer.fit(model, RandomDataModule())
    assert 1 <= mp.skipped_steps < 16  # some steps skipped, then the scale fell low enough to train
    assert mp.loss_scale == 2.0**28 / 2**mp.skipped_steps  # every skip halves the scale (growth_interval 2000)
    assert trainer.callback_metrics["precision/skipped_steps"] == mp.skipped_steps
    assert trainer.callback_metrics["precision/loss_scale"] == mp.loss_scale
    state = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)["callbacks"]["MixedPrecision"]
    assert state["dtype"] == "fp16" and state["skipped_steps"] == mp.skipped_steps
    assert state["scaler"]["scale"] == mp.loss_scale


def test_kill_and_resume_continues_the_loss_scale(tmp_path):
    """fp16 with a fast-moving loss scale (growth every 2 steps, skips early): a run killed after epoch 1 and
    resumed from its checkpoint ends with the weights, skipped-step count and scale of an uninterrupted run."""
    script = """
        import sys, torch, lightning.pytorch as pl
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning_accel import MixedPrecision
        from lightning_accel.demos import DigitsTransformer, DigitsDataModule
        from tests.helpers import KillAtStep
        mode, out = sys.argv[1], sys.argv[2]
        pl.seed_everything(0)
        mp = MixedPrecision("fp16", init_scale=2.0**20, growth_interval=2)
        cbs = [mp, ModelCheckpoint(dirpath="ckpts", every_n_epochs=1, save_top_k=-1)]
        cbs += [KillAtStep(4)] if mode == "kill" else []
        trainer = pl.Trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=0, accelerator="cpu", logger=False,
                             enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=cbs)
        model = DigitsTransformer(dim=16, heads=2, depth=1)
        trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path="ckpts/epoch=0-step=4.ckpt" if mode == "resume" else None)
        torch.save({"model": model.state_dict(), "skipped": mp.skipped_steps, "scale": mp.loss_scale}, out)
    """
    run_python(script, tmp_path, "kill", "k.pt", expect=17)
    saved = torch.load(tmp_path / "ckpts" / "epoch=0-step=4.ckpt", weights_only=False)["callbacks"]["MixedPrecision"]
    assert saved["scaler"]["scale"] != 2.0**20  # the scale moved during the first epoch
    run_python(script, tmp_path, "resume", "resumed.pt")
    run_python(script, tmp_path, "full", "full.pt")
    resumed, full = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt")
    assert resumed["skipped"] == full["skipped"] and resumed["scale"] == full["scale"]
    for k, v in full["model"].items():
        assert torch.equal(resumed["model"][k], v), k


@pytest.mark.ddp
def test_bf16_with_islands_under_ddp(tmp_path):
    script = """
        import sys, torch, lightning.pytorch as pl
        from lightning_accel import MixedPrecision
        from lightning_accel.demos import DigitsTransformer, DigitsDataModule
        pl.seed_everything(0)
        seen = {}
        class Probe(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                for n in ("blocks.0.mlp.0", "blocks.0.norm1"):
                    pl_module.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, o.dtype) and None)
        mp = MixedPrecision("bf16", fp32_modules=["LayerNorm"])
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=4,
                             limit_val_batches=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, callbacks=[mp, Probe()])
        model = DigitsTransformer(dim=16, heads=2, depth=1)
        trainer.fit(model, DigitsDataModule(batch_size=32))
        assert seen == {"blocks.0.mlp.0": torch.bfloat16, "blocks.0.norm1": torch.float32}, seen
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        if trainer.global_rank == 0:
            assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
            print("DDP-OK", trainer.world_size)
    """
    proc = run_python(script, tmp_path, timeout=300)
    assert "DDP-OK 2" in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["auto", "fp16"])
def test_cuda_amp_trains_and_scales_fp16(tmp_path, dtype):
    mp = MixedPrecision(dtype)
    trainer = tiny_trainer(tmp_path, accelerator="gpu", max_epochs=1, limit_train_batches=8, limit_val_batches=0, callbacks=[mp], deterministic=False)
    trainer.fit(TinyMLP(), RandomDataModule())
    assert mp.choice.dtype in (torch.bfloat16, torch.float16)
    if mp.choice.dtype == torch.float16:
        assert mp.loss_scale is not None and trainer.callback_metrics["precision/skipped_steps"] >= 0
    else:
        assert torch.cuda.is_bf16_supported(including_emulation=False)


def test_island_forward_survives_deepcopy_and_pickle():
    import copy
    import pickle

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    fp32_islands_(model, ["LayerNorm"])
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert clone(torch.rand(2, 4)).dtype == torch.float32
        assert clone[1].forward.module is clone[1]


class _NaNLoss(TinyMLP):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * float("nan")


def test_fp16_steps_all_skipped_are_warned_about(tmp_path):
    """fp16 whose every step is skipped for non-finite gradients says so once (the model is not training), instead
    of only counting the skips."""
    mp = MixedPrecision("fp16")
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=6, limit_val_batches=0, callbacks=[mp])
    with pytest.warns(PrecisionWarning, match="the last 8 optimizer steps were all skipped") as record:
        trainer.fit(_NaNLoss(), RandomDataModule())
    assert mp.skipped_steps == 12
    assert sum("all skipped" in str(w.message) for w in record) == 1
