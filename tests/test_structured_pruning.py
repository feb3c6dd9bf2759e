"""StructuredPruning: the torch-pruning core (plain modules) and the callback (in-process fits).

Real interruptions and DDP runs live in ``test_structured_pruning_procs.py``.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

import lightning_accel
from lightning_accel._lifecycle import AccelCallback, CompositionError, find_conflict
from lightning_accel._select import NoMatchError
from lightning_accel.checkpoint import load_checkpoint
from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN
from lightning_accel.pruning.apply import restore_structure, snapshot_structure
from lightning_accel.pruning.callbacks import StructuredPruning, load_pruned
from lightning_accel.pruning.structured import (
    StructuredPruningError,
    StructuredPruningWarning,
    build_group_regularizer,
    build_pruning_graph,
    count_macs_params,
    plan_structured_pruning,
    prune_structured_,
    replay_pruning_,
    slice_optimizer_,
)
from tests.helpers import RandomDataModule, TinyConvNet, TinyMLP, TorchEncoder, tiny_trainer

X8 = torch.zeros(1, 1, 8, 8)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ core


def test_cnn_loses_half_its_channels_and_about_4x_macs():
    torch.manual_seed(0)
    model = ResidualCNN(width=16, depth=1).eval()
    x = torch.rand(4, 1, 8, 8)
    macs0, params0 = count_macs_params(model, X8)
    result = prune_structured_(model, X8, amount=0.5)
    convs = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs == {"stem.0": 8, "blocks.0.conv1": 8, "blocks.0.conv2": 8, "blocks.1.conv1": 16, "blocks.1.conv2": 16,
                     "blocks.1.shortcut.0": 16}
    assert model.head.in_features == 16 and model.head.out_features == 10  # the output layer keeps its outputs
    assert model(x).shape == (4, 10)
    macs, params = count_macs_params(model, X8)
    assert macs0 / macs >= 3.5 and params0 / params >= 3.5
    assert set(result.removed.values()) == {8, 16} and result.slices and result.ops


def test_transformer_loses_whole_heads_and_num_heads_follows():
    torch.manual_seed(0)
    model = DigitsTransformer(dim=16, depth=2, heads=4).eval()
    result = prune_structured_(model, X8, amount=0.5)
    for block in model.blocks:
        assert block.attn.num_heads == 2
        assert block.attn.qkv.out_features == 3 * 2 * 4  # 2 heads of the original size 4 (16 / 4)
        assert block.attn.proj.in_features == 8
        assert block.mlp[0].out_features == 16  # MLP neurons: 32 -> 16
    assert model.pos_embed.shape == (1, 4, 8) and model.embed.out_features == 8  # the residual stream halves too
    assert result.heads == {"blocks.0.attn": 2, "blocks.1.attn": 2}
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_transformer_head_dims_instead_of_heads():
    model = DigitsTransformer(dim=16, depth=1, heads=4).eval()
    prune_structured_(model, X8, amount=0.5, prune_heads=False)
    attn = model.blocks[0].attn
    assert attn.num_heads == 4 and attn.proj.in_features == 8  # 4 heads of 2 dims
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


class _SeparateQKV(nn.Module):
    """Separate q/k/v Linears and a ``head_dim`` attribute (the module itself is the attention)."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.head(self.o(out).mean(1))


class _Grouped(nn.Module):
    """GroupNorm, a grouped conv and a depthwise conv: channels must go in equal numbers from every group."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.c2, self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c3, self.head = nn.Conv2d(16, 8, 1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(F.relu(self.c2(F.relu(self.gn(self.c1(x))))))
        return self.head(self.c3(x).mean((2, 3)))


@pytest.mark.parametrize(
    "make, shape",
    [(TorchEncoder, (2, 5, 4)), (_SeparateQKV, (2, 5, 16)), (_Grouped, (2, 3, 8, 8))],
    ids=["nn.TransformerEncoderLayer", "q-k-v", "grouped-convs"],
)
def test_other_layouts_prune_and_replay(make, shape):
    torch.manual_seed(0)
    model, x = make().eval(), torch.rand(*shape)
    fresh = copy.deepcopy(model)
    result = prune_structured_(model, x, amount=0.5)
    if make is TorchEncoder:
        attn = model.enc.self_attn
        assert attn.embed_dim == 12 and attn.embed_dim % attn.num_heads == 0 and model.enc.linear1.out_features == 24
    elif make is _SeparateQKV:
        assert model.num_heads == 2 and model.head_dim == 4 and model.q.out_features == 8 and result.heads == {"": 2}
    else:
        assert (model.c1.out_channels, model.gn.num_groups, model.c2.groups, model.dw.groups) == (8, 4, 2, 8)
    assert replay_pruning_(fresh, [result.record()])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model(x))


def test_dead_neurons_go_first_and_the_function_is_unchanged():
    torch.manual_seed(0)
    model = TinyMLP(d_in=16, hidden=32)
    dead = torch.arange(0, 32, 2)
    with torch.no_grad():
        model.fc1.weight[dead] = 0.0
        model.fc1.bias[dead] = 0.0
    x = torch.randn(8, 16)
    before = model(x)
    keep_w = model.fc1.weight[1::2].clone()
    prune_structured_(model, torch.zeros(1, 16), amount=0.5, importance="l1", exclude=["fc2"])
    assert model.fc1.out_features == 16 and model.fc2.in_features == 16 and model.fc2.out_features == 32
    assert torch.equal(model.fc1.weight, keep_w)
    torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_optimizer_state_is_sliced_to_the_kept_channels(opt_name):
    torch.manual_seed(0)
    model = TinyMLP(d_in=16, hidden=32)
    with torch.no_grad():
        model.fc1.weight[::2] *= 1e-3  # odd rows survive
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if opt_name == "adamw" else torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        F.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    key = "exp_avg_sq" if opt_name == "adamw" else "momentum_buffer"
    old_w1, old_w2 = opt.state[model.fc1.weight][key].clone(), opt.state[model.fc2.weight][key].clone()
    lr = opt.param_groups[0]["lr"]
    prune_structured_(model, torch.zeros(1, 16), amount=0.5, exclude=["fc2"], optimizers=[opt])
    params = list(model.parameters())
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params]
    torch.testing.assert_close(opt.state[model.fc1.weight][key], old_w1[1::2], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[model.fc2.weight][key], old_w2[:, 1::2], rtol=0, atol=0)
    for p in params:
        assert opt.state[p][key].shape == p.shape
    if opt_name == "adamw":
        assert float(opt.state[model.fc1.weight]["step"]) == 3.0
    assert opt.param_groups[0]["lr"] == lr and sched.last_epoch == 3
    F.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
    opt.step()  # the optimizer runs on the new parameters


def test_reset_and_unsliceable_state_are_dropped():
    model = TinyMLP(d_in=16, hidden=32)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    opt.state[model.fc2.weight]["blocks"] = torch.zeros(7)  # shaped unlike the weight, like 8-bit block state
    graph = build_pruning_graph(model, torch.zeros(1, 16))
    from lightning_accel.pruning.structured import apply_pruning_plan_

    result = apply_pruning_plan_(graph, plan_structured_pruning(graph, 0.5))
    assert slice_optimizer_(opt, result.slices) == ["fc2.weight"]
    assert model.fc2.weight not in opt.state and model.fc1.weight in opt.state
    model2 = TinyMLP(d_in=16, hidden=32)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    model2(torch.randn(2, 16)).sum().backward()
    opt2.step()
    prune_structured_(model2, torch.zeros(1, 16), amount=0.5, optimizers=[opt2], reset_optimizer_state=True)
    assert not any(p in opt2.state for p in (model2.fc1.weight, model2.fc2.weight, model2.head.weight))


def test_replay_into_a_fresh_model_and_refusal_of_a_wrong_one():
    torch.manual_seed(0)
    model = DigitsTransformer(dim=16, depth=1, heads=4)
    fresh, wrong = copy.deepcopy(model), DigitsTransformer(dim=32, depth=1, heads=4)
    original = build_pruning_graph(model, X8).unit_counts()
    r1 = prune_structured_(model, X8, amount=0.25, original=original)
    r2 = prune_structured_(model, X8, amount=0.5, original=original, event=1)
    history, shapes = [r1.record(), r2.record()], {n: list(s) for n, s in _shapes(model).items()}
    assert replay_pruning_(fresh, history, shapes=shapes) is True
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    assert fresh.blocks[0].attn.num_heads == model.blocks[0].attn.num_heads == 2
    assert replay_pruning_(fresh, history, shapes=shapes) is False  # already pruned: nothing to do
    before = _shapes(wrong)
    with pytest.raises(ValueError, match="does not fit this DigitsTransformer.*left unchanged"):
        replay_pruning_(wrong, history, shapes=shapes)
    assert _shapes(wrong) == before


def test_snapshot_and_restore_put_a_pruned_model_back_exactly():
    torch.manual_seed(0)
    model = DigitsTransformer(dim=16, depth=1, heads=4).eval()
    before, params = _shapes(model), dict(model.named_parameters())
    x = torch.rand(3, 1, 8, 8)
    out = model(x)
    snapshot = snapshot_structure(model)
    prune_structured_(model, X8, amount=0.5)
    assert model.blocks[0].attn.num_heads == 2 and _shapes(model) != before
    restore_structure(snapshot)
    assert model.blocks[0].attn.num_heads == 4 and _shapes(model) == before
    assert all(p is params[n] for n, p in model.named_parameters())  # the very tensors, no copies
    torch.testing.assert_close(model(x), out)


class _Pair(NamedTuple):
    image: torch.Tensor
    scale: torch.Tensor


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(image.flatten(1)[:, :8])) * scale)


def test_example_input_may_be_a_namedtuple_of_tensors():
    model = _TwoInputs()
    example = _Pair(torch.rand(2, 1, 8, 8), torch.ones(2, 1))
    prune_structured_(model, example, amount=0.5)
    assert model.body.out_features == 8
    macs, _ = count_macs_params(model, example)
    assert macs == 2 * (8 * 8 + 8 * 2)


def test_global_scope_respects_the_layer_cap():
    torch.manual_seed(0)
    model = ResidualCNN(width=16, depth=1)
    with torch.no_grad():  # importance is normalized by each group's mean: 28 outliers rank lowest overall
        model.blocks[1].conv1.weight[4:] *= 1e-3
    graph = build_pruning_graph(model, X8)
    units0 = graph.unit_counts()
    plan = plan_structured_pruning(graph, 0.5, scope="global", max_layer_amount=0.75)
    removed = {s["key"]: units0[s["key"]] - s["units"] for s in plan["steps"]}
    assert sum(removed.values()) == sum(units0.values()) // 2
    assert removed["blocks.1.conv1"] == 24  # capped at 75% of 32
    assert all(r <= 0.75 * units0[k] for k, r in removed.items())


def test_round_to_keeps_multiples():
    model = ResidualCNN(width=12, depth=1)
    prune_structured_(model, X8, amount=0.4, round_to=4)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 4 == 0 and m.out_channels < (12 if m.out_channels <= 12 else 24)


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "bn_scale", "random"])
def test_every_importance_prunes_to_the_target(importance):
    torch.manual_seed(0)
    model = TinyConvNet(width=8)
    grads = None
    if importance == "taylor":
        model(torch.rand(4, 1, 8, 8)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    result = prune_structured_(model, X8, amount=0.5, importance=importance, grads=grads, seed=3)
    assert model.conv1.out_channels == 4 and result.units
    if importance == "random":  # seeded: the same choice again, another with another seed
        plans = []
        for seed in (3, 3, 4):
            g = build_pruning_graph(TinyConvNet(width=8), X8)
            plans.append(plan_structured_pruning(g, 0.5, importance="random", seed=seed)["steps"][0]["idxs"])
        assert plans[0] == plans[1] != plans[2]


def test_bn_scale_without_batchnorm_falls_back_with_a_warning():
    with pytest.warns(StructuredPruningWarning, match="used 'l2'.*no BatchNorm"):
        prune_structured_(DigitsTransformer(dim=16, depth=1, heads=2), X8, amount=0.5, importance="bn_scale")


class _HardCoded(nn.Module):
    """Assumes 8 channels: breaks as soon as the conv feeding it loses one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 8, 64).mean(-1)


class _Fragile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.neck = _HardCoded()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.neck(self.conv1(x)))))


def test_a_model_that_breaks_names_the_module_and_is_left_intact():
    model = _Fragile()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StructuredPruningError, match=r"module 'neck' \(_HardCoded\).*left unpruned.*exclude=\['conv1'\]"):
        prune_structured_(model, X8, amount=0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.conv1.out_channels == 8
    prune_structured_(model, X8, amount=0.5, exclude=["conv1"])  # the advice works
    assert model.conv1.out_channels == 8 and model.fc.out_features == 4


def test_untraceable_input_names_the_module():
    with pytest.raises(StructuredPruningError, match=r"could not trace TinyMLP: module 'fc1' \(Linear\)"):
        build_pruning_graph(TinyMLP(d_in=16), torch.zeros(1, 5))


def test_exclude_pattern_matching_nothing_raises():
    with pytest.raises(NoMatchError, match="`exclude` pattern 'nope.*' matches no module"):
        build_pruning_graph(TinyMLP(), torch.zeros(1, 16), exclude=["nope.*"])


def test_group_regularizer_pushes_weak_channels_hardest():
    torch.manual_seed(0)
    model = TinyMLP(d_in=16, hidden=8)
    with torch.no_grad():
        model.fc1.weight[0] *= 0.1  # the weakest neuron of fc1's group
    reg = build_group_regularizer(model, torch.zeros(1, 16), 1e-2, exclude=["fc2"])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg.regularize(model)
    g, w = model.fc1.weight.grad, model.fc1.weight.detach()
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    gamma = (g / w).mean(1)  # reg * alpha ** ((max - imp) / (max - min)) per output channel
    assert gamma.argmax() == 0 and gamma[0] > 10 * gamma[1:].min()
    assert torch.count_nonzero(model.head.weight.grad[:, :0]) == 0


# ------------------------------------------------------------------------------------------------ callback


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(amount=1.0), r"`amount` must be a number in \[0.0, 1.0\); got 1.0"),
        (dict(amount=0.3, initial_amount=0.5), r"`initial_amount` must be <= `amount` \(0.3\); got 0.5"),
        (dict(schedule="cubicc"), r"`schedule` must be one of 'one_shot', 'linear', 'cubic', 'exponential'; got 'cubicc'"),
        (dict(interval="batch"), r"`interval` must be one of 'step', 'epoch'; got 'batch'"),
        (dict(start=5, end=2), r"`end` must be None or >= `start` \(5\); got 2"),
        (dict(frequency=0), r"`frequency` must be an integer >= 1; got 0"),
        (dict(importance="l3"), r"`importance` must be one of 'l1', 'l2', 'taylor', 'bn_scale', 'random'; got 'l3'"),
        (dict(scope="net"), r"`scope` must be one of 'layer', 'global'; got 'net'"),
        (dict(max_layer_amount=0.0), r"`max_layer_amount` must be a number in \(0.0, 1.0\]; got 0.0"),
        (dict(exclude="stem"), r"`exclude` must be None or a non-empty list of glob patterns"),
        (dict(round_to=0), r"`round_to` must be an integer >= 1; got 0"),
        (dict(prune_heads="yes"), r"`prune_heads` must be a bool \(true/false\); got 'yes'"),
        (dict(regularization_strength=-1.0), r"`regularization_strength` must be a number >= 0.0; got -1.0"),
        (dict(optimizer_state="keep"), r"`optimizer_state` must be one of 'slice', 'reset'; got 'keep'"),
        (dict(verbose=3), r"`verbose` must be one of 0, 1, 2; got 3"),
    ],
)
def test_callback_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredPruning(**kwargs)


class _Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "rec"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class _Watch(AccelCallback):
    """Checks after every step that the optimizer holds exactly the model's parameters."""

    order = 45

    def __init__(self) -> None:
        self.changes = 0
        self.bad_steps = 0

    def on_structure_changed(self, trainer, pl_module, source):
        self.changes += 1

    def on_train_batch_end(self, trainer, pl_module, *args):
        params = {id(p) for p in pl_module.parameters()}
        opt = trainer.optimizers[0]
        bound = {id(p) for g in opt.param_groups for p in g["params"]}
        if bound != params or any(opt.state[p]["exp_avg"].shape != p.shape for p in pl_module.parameters()):
            self.bad_steps += 1


@pytest.mark.parametrize(
    "make", [lambda: ResidualCNN(width=8, depth=1), lambda: DigitsTransformer(dim=16, depth=1, heads=4)], ids=["cnn", "vit"]
)
def test_callback_prunes_during_fit_keeps_optimizer_and_scheduler_and_logs(tmp_path, make):
    pl.seed_everything(0)
    model = make()
    cb, watch, rec = StructuredPruning(amount=0.5, start=0, end=2), _Watch(), _Recorder()
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1, callbacks=[cb, watch], logger=rec)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert cb.amount_pruned == 0.5 and [h["t"] for h in cb.history] == [1, 2]
    assert [h["amount"] for h in cb.history] == [0.25, 0.5]
    assert watch.changes == 2 and watch.bad_steps == 0
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == trainer.global_step == 6
    logged = [m for _, m in rec.rows if "pruning/macs" in m]
    assert len(logged) == 2 and logged[-1]["pruning/macs_ratio"] >= 3.3 and logged[-1]["pruning/amount"] == 0.5
    assert logged[0]["pruning/macs"] > logged[1]["pruning/macs"]
    if isinstance(model, DigitsTransformer):
        assert model.blocks[0].attn.num_heads == 2


def test_checkpoint_resumes_into_a_fresh_model_and_loads_for_inference(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=32)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    cb = StructuredPruning(amount=0.5, start=0, end=2, verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[cb, ckpt],
                           enable_checkpointing=True)
    model = ResidualCNN(width=8, depth=1)
    trainer.fit(model, dm)
    path = tmp_path / "ckpts" / "epoch=1-step=4.ckpt"
    x = torch.rand(6, 1, 8, 8)
    expected = model.eval()(x)
    # inference: the checkpoint does not fit a fresh model, load_pruned makes it fit
    with pytest.raises(RuntimeError, match="size mismatch"):
        ResidualCNN.load_from_checkpoint(path)
    for loaded in (load_pruned(ResidualCNN, path), load_checkpoint(ResidualCNN(width=8, depth=1), path),
                   lightning_accel.load_pruned(ResidualCNN(width=8, depth=1), str(path))):
        torch.testing.assert_close(loaded(x), expected)
    # resume training into a freshly built, unpruned model
    fresh = ResidualCNN(width=8, depth=1)
    cb2 = StructuredPruning(amount=0.5, start=0, end=2, verbose=0)
    trainer2 = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1, callbacks=[cb2])
    trainer2.fit(fresh, dm, ckpt_path=path)
    assert _shapes(fresh) == _shapes(model) and trainer2.global_step == 6
    assert cb2.history == cb.history and "on_load_checkpoint" not in fresh.__dict__  # unhooked at teardown
    # validate/test from the checkpoint into another fresh model
    other = ResidualCNN(width=8, depth=1)
    out = tiny_trainer(tmp_path, callbacks=[StructuredPruning(verbose=0)]).validate(other, dm, ckpt_path=path, verbose=False)
    direct = tiny_trainer(tmp_path).validate(model, dm, verbose=False)  # the pruned model the checkpoint came from
    assert _shapes(other) == _shapes(model) and out[0]["val_acc"] == pytest.approx(direct[0]["val_acc"])


def test_resuming_into_a_model_of_another_width_fails_clearly(tmp_path):
    dm = DigitsDataModule(batch_size=32)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0,
                           callbacks=[StructuredPruning(start=0, end=1, verbose=0), ckpt], enable_checkpointing=True)
    trainer.fit(ResidualCNN(width=8, depth=1), dm)
    wide = ResidualCNN(width=16, depth=1)
    before = _shapes(wide)
    trainer2 = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=2, callbacks=[StructuredPruning(start=0, end=1, verbose=0)])
    with pytest.raises(ValueError, match="history does not fit this ResidualCNN"):
        trainer2.fit(wide, dm, ckpt_path=tmp_path / "ckpts" / "epoch=1-step=4.ckpt")
    assert _shapes(wide) == before


def test_step_interval_taylor_regularization_and_first_batch_input(tmp_path):
    pl.seed_everything(0)
    model = TinyConvNet(width=8)
    model.example_input_array = None  # traced on the first sample of the first batch
    cb = StructuredPruning(amount=0.5, initial_amount=0.2, interval="step", start=2, end=6, frequency=2, importance="taylor",
                           regularization_strength=1e-3, verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[cb])
    trainer.fit(model, RandomDataModule(shape=(1, 8, 8), batch_size=8))
    assert [(h["t"], round(h["amount"], 2)) for h in cb.history] == [(2, 0.2), (4, 0.35), (6, 0.5)]
    assert model.conv1.out_channels == 4 and cb.amount_pruned == 0.5


def test_optimizer_state_reset_option(tmp_path):
    model = TinyMLP(optimizer="sgd")
    cb = StructuredPruning(start=0, end=1, optimizer_state="reset", verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[cb])
    trainer.fit(model, RandomDataModule())
    opt = trainer.optimizers[0]
    assert model.fc1.out_features == 16 and model.fc1.weight not in opt.state  # restarted after the last step's event


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
        (lambda: lightning_accel.ScheduledPruning(), r"(Scheduled|Structured)Pruning cannot be combined with (Scheduled|Structured)Pruning: structured"),
        (lambda: Quantization("setup"), "StructuredPruning cannot be combined with Quantization: layers quantized at setup"),
    ],
)
def test_conflicts_are_named(tmp_path, other, match):
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[other(), StructuredPruning()])
    with pytest.raises(CompositionError, match=match):
        trainer.fit(TinyMLP(), RandomDataModule())
    assert find_conflict(StructuredPruning(), Quantization("fit_end")) is None
    assert "both remove channels" in find_conflict(StructuredPruning(), StructuredPruning())


def test_compiled_model_is_recompiled_after_each_event(tmp_path):
    from lightning_accel.compile.callbacks import TorchCompile

    pl.seed_everything(0)
    model = TinyConvNet(width=8)
    compile_cb = TorchCompile(backend="eager", fallback="raise", when="start")  # compiled from the start: recompiled per event
    cb = StructuredPruning(amount=0.5, start=0, end=2, verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[compile_cb, cb])
    trainer.fit(model, RandomDataModule(shape=(1, 8, 8), batch_size=8))
    assert model.conv1.out_channels == 4 and len(cb.history) == 2
    assert compile_cb._structure_changes == 2
    assert set(model.state_dict()) == set(TinyConvNet(width=8).state_dict())  # keys stay the model's own


def test_benchmark_quick_smoke(tmp_path):
    import json

    from benchmarks.__main__ import main

    assert main(["structured_pruning", "--quick", "--out", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "structured_pruning.json").read_text())["rows"]}
    assert rows["ResidualCNN pruned"]["extra"]["MACs ratio"] > 3.0 and rows["DigitsTransformer pruned"]["ratio"] > 0
    assert rows["ResidualCNN pruning event"]["extra"]["events per fit"] == 1


@pytest.mark.gpu
def test_prunes_on_cuda_and_loads_back(tmp_path):
    pl.seed_everything(0)
    model = DigitsTransformer(dim=16, depth=1, heads=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    cb = StructuredPruning(amount=0.5, start=0, end=2, importance="taylor", verbose=0)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cuda", devices=1, max_epochs=3, limit_train_batches=2,
                         limit_val_batches=0, logger=False, enable_progress_bar=False, callbacks=[cb, ckpt])
    trainer.fit(model, DigitsDataModule(batch_size=32))
    opt = trainer.optimizers[0]
    for p in model.parameters():
        assert p.is_cuda and opt.state[p]["exp_avg"].is_cuda and opt.state[p]["exp_avg"].shape == p.shape
    assert model.blocks[0].attn.num_heads == 2
    loaded = load_pruned(DigitsTransformer, tmp_path / "ckpts" / "epoch=2-step=6.ckpt").cuda()
    x = torch.rand(4, 1, 8, 8, device="cuda")
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_layer_amounts_may_name_a_group_that_left_the_graph():
    """A group pruned down to one unit leaves torch-pruning's graph; a later event's per-group targets still name it
    (they come from the unpruned model): known through `original`, not an error. A name no model had still is."""
    model = TinyMLP(d_in=16, hidden=32)
    graph = build_pruning_graph(model, torch.zeros(1, 16))
    counts = graph.unit_counts()
    key = next(iter(counts))
    original = {**counts, "gone.weight": 4}
    plan = plan_structured_pruning(graph, 0.5, original=original, amounts={key: 0.5, "gone.weight": 0.9})
    assert plan["steps"]
    with pytest.raises(ValueError, match="not prunable groups"):
        plan_structured_pruning(graph, 0.5, original=counts, amounts={"nowhere.weight": 0.5})


def test_an_amount_above_max_layer_amount_is_said_and_the_removed_share_logged(tmp_path):
    """amount=0.99 with the default max_layer_amount=0.9: warned at construction, and what was really removed
    (90% of the units) is reported beside the scheduled amount."""
    with pytest.warns(StructuredPruningWarning, match=r"`amount`=0.99 is above `max_layer_amount`=0.9"):
        cb = StructuredPruning(amount=0.99, start=0, end=0, verbose=0)
    model = ResidualCNN(width=8, depth=1)
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[cb]).fit(model, DigitsDataModule(batch_size=32))
    assert cb.amount_pruned == pytest.approx(0.99)
    assert 0.85 <= cb.units_removed <= 0.9 + 1e-9
    assert cb.metrics["pruning/units_removed"] == pytest.approx(cb.units_removed)
