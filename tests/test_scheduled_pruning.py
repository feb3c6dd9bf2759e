"""ScheduledPruning and its pure core (lightning_accel.pruning.unstructured), in process.

Real interruptions (a killed process) and DDP live in test_scheduled_pruning_procs.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

import lightning_accel
from lightning_accel import CompositionError, NoMatchError, PruningNoEffectWarning, ScheduledPruning, prune_
from lightning_accel._lifecycle import AccelCallback
from lightning_accel.demos import DigitsDataModule, ResidualCNN
from lightning_accel.pruning import (
    compute_masks,
    mask_grads_,
    mask_sparsity,
    prunable_parameters,
    regularize_grads_,
)
from lightning_accel.pruning.unstructured import _lowest, broadcast_masks, pack_mask, unpack_mask
from lightning_accel.schedules import sparsity_at
from tests.helpers import RandomDataModule, TinyConvNet, TinyMLP, tiny_trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain nothing from a second thread, and on a shared 2-core machine two OpenMP threads
    # competing with other processes run up to 10x slower (conftest restores the thread count afterwards)
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- helpers
class ListLogger(Logger):
    """Keeps every ``log_metrics`` call: what the Trainer's loggers receive."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def events(self) -> list[tuple[int, float]]:
        return [(s, m["pruning/sparsity"]) for s, m in self.rows if "pruning/sparsity" in m]


class Probe(pl.Callback):
    """Listed after ScheduledPruning: checks the masks hold after every step and that pruned gradients are
    zero when the optimizer steps."""

    def __init__(self, pruner: ScheduledPruning) -> None:
        self.pruner = pruner
        self.steps_checked = 0
        self.grads_checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = dict(pl_module.named_parameters())
        for name, keep in self.pruner.masks.items():
            g = params[name].grad
            assert g is not None and torch.all(g[~keep] == 0), name
        self.grads_checked += 1

    def on_train_batch_end(self, trainer, pl_module, *args):
        params = dict(pl_module.named_parameters())
        for name, keep in self.pruner.masks.items():
            assert torch.all(params[name][~keep] == 0), name
            for value in trainer.optimizers[0].state.get(params[name], {}).values():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == keep.shape:
                    assert torch.all(value[~keep] == 0), f"optimizer state of pruned entries in {name}"
        self.steps_checked += 1


def _selected(model: nn.Module, **kw: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in prunable_parameters(model, **kw).items()}


def _zero_fraction(tensors: dict[str, torch.Tensor]) -> float:
    total = sum(t.numel() for t in tensors.values())
    return sum(int((t == 0).sum()) for t in tensors.values()) / total


# ----------------------------------------------------------------------------------------------- core
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.77, 0.95])
def test_prune_is_exact_smallest_magnitude_and_leaves_the_rest(scope, amount):
    model = ResidualCNN(width=8, depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = _selected(model)
    masks = prune_(model, amount, scope=scope)
    assert set(masks) == set(weights) and "head.weight" not in masks
    after = model.state_dict()
    assert list(after) == list(before)  # no weight_orig / weight_mask, nothing added
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    for key in before:  # biases, BatchNorm and the head are untouched; pruned entries are exactly the zeros
        if key in masks:
            assert torch.equal(after[key], before[key] * masks[key])
        else:
            assert torch.equal(after[key], before[key]), key
    groups = [list(masks)] if scope == "global" else [[n] for n in masks]
    for names in groups:
        n = sum(masks[k].numel() for k in names)
        pruned = sum(int((~masks[k]).sum()) for k in names)
        assert pruned == round(amount * n)
        if 0 < pruned < n:
            largest_pruned = max(weights[k][~masks[k]].abs().max() for k in names if (~masks[k]).any())
            smallest_kept = min(weights[k][masks[k]].abs().min() for k in names if masks[k].any())
            assert largest_pruned <= smallest_kept


def test_masks_are_nested_and_never_revive():
    model = TinyConvNet(width=16)
    first = prune_(model, 0.5, exclude=["head"], prune_head=True)
    assert "head.weight" not in first and "conv1.weight" in first
    second = prune_(model, 0.8, exclude=["head"], prune_head=True, masks=first)
    for k in first:
        assert not torch.any(second[k] & ~first[k]), k  # pruned stays pruned
    assert mask_sparsity(second) == pytest.approx(round(0.8 * sum(m.numel() for m in first.values())) / sum(m.numel() for m in first.values()))
    lower = prune_(model, 0.2, exclude=["head"], prune_head=True, masks=second)  # a lower target keeps what is pruned
    assert all(torch.equal(lower[k], second[k]) for k in first)


def test_random_criterion_is_seeded_and_uniform():
    model = TinyMLP(d_in=64, hidden=64)
    a = compute_masks(prunable_parameters(model), 0.6, criterion="random", generator=torch.Generator().manual_seed(3))
    b = compute_masks(prunable_parameters(model), 0.6, criterion="random", generator=torch.Generator().manual_seed(3))
    c = compute_masks(prunable_parameters(model), 0.6, criterion="random", generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # random is not magnitude: pruned entries are spread over the whole magnitude range
    w = model.fc1.weight.detach().abs()
    assert w[~a["fc1.weight"]].max() > w[a["fc1.weight"]].median()


@pytest.mark.parametrize("n, k", [(300_000, 1), (300_000, 3_000), (300_000, 70_000), (200_003, 50_000), (70_000, 10)])
def test_sampled_selection_matches_a_full_topk(n, k):
    g = torch.Generator().manual_seed(n + k)
    scores = torch.rand(n, generator=g)
    scores[::7] = scores[3]  # many ties
    scores[: n // 3] = torch.finfo(torch.float32).max  # excluded (already pruned) entries
    idx = _lowest(scores, k)
    assert idx.numel() == k and idx.unique().numel() == k
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[idx] = True
    assert scores[chosen].max() <= scores[~chosen].min()
    assert torch.equal(idx, _lowest(scores, k))  # deterministic


def test_regularization_and_grad_masking_core():
    w = nn.Parameter(torch.tensor([[-2.0, 0.0, 3.0]]))
    w.grad = torch.tensor([[1.0, 1.0, 1.0]])
    regularize_grads_({"w": w}, "l1", 0.5)
    assert torch.equal(w.grad, torch.tensor([[0.5, 1.0, 1.5]]))
    regularize_grads_({"w": w}, "l2", 0.1)
    assert torch.allclose(w.grad, torch.tensor([[0.3, 1.0, 1.8]]))
    mask_grads_({"w": w}, {"w": torch.tensor([[True, False, True]])})
    assert torch.allclose(w.grad, torch.tensor([[0.3, 0.0, 1.8]]))
    with pytest.raises(ValueError, match="`regularization` must be one of 'none', 'l1', 'l2'; got 'l3'"):
        regularize_grads_({"w": w}, "l3", 0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(5, 3), (8,), (2, 3, 3, 3)])
def test_masks_pack_to_one_bit_per_weight_and_back(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = pack_mask(mask.float())
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == -(-mask.numel() // 8)
    unpacked = unpack_mask(packed)
    assert unpacked.dtype == torch.bool and torch.equal(unpacked, mask)
    masks, synced = broadcast_masks({"w": mask})
    assert synced is False and masks["w"] is mask  # no process group: no broadcast, the masks unchanged


def test_core_errors_name_the_problem():
    model = TinyMLP()
    with pytest.raises(ValueError, match=r"`amount` must be a number in \[0.0, 1.0\); got 1.0"):
        prune_(model, 1.0)
    with pytest.raises(ValueError, match="`criterion` must be one of 'magnitude', 'random'; got 'l1'"):
        prune_(model, 0.5, criterion="l1")  # type: ignore[arg-type]
    with pytest.raises(NoMatchError, match=r"`modules` pattern 'blocks\.\*' matches no .*'fc1', 'fc2', 'head'"):
        prune_(model, 0.5, modules=["blocks.*"])
    only_head = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(NoMatchError, match="no Linear/Conv1d/Conv2d/Conv3d module of Sequential is left"):
        prune_(only_head, 0.5)
    assert torch.count_nonzero(model.fc1.weight) == model.fc1.weight.numel()  # nothing was touched


# ----------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(amount=1.0), r"`amount` must be a number in \[0.0, 1.0\); got 1.0"),
        (dict(amount="half"), "`amount` must be a number"),
        (dict(amount=0.5, initial_amount=0.6), r"`initial_amount` must be <= `amount` \(0.5\); got 0.6"),
        (dict(schedule="cubicc"), "`schedule` must be one of 'one_shot', 'linear', 'cubic', 'exponential'; got 'cubicc'"),
        (dict(interval="batch"), "`interval` must be one of 'step', 'epoch'; got 'batch'"),
        (dict(start=-1), "`start` must be an integer >= 0; got -1"),
        (dict(start=10, end=5), r"`end` must be None or >= `start` \(10\); got 5"),
        (dict(frequency=0), "`frequency` must be an integer >= 1; got 0"),
        (dict(criterion="l1"), "`criterion` must be one of 'magnitude', 'random'; got 'l1'"),
        (dict(scope="model"), "`scope` must be one of 'global', 'layer'; got 'model'"),
        (dict(modules="fc1"), "`modules` must be None or a non-empty list of glob patterns"),
        (dict(exclude=[""]), "`exclude` must contain non-empty strings"),
        (dict(prune_head="yes"), "`prune_head` must be a bool"),
        (dict(regularization="l0"), "`regularization` must be one of 'none', 'l1', 'l2'; got 'l0'"),
        (dict(regularization="l1", regularization_strength=-1e-4), "`regularization_strength` must be a number >= 0.0"),
        (dict(make_permanent=1), "`make_permanent` must be a bool"),
        (dict(rewind=None), "`rewind` must be a bool"),
        (dict(seed=1.5), "`seed` must be an integer"),
        (dict(verbose=3), "`verbose` must be one of 0, 1, 2; got 3"),
    ],
)
def test_bad_arguments_are_rejected_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduledPruning(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(amount=0.0), "prunes nothing"),
        (dict(regularization_strength=1e-3), "no effect with `regularization='none'`"),
        (dict(regularization="l1"), "no effect with `regularization_strength=0`"),
        (dict(rewind=True, schedule="one_shot"), "`rewind=True` has no effect"),
    ],
)
def test_settings_without_effect_warn(kwargs, match):
    with pytest.warns(PruningNoEffectWarning, match=match):
        ScheduledPruning(**kwargs)


def test_bad_patterns_and_nothing_to_prune_raise_at_setup(tmp_path):
    model = TinyMLP()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[ScheduledPruning(modules=["encoder.*"])])
    with pytest.raises(NoMatchError, match=r"`modules` pattern 'encoder\.\*' matches no .*candidates: 'fc1', 'fc2', 'head'"):
        trainer.fit(model, RandomDataModule())
    assert trainer.global_step == 0
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[ScheduledPruning(exclude=["fc*"])])
    with pytest.raises(NoMatchError, match="is left to act on"):
        trainer.fit(TinyMLP(), RandomDataModule())
    trainer = tiny_trainer(tmp_path, max_epochs=-1, callbacks=[ScheduledPruning()])
    with pytest.raises(ValueError, match="`end=None` needs a known training length"):
        trainer.fit(TinyMLP(), RandomDataModule())


# ----------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    "schedule, interval, scope, accumulate",
    [
        ("cubic", "step", "global", 1),
        ("cubic", "step", "layer", 2),
        ("linear", "epoch", "layer", 1),
        ("exponential", "step", "global", 1),
        ("one_shot", "epoch", "global", 1),
    ],
)
def test_every_event_reaches_the_schedule(tmp_path, schedule, interval, scope, accumulate):
    amount, initial, start, frequency = 0.85, 0.1, 1, 2
    pruner = ScheduledPruning(
        amount=amount, initial_amount=initial, schedule=schedule, interval=interval, start=start,
        frequency=frequency, scope=scope, verbose=2,
    )
    logger, probe = ListLogger(), Probe(pruner)
    model = TinyConvNet(width=16, optimizer="sgd")
    trainer = tiny_trainer(
        tmp_path, max_epochs=6, limit_train_batches=4, limit_val_batches=0, logger=logger,
        callbacks=[pruner, probe], accumulate_grad_batches=accumulate, log_every_n_steps=1,
    )
    trainer.fit(model, RandomDataModule(shape=(1, 8, 8)))
    end = trainer.max_epochs if interval == "epoch" else trainer.global_step
    assert pruner._end == end
    events = logger.events()
    expected_ts = [t for t in range(start, end + 1) if (t - start) % frequency == 0 or t == end]
    assert len(events) == len(expected_ts)
    for (step, reached), t in zip(events, expected_ts):
        target = sparsity_at(t, schedule=schedule, initial=initial, final=amount, start=start, end=end)
        assert abs(reached - target) <= 0.005, (t, reached, target)
        if interval == "step":
            assert step == t  # logged at the event's global step
    weights = _selected(model)
    n = sum(w.numel() for w in weights.values())
    assert _zero_fraction(weights) == pytest.approx(round(amount * n) / n, abs=0.5 / min(w.numel() for w in weights.values()))
    if scope == "layer":
        for name, w in weights.items():
            assert int((w == 0).sum()) == round(amount * w.numel()), name
    else:
        assert int(sum((w == 0).sum() for w in weights.values())) == round(amount * n)
    per_layer = [k for _, m in logger.rows for k in m if k.startswith("pruning/sparsity/")]
    assert set(per_layer) == {f"pruning/sparsity/{k}" for k in weights}
    assert probe.steps_checked == trainer.global_step * accumulate and probe.grads_checked == trainer.global_step
    assert pruner.masks == {}  # make_permanent: bookkeeping dropped, zeros stay
    assert all(not o._optimizer_step_post_hooks for o in trainer.optimizers)


def test_regularization_acts_through_gradients_only(tmp_path):
    def one_step(**kw: Any) -> tuple[TinyMLP, TinyMLP]:
        pl.seed_everything(0)
        model = TinyMLP(optimizer="sgd", lr=0.1)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                               callbacks=[ScheduledPruning(amount=0.5, start=5, end=10, **kw)])
        trainer.fit(model, RandomDataModule())
        return model, start

    plain, w0 = one_step()
    strength = 0.01
    l1, _ = one_step(regularization="l1", regularization_strength=strength)
    for name in ("fc1.weight", "fc2.weight"):  # selected: the step moved them further by lr * strength * sign(w)
        expected = plain.state_dict()[name] - 0.1 * strength * w0[name].sign()
        assert torch.allclose(l1.state_dict()[name], expected, atol=1e-6), name
    for name in ("head.weight", "fc1.bias"):  # not selected: identical
        assert torch.equal(l1.state_dict()[name], plain.state_dict()[name]), name


def test_rewind_resets_survivors_to_their_start_values(tmp_path):
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Snap(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    pruner = ScheduledPruning(amount=0.75, schedule="linear", interval="epoch", start=1, frequency=1, rewind=True, make_permanent=False)
    model = TinyMLP()
    trainer = tiny_trainer(tmp_path, max_epochs=4, limit_train_batches=3, limit_val_batches=0, callbacks=[pruner, Snap()])
    trainer.fit(model, RandomDataModule())
    masks = pruner.masks
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    for epoch in (2, 3):  # right after the events of epochs 2 and 3 the survivors hold their epoch-1 values
        for name in masks:
            kept = seen[epoch][name] != 0
            assert 0 < int(kept.sum()) < kept.numel()
            assert torch.equal(seen[epoch][name], seen[1][name] * kept), (epoch, name)
    for name in ("fc1.bias", "head.weight"):  # what is not pruned trains on
        assert not torch.equal(seen[3][name], seen[1][name])


def test_compiled_model_keeps_its_graph(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pl.seed_everything(0)
    model = TinyMLP()
    model.compile(backend="aot_eager")  # in place: state_dict keys unchanged
    graphs: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            graphs.append(counters["stats"]["unique_graphs"])

    pruner = ScheduledPruning(amount=0.8, frequency=2, verbose=0, make_permanent=False)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[pruner, Count()])
    with torch._dynamo.config.patch(error_on_recompile=True):
        trainer.fit(model, RandomDataModule())
    assert graphs[0] >= 1 and graphs[-1] == graphs[0]  # no recompilation across 8 pruning events
    assert pruner.sparsity == pytest.approx(0.8, abs=1e-3)
    x = torch.randn(5, 16)
    eager = model.head(torch.relu(model.fc2(torch.relu(model.fc1(x)))))
    assert torch.allclose(model(x), eager)  # the compiled forward reads the pruned weights
    assert list(model.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"]
    torch._dynamo.reset()


def test_swapped_optimizer_is_hooked_too(tmp_path):
    class SwapOptimizer(AccelCallback):  # like an 8-bit optimizer callback: swaps in at fit start, after us
        stage = "optimizer"

        def accel_fit_start(self, trainer, pl_module):
            trainer.optimizers = [torch.optim.SGD(pl_module.parameters(), lr=0.05, momentum=0.9)]

    pruner = ScheduledPruning(amount=0.6, frequency=3, make_permanent=False)
    probe = Probe(pruner)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[SwapOptimizer(), pruner, probe])
    trainer.fit(TinyMLP(), RandomDataModule())
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and probe.steps_checked == 16
    assert "momentum_buffer" in trainer.optimizers[0].state[trainer.lightning_module.fc1.weight]


# ----------------------------------------------------------------------------------------------- composition
class StructuredPruning(AccelCallback):  # stand-ins declaring the colleagues' capabilities
    stage = "structure"
    capabilities = frozenset({"changes_shapes"})


class Quantization(AccelCallback):
    stage = "quantization"

    def __init__(self, when: str) -> None:
        self.when = when

    @property
    def capabilities(self):  # what the real Quantization declares
        return frozenset({"replaces_layers", "freezes_weights"} if self.when == "setup" else {"replaces_layers"})


@pytest.mark.parametrize(
    "other, match",
    [
        (StructuredPruning(), r"(Scheduled|Structured)Pruning cannot be combined with (Scheduled|Structured)Pruning: structured pruning removes"),
        (Quantization("setup"), "ScheduledPruning cannot be combined with Quantization: weights quantized at setup"),
        (ScheduledPruning(modules=["fc2", "fc1"]), r"both prune \['fc1.weight'\]"),
    ],
)
def test_conflicts_are_named(tmp_path, other, match):
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[other, ScheduledPruning(modules=["fc1"])])
    with pytest.raises(CompositionError, match=match):
        trainer.fit(TinyMLP(), RandomDataModule())


def test_two_pruners_on_disjoint_layers_and_a_late_quantizer_compose(tmp_path):
    a = ScheduledPruning(amount=0.5, modules=["fc1"], schedule="one_shot")
    b = ScheduledPruning(amount=0.9, modules=["fc2"], schedule="one_shot")
    assert a.state_key != b.state_key
    model = TinyMLP()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[a, b, Quantization("fit_end")])
    trainer.fit(model, RandomDataModule())
    assert float((model.fc1.weight == 0).float().mean()) == 0.5
    assert float((model.fc2.weight == 0).float().mean()) == pytest.approx(0.9, abs=1e-3)


def test_with_the_real_neighbours_of_the_pipeline(tmp_path):
    """The colleagues' callbacks: conflicts named at setup, and masks held under an 8-bit optimizer swapped in
    at fit start (bitsandbytes runs on the CPU)."""
    from lightning_accel.optimizers import EightBitOptimizer
    from lightning_accel.pruning import StructuredPruning as RealStructured
    from lightning_accel.quantization.callbacks import Quantization as RealQuantization

    for other in (RealStructured(), RealQuantization(when="setup")):
        trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[other, ScheduledPruning()])
        with pytest.raises(CompositionError, match=f"(cannot be combined with {type(other).__name__}|{type(other).__name__} cannot be combined with)"):
            trainer.fit(TinyMLP(), RandomDataModule())
    pruner = ScheduledPruning(amount=0.7, frequency=2, make_permanent=False, verbose=0)
    probe = Probe(pruner)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[EightBitOptimizer(min_size=0), pruner, probe])
    trainer.fit(TinyMLP(), RandomDataModule())
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit" and probe.steps_checked == 16
    assert pruner.sparsity == pytest.approx(0.7, abs=1e-3)


# ----------------------------------------------------------------------------------------------- resume, YAML
def test_resume_in_process_matches_uninterrupted_epoch_interval(tmp_path):
    def run(ckpt_path: str | None, root: Path, callbacks_extra: list) -> tuple[dict, ScheduledPruning]:
        pl.seed_everything(0)
        pruner = ScheduledPruning(amount=0.7, interval="epoch", schedule="cubic", criterion="random", seed=7,
                                  rewind=True, make_permanent=False)
        model = TinyMLP()
        trainer = tiny_trainer(root, max_epochs=4, limit_train_batches=3, limit_val_batches=0,
                               callbacks=[pruner, *callbacks_extra], enable_checkpointing=bool(callbacks_extra))
        trainer.fit(model, RandomDataModule(), ckpt_path=ckpt_path)
        return model.state_dict(), pruner

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=1, save_top_k=-1)
    full, full_pruner = run(None, tmp_path / "a", [ckpt])
    saved = torch.load(tmp_path / "ckpts" / "epoch=1-step=6.ckpt", weights_only=False)
    state = saved["callbacks"][full_pruner.state_key]
    assert state["last_t"] == 2 and 0 < state["sparsity"] < 0.7 and state["masks"]["fc1.weight"]["bits"].dtype == torch.uint8
    assert state["masks"]["fc1.weight"]["bits"].numel() == 16 * 32 // 8  # one bit per weight
    assert state["rewind_t"] == 0 and set(state["rewind"]) == {"fc1.weight", "fc2.weight"}
    plain = lightning_accel.load_checkpoint(TinyMLP(), tmp_path / "ckpts" / "epoch=1-step=6.ckpt")  # no replay needed
    assert float((plain.fc1.weight == 0).float().mean()) > 0.2 and list(plain.state_dict()) == list(saved["state_dict"])
    resumed, resumed_pruner = run(str(tmp_path / "ckpts" / "epoch=1-step=6.ckpt"), tmp_path / "b", [])
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    assert all(torch.equal(resumed_pruner.masks[k], full_pruner.masks[k]) for k in full_pruner.masks)
    assert torch.equal(resumed_pruner._generator.get_state(), full_pruner._generator.get_state())


def test_a_second_fit_of_the_same_trainer_continues_the_schedule(tmp_path):
    pruner = ScheduledPruning(amount=0.8, end=32, frequency=2, make_permanent=False, verbose=0)
    model = TinyMLP()
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[pruner])
    trainer.fit(model, RandomDataModule())
    halfway = pruner.masks
    assert trainer.global_step == 16 and pruner.sparsity == pytest.approx(
        sparsity_at(16, schedule="cubic", initial=0.0, final=0.8, start=0, end=32), abs=0.005
    )
    trainer.fit_loop.max_epochs = 4
    trainer.fit(model, RandomDataModule())
    assert trainer.global_step == 32 and pruner.sparsity == pytest.approx(0.8, abs=1e-3)
    assert all(not torch.any(pruner.masks[k] & ~halfway[k]) for k in halfway)  # nested across the two fits


def test_benchmark_smoke(tmp_path, capsys):
    from benchmarks.__main__ import main

    assert main(["scheduled_pruning", "--quick", "--out", str(tmp_path)]) == 0
    assert "SGD: Lightning ModelPruning |" in capsys.readouterr().out
    assert (tmp_path / "scheduled_pruning.json").exists()


def test_lightning_cli_builds_it_from_yaml(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train import main
    finally:
        sys.path.remove(str(ROOT / "examples"))
    cli = main(["--config", str(ROOT / "examples" / "configs" / "scheduled_pruning.yaml"),
                f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False)
    (pruner,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ScheduledPruning)]
    assert (pruner.amount, pruner.schedule, pruner.end, pruner.frequency, pruner.exclude) == (0.9, "cubic", 160, 10, ["stem.*"])
    assert lightning_accel.ScheduledPruning is ScheduledPruning


@pytest.mark.slow
def test_cubic_pruning_to_90_percent_keeps_digits_accuracy(tmp_path):
    pl.seed_everything(0)
    model, dm = ResidualCNN(width=16, depth=1), DigitsDataModule()
    pruner = ScheduledPruning(amount=0.9, end=120, frequency=5, verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=12, limit_val_batches=0, callbacks=[pruner])
    trainer.fit(model, dm)
    weights = _selected(model)
    assert _zero_fraction(weights) == pytest.approx(0.9, abs=1e-4)
    acc = trainer.test(model, dm, verbose=False)[0]["test_acc"]
    assert acc >= 0.95, acc


@pytest.mark.parametrize("callback", ["ScheduledPruning", "StructuredPruning"])
def test_a_monitor_never_logged_is_refused_at_the_sanity_check(tmp_path, callback):
    """The accuracy guard's `monitor` is checked at the first validation that could log it (the sanity check),
    not after a training epoch."""
    cb = getattr(lightning_accel, callback)(amount=0.5, monitor="val_nope", max_metric_drop=0.1, verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=1, callbacks=[cb])
    with pytest.raises(ValueError, match=r"`monitor`='val_nope' is not logged by TinyMLP; logged metrics: \['val_acc', 'val_loss'\]"):
        trainer.fit(TinyMLP(), RandomDataModule())
    assert trainer.global_step == 0
