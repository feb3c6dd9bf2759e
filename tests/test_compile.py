"""TorchCompile and the compile_ core: real compilation (graphs counted), in-place and portable checkpoints,
regional compilation, fallback, recompilation reporting, structure changes, composition, resume, DDP.

Most tests use the cheap ``eager``/``aot_eager`` backends because what they check is the plumbing; the
inductor test (and ``examples/configs/compile.yaml`` in ``test_configs.py``) compile for real.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

from lightning_accel import (
    CompileFallbackWarning,
    CompileNoEffectWarning,
    CompileWatch,
    MixedPrecision,
    NoMatchError,
    RecompilationWarning,
    TorchCompile,
    compile_,
    compile_optimizer_,
    notify_structure_changed,
    uncompile_,
)
from lightning_accel._lifecycle import AccelCallback, accel_callbacks, find_conflict
from lightning_accel.compile.core import compiled_modules, is_compiled, uncompile_optimizer_
from lightning_accel.demos import Block, DigitsDataModule, DigitsTransformer
from tests.helpers import RandomDataModule, TinyMLP, run_python, tiny_trainer


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="fast"), "`mode` must be one of 'default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'; got 'fast'"),
        (dict(backend="inductr"), "`backend` must be one of .*'inductor'.*; got 'inductr'"),
        (dict(options={"max_autotunes": True}), r"`options` has unknown inductor option\(s\) \['max_autotunes'\]"),
        (dict(options={"max_autotune": True}, backend="eager"), "`options` only applies to backend='inductor'"),
        (dict(mode="max-autotune", backend="aot_eager"), "`mode` 'max-autotune' only applies to backend='inductor'"),
        (dict(fullgraph="yes"), "`fullgraph` must be a bool"),
        (dict(dynamic="auto"), "`dynamic` must be None, true or false; got 'auto'"),
        (dict(modules="blocks.*"), "`modules` must be None or a non-empty list of glob patterns"),
        (dict(compile_optimizer=1), "`compile_optimizer` must be a bool"),
        (dict(stages=["train"]), "`stages` must be one of 'fit', 'validate', 'test', 'predict'; got 'train'"),
        (dict(stages=[]), "`stages` must be a non-empty list"),
        (dict(stages="fit"), "`stages` must be a non-empty list"),
        (dict(stages=["fit", "fit"]), "`stages` must not repeat a stage"),
        (dict(fallback="ignore"), "`fallback` must be one of 'eager', 'raise'; got 'ignore'"),
        (dict(when="later"), "`when` must be one of 'settled', 'start'; got 'later'"),
        (dict(cache_dir=""), "`cache_dir` must be None or a folder path"),
        (dict(cache_dir=3), "`cache_dir` must be None or a folder path like 'lightning_logs/compile_cache'; got 3"),
        (dict(compile_teacher="yes"), "`compile_teacher` must be a bool"),
    ],
)
def test_misconfiguration_is_rejected_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TorchCompile(**kwargs)


def test_bad_module_pattern_fails_at_setup_before_touching_the_model(tmp_path):
    model = TinyMLP()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[TorchCompile(modules=["blocks.*"], backend="eager")])
    with pytest.raises(NoMatchError, match="`modules` pattern 'blocks.\\*' matches no module of"):
        trainer.fit(model, RandomDataModule())
    assert not compiled_modules(model)


def test_conflicts_are_named(tmp_path):
    assert "both compile the model" in find_conflict(TorchCompile(), TorchCompile(mode="max-autotune"))

    class SwapsOptimizers(AccelCallback):  # stands in for EightBitOptimizer: decided by capability, not by name
        stage = "optimizer"
        capabilities = frozenset({"owns_optimizer"})

    assert "cannot trace" in find_conflict(TorchCompile(compile_optimizer=True), SwapsOptimizers())
    assert find_conflict(TorchCompile(), SwapsOptimizers()) is None


# --------------------------------------------------------------------------- the pure core
def test_sequential_is_really_compiled_in_place_with_keys_unchanged():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    ref = seq(x)
    keys = list(seq.state_dict())

    before = _graphs()
    seq.compile(backend="eager")  # torch's own in-place compile of a Sequential compiles nothing ...
    seq(x)
    assert _graphs() == before
    seq._compiled_call_impl = None

    assert compile_(seq, backend="eager") == [""]  # ... ours does
    assert is_compiled(seq) and list(seq.state_dict()) == keys
    torch.testing.assert_close(seq(x), ref)
    assert _graphs() == before + 1
    assert uncompile_(seq) == [""] and not is_compiled(seq)


def test_regional_compilation_shares_code_between_identical_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(*(Block(16, 2, 2.0) for _ in range(8)))
    x = torch.randn(3, 4, 16)
    ref = model(x)
    names = compile_(model, ["*"], backend="eager")
    assert names == [str(i) for i in range(8)]  # outermost matches only (not blocks' own children)
    watch = CompileWatch().start()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    watch.poll()
    assert watch.graphs == 1  # eight blocks, one graph: identical blocks reuse the compiled code
    model(x.requires_grad_())
    watch.poll()
    assert watch.graphs == 2 and len(watch.recompiles) == 1 and "grad_mode" in watch.recompiles[0].reason
    with pytest.raises(NoMatchError, match="`modules` pattern 'encoder.*' matches no module of"):
        compile_(model, ["encoder.*"])


class _Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum().item() > 1e9:  # data-dependent Python control flow: a graph break
            h = h * 2
        return h


def test_fallback_warns_and_runs_eagerly_or_raises():
    model, x = _Breaks(), torch.randn(2, 4)
    ref = model(x)
    compile_(model, backend="eager", fullgraph=True)
    with pytest.warns(CompileFallbackWarning, match="torch.compile failed for the model \\(_Breaks\\): .*continuing in eager"):
        out = model(x)
    torch.testing.assert_close(out, ref)
    assert not is_compiled(model)  # eager from now on
    compile_(model, backend="eager", fullgraph=True, fallback="raise")
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match="data-dependent"):
        model(x)


def test_compiled_optimizer_step_matches_eager():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)
    before = _graphs()
    assert compile_optimizer_(opt_b, backend="eager") and not compile_optimizer_(opt_b, backend="eager")
    for _ in range(3):
        x = torch.randn(4, 8)
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss = opt.step(lambda m=m: m(x).square().mean().backward())  # noqa: B023
            assert loss is None
    assert _graphs() > before
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    assert uncompile_optimizer_(opt_b) and "step" not in opt_b.__dict__
    with pytest.raises(ValueError, match="cannot compile LBFGS"):
        compile_optimizer_(torch.optim.LBFGS(a.parameters()))


# --------------------------------------------------------------------------- the callback
def test_fit_compiles_logs_and_writes_portable_checkpoints(tmp_path):
    pl.seed_everything(0)
    model = TinyMLP()
    keys = list(model.state_dict())
    tc = TorchCompile(backend="aot_eager")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=2, callbacks=[tc, ckpt], enable_checkpointing=True)
    trainer.fit(model, RandomDataModule())
    stats = tc.stats
    assert stats["graphs"] >= 2  # train and eval graphs really compiled
    assert stats["recompiles"] >= 1 and stats["first_step_s"] > 0 and stats["compile_time_s"] > 0
    for k in ("compile/graphs", "compile/recompiles", "compile/graph_breaks", "compile/first_step_s", "compile/compile_time_s"):
        assert k in trainer.callback_metrics, k
    assert not is_compiled(model) and list(model.state_dict()) == keys  # removed at teardown

    ck = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)
    assert not [k for k in ck["state_dict"] if "_orig_mod" in k]
    plain = TinyMLP()
    plain.load_state_dict(ck["state_dict"])  # a compiled run's checkpoint loads into an uncompiled model
    x = torch.randn(3, 16)
    torch.testing.assert_close(plain(x), model(x))

    # ... and an uncompiled run's checkpoint resumes under TorchCompile
    eager = tiny_trainer(tmp_path / "eager", max_epochs=1, limit_train_batches=2, limit_val_batches=0, enable_checkpointing=True)
    eager.fit(TinyMLP(), RandomDataModule())
    resumed = TinyMLP()
    tc2 = TorchCompile(backend="aot_eager")
    trainer = tiny_trainer(tmp_path / "resume", max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[tc2])
    trainer.fit(resumed, RandomDataModule(), ckpt_path=eager.checkpoint_callback.best_model_path)
    assert tc2.stats["graphs"] >= 1 and trainer.global_step == 4


def test_inductor_compiles_for_real_and_matches_eager(tmp_path):
    """The real backend: a regionally compiled Transformer trains like the eager one (float tolerance)."""
    losses = {}
    for name, callbacks in (("eager", []), ("inductor", [TorchCompile(modules=["blocks.*"])])):
        pl.seed_everything(0)
        model = DigitsTransformer(dim=16, heads=2, depth=2, scheduler="none")
        trainer = tiny_trainer(tmp_path / name, max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(model, DigitsDataModule(batch_size=32, drop_last=True))
        losses[name] = trainer.callback_metrics["train_loss"]
        if callbacks:
            assert callbacks[0].stats["graphs"] == 1  # both blocks share one graph
            assert callbacks[0].stats["compiled"] == [] and not compiled_modules(model)
    torch.testing.assert_close(losses["inductor"], losses["eager"], rtol=1e-4, atol=1e-4)


class _VaryingBatches(pl.LightningDataModule):
    """Batches of 4, 5, 6, ... samples: a new input shape every step."""

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(torch.randn(80, 16, generator=g), torch.randint(0, 4, (80,), generator=g))
        sizes, start, batches = range(4, 12), 0, []
        for s in sizes:
            batches.append(list(range(start, start + s)))
            start += s
        return DataLoader(ds, batch_sampler=batches)


@pytest.mark.parametrize("dynamic, warned", [(False, True), (None, False)])
def test_repeated_recompilation_gives_one_warning_naming_the_cause(tmp_path, dynamic, warned):
    tc = TorchCompile(backend="eager", dynamic=dynamic)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[tc])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(TinyMLP(), _VaryingBatches())
    found = [w for w in rec if issubclass(w.category, RecompilationWarning)]
    if warned:
        assert len(found) == 1 and "because of a changing input shape" in str(found[0].message)
        assert "size mismatch at index 0" in str(found[0].message) and "dynamic=True" in str(found[0].message)
        assert tc.stats["recompiles"] == 7  # every new batch size
    else:  # automatic dynamic shapes: at most one recompilation, then shape-generic code (none at all when
        # torch's profile-guided dynamic shapes remember this code's dynamic batch dimension from an earlier run)
        assert not found and tc.stats["recompiles"] <= 1


class _CallsSubmodule(TinyMLP):
    """A training_step that bypasses ``self(...)``: compiling the LightningModule alone compiles nothing."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(F.relu(self.fc2(F.relu(self.fc1(x))))), y)


def test_compiling_nothing_is_reported_and_regions_fix_it(tmp_path):
    tc = TorchCompile(backend="eager")
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[tc])
    with pytest.warns(CompileNoEffectWarning, match="`training_step` does not seem to call `self\\(...\\)`"):
        trainer.fit(_CallsSubmodule(), RandomDataModule())
    assert tc.stats["graphs"] == 0
    tc = TorchCompile(backend="eager", modules=["fc*", "head"])
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[tc])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileNoEffectWarning)
        trainer.fit(_CallsSubmodule(), RandomDataModule())
    assert tc.stats["graphs"] >= 3


class _Shrink(AccelCallback):
    """Halves TinyMLP's hidden width after the first epoch (as structured pruning would) and says so."""

    order = 15

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 0:
            return
        keep = torch.arange(pl_module.fc2.out_features // 2)
        fc2, head = nn.Linear(pl_module.fc2.in_features, len(keep)), nn.Linear(len(keep), pl_module.head.out_features)
        with torch.no_grad():
            fc2.weight.copy_(pl_module.fc2.weight[keep]), fc2.bias.copy_(pl_module.fc2.bias[keep])
            head.weight.copy_(pl_module.head.weight[:, keep]), head.bias.copy_(pl_module.head.bias)
        pl_module.fc2, pl_module.head = fc2, head
        trainer.optimizers[0].param_groups[0]["params"] = list(pl_module.parameters())
        notify_structure_changed(trainer, pl_module, self)


def test_structure_change_triggers_one_expected_recompilation(tmp_path):
    tc = TorchCompile(backend="eager", dynamic=False)
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=3, limit_val_batches=0, callbacks=[tc, _Shrink()])
    model = TinyMLP(optimizer="sgd")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompilationWarning)
        trainer.fit(model, RandomDataModule())
    s = tc.stats
    assert s["structure_changes"] == 1 and s["recompiles"] == 0  # the new shapes compiled once, counted apart
    assert s["graphs"] == 2 and model.fc2.out_features == 16


class _RecordsDtype(TinyMLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.logit_dtype = logits.dtype
        loss = F.cross_entropy(logits.float(), y)
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize("first", ["compile", "precision"])
@pytest.mark.parametrize("islands, dtype", [(None, torch.bfloat16), (["head"], torch.float32)])
def test_compile_and_mixed_precision_compose_in_any_list_order(tmp_path, first, islands, dtype):
    tc, mp = TorchCompile(backend="aot_eager"), MixedPrecision("bf16", fp32_modules=islands)
    model = _RecordsDtype()
    callbacks = [tc, mp] if first == "compile" else [mp, tc]
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, RandomDataModule())
    assert [c for c in trainer.callbacks if isinstance(c, AccelCallback)] == callbacks  # the user's order stays
    assert [type(c).__name__ for c in accel_callbacks(trainer)] == ["MixedPrecision", "TorchCompile"]
    assert tc.stats["graphs"] >= 1 and model.logit_dtype == dtype


def test_compile_optimizer_and_stages(tmp_path):
    results = {}
    for name, cbs in (("eager", []), ("compiled", [TorchCompile(backend="eager", compile_optimizer=True, stages=["fit", "test"])])):
        pl.seed_everything(0)
        model = TinyMLP()
        trainer = tiny_trainer(tmp_path / name, max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=cbs)
        trainer.fit(model, RandomDataModule())
        results[name] = model.state_dict()
        if cbs:
            opt = trainer.optimizers[0]
            assert "step" not in opt.__dict__  # the compiled step is removed at teardown
            graphs = cbs[0].stats["graphs"]
            assert graphs >= 2  # forward and optimizer step
            trainer.test(model, RandomDataModule(), verbose=False)
            assert cbs[0].stats["graphs"] > graphs  # "test" is a compiled stage too
    for k, v in results["eager"].items():
        torch.testing.assert_close(results["compiled"][k], v)


def test_validate_is_eager_unless_listed(tmp_path):
    tc = TorchCompile(backend="eager")  # stages: ["fit"]
    trainer = tiny_trainer(tmp_path, callbacks=[tc])
    trainer.validate(TinyMLP(), RandomDataModule(), verbose=False)
    assert tc.stats["graphs"] == 0


class _WithCompiledChild(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.fc2 = torch.compile(self.fc2, backend="eager")


def test_torch_compile_wrappers_inside_the_model_are_unwrapped(tmp_path):
    model = _WithCompiledChild()
    assert any("_orig_mod" in k for k in model.state_dict())
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[TorchCompile(backend="eager")])
    with pytest.warns(CompileNoEffectWarning, match="unwrapped torch.compile wrapper\\(s\\) \\['fc2'\\]"):
        trainer.fit(model, RandomDataModule())
    assert not any("_orig_mod" in k for k in model.state_dict())
    TinyMLP().load_state_dict(model.state_dict())


def test_recompilations_stop_after_warm_up_with_scheduled_pruning(tmp_path):
    pruning = pytest.importorskip("lightning_accel.pruning.callbacks")
    tc = TorchCompile(backend="aot_eager")
    sp = pruning.ScheduledPruning(amount=0.5, schedule="linear", interval="step", end=8, frequency=2)
    recompiles_after_epoch: list[int] = []

    class _Track(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            recompiles_after_epoch.append(tc.stats["recompiles"])

    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=4, limit_val_batches=2, callbacks=[tc, sp, _Track()])
    trainer.fit(TinyMLP(), RandomDataModule())
    assert recompiles_after_epoch[0] == recompiles_after_epoch[-1]  # 0 recompilations after the first epoch
    m = trainer.lightning_module
    zeros = sum(int((lin.weight == 0).sum()) for lin in (m.fc1, m.fc2)) / sum(lin.weight.numel() for lin in (m.fc1, m.fc2))
    assert zeros >= 0.49  # pruning really happened under compilation


def test_structured_pruning_recompiles_once_per_event(tmp_path):
    structured = pytest.importorskip("lightning_accel.pruning.callbacks")
    from lightning_accel.demos import ResidualCNN

    pl.seed_everything(0)
    model = ResidualCNN(width=8, depth=1)
    tc = TorchCompile(backend="aot_eager", when="start")  # compiled from the start: every event recompiles
    sp = structured.StructuredPruning(amount=0.5, interval="step", end=4, frequency=2, verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=1, callbacks=[tc, sp])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompilationWarning)
        trainer.fit(model, DigitsDataModule(batch_size=64, drop_last=True))
    s = tc.stats
    assert s["structure_changes"] == 2 and len(sp.history) == 2
    # the graphs of the new shapes (train and eval) are compiled afresh within the event's step: no recompilation
    assert s["recompiles"] == 0 and s["graphs"] >= 3
    x = torch.rand(4, 1, 8, 8)
    out = model(x)
    compile_(model, backend="aot_eager")
    torch.testing.assert_close(model(x), out)  # the pruned model compiles to the same function
    uncompile_(model)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0)])
def test_quantization_precision_and_compile_compose(tmp_path, order):
    quant = pytest.importorskip("lightning_accel.quantization.callbacks")
    pl.seed_everything(0)
    made = [TorchCompile(backend="aot_eager"), quant.Quantization(mode="nf4", adapter_rank=4, monitor=None), MixedPrecision("bf16")]
    model = _RecordsDtype(d_in=64, hidden=128)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[made[i] for i in order])
    trainer.fit(model, RandomDataModule(shape=(64,)))
    assert [type(c).__name__ for c in accel_callbacks(trainer)] == ["Quantization", "MixedPrecision", "TorchCompile"]
    assert [c for c in trainer.callbacks if isinstance(c, AccelCallback)] == [made[i] for i in order]
    assert type(model.fc1).__name__ == "QuantLinear4bit" and model.logit_dtype == torch.bfloat16
    assert made[0].stats["graphs"] >= 1 and not made[0].stats["fallbacks"]
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


# --------------------------------------------------------------------------- real interruption, DDP
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    script = """
        import logging, sys, torch, lightning.pytorch as pl
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning_accel import TorchCompile
        from lightning_accel.demos import DigitsTransformer, DigitsDataModule
        from tests.helpers import KillAtStep
        mode, out = sys.argv[1], sys.argv[2]
        messages = []
        class Keep(logging.Handler):
            def emit(self, record):
                messages.append(record.getMessage())
        logging.getLogger("lightning.pytorch").addHandler(Keep())
        pl.seed_everything(0)
        tc = TorchCompile(backend="eager", modules=["blocks.*"])
        cbs = [tc, ModelCheckpoint(dirpath="ckpts", every_n_epochs=1, save_top_k=-1)]
        cbs += [KillAtStep(3)] if mode == "kill" else []
        trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", logger=False,
                             enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=cbs)
        model = DigitsTransformer(dim=16, heads=2, depth=2)
        trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path="ckpts/epoch=0-step=3.ckpt" if mode == "resume" else None)
        torch.save({"model": model.state_dict(), "stats": tc.stats, "log": messages}, out)
    """
    run_python(script, tmp_path, "kill", "k.pt", expect=17)
    ck = torch.load(tmp_path / "ckpts" / "epoch=0-step=3.ckpt", weights_only=False)
    assert ck["callbacks"]["TorchCompile"]["graphs"] >= 1 and not [k for k in ck["state_dict"] if "_orig_mod" in k]
    run_python(script, tmp_path, "resume", "resumed.pt")
    run_python(script, tmp_path, "full", "full.pt")
    resumed, full = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt")
    for k, v in full["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    # counters continue across the resume: the resumed process compiled again on top of the saved counts
    assert resumed["stats"]["graphs"] > ck["callbacks"]["TorchCompile"]["graphs"]
    # the summary of the resumed process reports its own first (compiling) step and says it resumed, not the first
    # run's figure again
    first_run = ck["callbacks"]["TorchCompile"]["first_step_s"]
    assert first_run is not None and resumed["stats"]["first_run_first_step_s"] == first_run
    assert resumed["stats"]["resumed_at_step"] == 3 and full["stats"]["resumed_at_step"] is None
    own = resumed["stats"]["first_step_s"]
    assert own is not None and own != first_run  # timed again in this process
    summary = [m for m in resumed["log"] if m.startswith("TorchCompile: first step")]
    assert len(summary) == 1 and f"first step after resuming at step 3: {own:.2f} s" in summary[0], summary
    assert f"the first run's first step: {first_run:.2f} s" in summary[0], summary
    plain = [m for m in full["log"] if m.startswith("TorchCompile: first step")]
    assert len(plain) == 1 and f"first step {full['stats']['first_step_s']:.2f} s," in plain[0] and "resum" not in plain[0], plain


@pytest.mark.ddp
def test_compiled_training_under_ddp(tmp_path):
    script = """
        import torch, lightning.pytorch as pl
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning_accel import TorchCompile
        from lightning_accel.compile.core import is_compiled
        from lightning_accel.demos import DigitsTransformer, DigitsDataModule
        pl.seed_everything(0)
        tc = TorchCompile(backend="aot_eager")
        class Check(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, *args):
                assert type(trainer.strategy.model).__name__ == "DistributedDataParallel"
                assert is_compiled(pl_module)  # the DDP wrapper calls the compiled module
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=4,
                             limit_val_batches=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[tc, Check(), ModelCheckpoint(dirpath="ckpts", save_last=True)])
        model = DigitsTransformer(dim=16, heads=2, depth=1)
        trainer.fit(model, DigitsDataModule(batch_size=32))
        assert tc.stats["graphs"] >= 2, tc.stats
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        if trainer.global_rank == 0:
            assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
            ck = torch.load("ckpts/last.ckpt", weights_only=False)
            assert not [k for k in ck["state_dict"] if "_orig_mod" in k]
            DigitsTransformer(dim=16, heads=2, depth=1).load_state_dict(ck["state_dict"])
            print("DDP-OK", trainer.world_size, tc.stats["graphs"])
    """
    proc = run_python(script, tmp_path, timeout=400)
    assert "DDP-OK 2" in proc.stdout


@pytest.mark.gpu
def test_inductor_on_cuda_with_bf16(tmp_path):
    tc, mp = TorchCompile(modules=["blocks.*"]), MixedPrecision()
    trainer = tiny_trainer(tmp_path, accelerator="gpu", max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[tc, mp], deterministic=False)
    trainer.fit(DigitsTransformer(dim=64, heads=4, depth=2), DigitsDataModule(batch_size=64, drop_last=True))
    assert tc.stats["graphs"] >= 1 and mp.choice.dtype in (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- compile once the structure settled
@pytest.mark.parametrize("interval, end, settle", [("step", 4, 4), ("epoch", 2, 6)])
def test_compiles_once_after_the_last_structural_change(tmp_path, interval, end, settle):
    """StructuredPruning with 2 events: the fit trains eagerly through both, compiles at the step of the last one, and
    recompiles at most once afterwards (the switch to validation's no-grad eval graph)."""
    from lightning_accel import StructuredPruning
    from lightning_accel.demos import ResidualCNN

    pl.seed_everything(0)
    model = ResidualCNN(width=8, depth=1)
    tc = TorchCompile(backend="aot_eager")
    sp = StructuredPruning(amount=0.5, initial_amount=0.25, interval=interval, start=end // 2, end=end, frequency=end // 2, verbose=0)
    compiled_at: list[int] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if is_compiled(pl_module) and not compiled_at:
                compiled_at.append(trainer.global_step - 1)  # the step that just ran compiled

    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=3, limit_val_batches=1, callbacks=[tc, sp, Probe()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompilationWarning)
        trainer.fit(model, DigitsDataModule(batch_size=64, drop_last=True))
    s = tc.stats
    assert len(sp.history) == 2 and s["eager_structure_changes"] == 2  # both events ran before compilation
    assert s["compiled_at_step"] == settle and compiled_at == [settle]
    assert "StructuredPruning at step" in s["compile_reason"]
    assert s["structure_changes"] == 0 and s["structure_recompiles"] == 0  # nothing to redo after compiling
    assert s["graphs"] >= 1 and s["recompiles"] <= 1, s["recompile_reasons"]


def test_structure_schedule_of_the_lifecycle(tmp_path):
    """What TorchCompile asks: each callback's last structural change (None: it changes none during the fit)."""
    from lightning_accel import QuantizationAwareTraining, ScheduledPruning, StructuredPruning
    from lightning_accel._lifecycle import STRUCTURE_UNKNOWN, structure_schedule, structure_settled_step

    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=5)
    trainer.fit_loop.max_batches = 5  # what the fit loop sets before on_train_start
    sp = StructuredPruning(amount=0.5, interval="epoch", end=2)
    qat = QuantizationAwareTraining(start=7, convert="none")
    masks = ScheduledPruning(amount=0.5, end=9)
    assert sp.structure_settles_at(trainer) == 10 and qat.structure_settles_at(trainer) == 7
    assert masks.structure_settles_at(trainer) is None  # masks change weight values, not what the forward runs
    assert QuantizationAwareTraining(convert="none").structure_settles_at(trainer) is None  # fake-quantized from step 0
    assert StructuredPruning(amount=0.5, interval="step").structure_settles_at(trainer) == STRUCTURE_UNKNOWN  # end unresolved
    trainer.callbacks = [qat, masks, sp]
    assert structure_schedule(trainer) == {"StructuredPruning": 10, "QuantizationAwareTraining": 7}
    assert structure_settled_step(trainer) == 10


def test_qat_fake_quantization_is_compiled_once_it_starts(tmp_path):
    pytest.importorskip("torchao")
    from lightning_accel import QuantizationAwareTraining

    pl.seed_everything(0)
    tc = TorchCompile(backend="aot_eager")
    qat = QuantizationAwareTraining(start=3, convert="none")
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=1, callbacks=[qat, tc])
    trainer.fit(TinyMLP(d_in=64, hidden=64), RandomDataModule(shape=(64,)))
    s = tc.stats
    assert s["compiled_at_step"] == 3 and "QuantizationAwareTraining at step 3" in s["compile_reason"]
    assert s["graphs"] >= 1 and not s["fallbacks"] and s["recompiles"] <= 1, s["recompile_reasons"]


def test_the_distillation_teacher_is_compiled_for_inference(tmp_path):
    from lightning_accel import KnowledgeDistillation

    pl.seed_everything(0)
    tc = TorchCompile(backend="aot_eager")
    kd = KnowledgeDistillation(teacher=None, verbose=0)
    seen: list[tuple[bool, bool]] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            teacher = kd.teacher_model
            seen.append((is_compiled(teacher), teacher.training))

    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[kd, tc, Probe()])
    start = _graphs()
    trainer.fit(TinyMLP(), RandomDataModule())
    assert seen and all(compiled and not training for compiled, training in seen)
    assert tc.stats["teacher_compiled"] and _graphs() - start >= 2  # the student's training graph and the teacher's
    assert not is_compiled(kd.teacher_model or TinyMLP())  # removed at teardown (the teacher is dropped too)
    tc2 = TorchCompile(backend="aot_eager", compile_teacher=False)
    kd2 = KnowledgeDistillation(teacher=None, verbose=0)
    trainer = tiny_trainer(tmp_path / "no", max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[kd2, tc2])
    trainer.fit(TinyMLP(), RandomDataModule())
    assert not tc2.stats["teacher_compiled"]


def test_a_resumed_fit_loads_compiled_code_from_the_cache(tmp_path):
    """Inductor for real: the first fit compiles into `cache_dir`; the fit resumed from its checkpoint loads the same
    graphs from there instead of compiling them."""
    cache = tmp_path / "cache"
    pl.seed_everything(0)
    tc = TorchCompile(cache_dir=str(cache))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[tc, ckpt], enable_checkpointing=True)
    trainer.fit(TinyMLP(), RandomDataModule(batch_size=8))
    first = tc.stats["cache"]
    assert first["fx_graph_miss"] >= 1 and first["fx_graph_hit"] == 0, first
    assert tc.stats["cache_dir"] is None and any(cache.iterdir())  # the cache is released at teardown, its files stay
    import os

    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(cache)  # inductor's own folder is given back

    tc2 = TorchCompile(cache_dir=str(cache))
    trainer = tiny_trainer(tmp_path / "resume", max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[tc2])
    trainer.fit(TinyMLP(), RandomDataModule(batch_size=8), ckpt_path=str(tmp_path / "ckpts" / "last.ckpt"))
    again = tc2.stats["cache"]
    assert trainer.global_step == 4 and tc2.stats["graphs"] >= 1
    assert again["fx_graph_hit"] >= 1 and again["fx_graph_miss"] == 0, again


def test_new_arguments_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "c.yaml"
    config.write_text(
        f"""
trainer:
  callbacks:
    - class_path: lightning_accel.TorchCompile
      init_args: {{when: start, cache_dir: {tmp_path / "cc"}, compile_teacher: false, backend: eager}}
"""
    )
    cli = LightningCLI(TinyMLP, RandomDataModule, run=False, args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    tc = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TorchCompile))
    assert (tc.when, tc.cache_dir, tc.compile_teacher, tc.backend) == ("start", str(tmp_path / "cc"), False, "eager")
