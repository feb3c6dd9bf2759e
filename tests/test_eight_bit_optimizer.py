"""EightBitOptimizer: the conversion core (same update rule, 8-bit state) and the callback in a Trainer."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_accel.demos import DigitsDataModule, DigitsTransformer
from lightning_accel.errors import QuantizationNoEffectWarning, SlowOnCPUWarning
from lightning_accel.optimizers import (
    EightBitOptimizer,
    OptimizerNotConvertedWarning,
    UnsupportedOptimizerError,
    is_8bit_optimizer,
    optimizer_state_bytes,
    to_8bit_optimizer,
    why_not_8bit,
)
from tests.helpers import tiny_trainer


class Lion(torch.optim.Optimizer):
    """Reference Lion (Chen et al., 2023), as in lion-pytorch: converted by class name."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                b1, b2 = group["betas"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = state["exp_avg"] * b1 + p.grad * (1 - b1)
                p.add_(update.sign(), alpha=-group["lr"])
                state["exp_avg"].mul_(b2).add_(p.grad, alpha=1 - b2)


OPTIMIZERS = {
    "AdamW": (lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05), "AdamW8bit"),
    "Adam": (lambda groups: torch.optim.Adam(groups, lr=1e-2, weight_decay=0.0), "Adam8bit"),
    "Adam-decoupled": (
        lambda groups: torch.optim.Adam(groups, lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
        "Adam8bit",
    ),
    "SGD": (lambda groups: torch.optim.SGD(groups, lr=5e-2, momentum=0.9, weight_decay=1e-3), "SGD8bit"),
    "RMSprop": (lambda groups: torch.optim.RMSprop(groups, lr=1e-3, alpha=0.95, eps=1e-6, weight_decay=1e-3), "RMSprop8bit"),
    "Adagrad": (lambda groups: torch.optim.Adagrad(groups, lr=5e-2, eps=1e-8, weight_decay=1e-3), "Adagrad8bit"),
    "Lion": (lambda groups: Lion(groups, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), "Lion8bit"),
}


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))
    x, target = torch.randn(128, 64), torch.randn(128, 64)
    return model, x, target


def _groups(model: nn.Sequential) -> list[dict]:
    # two groups with their own hyper-parameters and extra keys
    return [
        {"params": list(model[0].parameters()), "tag": "first"},
        {"params": list(model[2].parameters()), "lr": 3e-3, "weight_decay": 0.0, "tag": "second"},
    ]


def _train(model, opt, x, target, steps=15):
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_conversion_keeps_groups_and_the_update_rule(name):
    make, target_cls = OPTIMIZERS[name]
    model, x, target = _problem()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    reference = _train(model, make(_groups(model)), x, target)

    # same update rule: with 32-bit state (min_size above every tensor) bitsandbytes tracks torch closely
    model, x, target = _problem()
    torch_opt = make(_groups(model))
    converted = to_8bit_optimizer(torch_opt, min_size=10**9)
    assert type(converted).__name__ == target_cls and is_8bit_optimizer(converted)
    assert [g["params"] for g in converted.param_groups] == [g["params"] for g in torch_opt.param_groups]
    for new, old in zip(converted.param_groups, torch_opt.param_groups):
        assert new["lr"] == old["lr"] and new["weight_decay"] == old["weight_decay"] and new["tag"] == old["tag"]
    exact = _train(model, converted, x, target)
    moved = (reference - start).norm()
    assert (exact - reference).norm() / moved < 1e-3

    # 8-bit state: close to the 32-bit trajectory, on a fraction of the state bytes
    model, x, target = _problem()
    eight = to_8bit_optimizer(make(_groups(model)), min_size=0)
    approx = _train(model, eight, x, target)
    assert (approx - reference).norm() / moved < 0.15
    assert eight.state[model[0].weight]["state1"].dtype == torch.uint8


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: torch.optim.Adam(ps, weight_decay=0.01), "adds it to the gradient \\(L2\\).*use torch.optim.AdamW"),
        (lambda ps: torch.optim.AdamW(ps, amsgrad=True), "amsgrad=True"),
        (lambda ps: torch.optim.AdamW(ps, maximize=True), "maximize=True"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), "momentum=0: plain SGD keeps no state"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), "nesterov=True"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1), "dampening=0.1"),
        (lambda ps: torch.optim.RMSprop(ps, momentum=0.9), "RMSprop8bit has no momentum buffer"),
        (lambda ps: torch.optim.RMSprop(ps, centered=True), "centered=True"),
        (lambda ps: torch.optim.Adagrad(ps, lr_decay=0.1), "lr_decay=0.1"),
        (lambda ps: torch.optim.Adamax(ps), "Adamax has no bitsandbytes 8-bit counterpart"),
    ],
)
def test_unconvertible_optimizers_are_refused(make, match):
    opt = make(nn.Linear(4, 4).parameters())
    assert why_not_8bit(opt) is not None
    with pytest.raises(UnsupportedOptimizerError, match=match):
        to_8bit_optimizer(opt)


def test_converting_after_the_first_step_is_refused():
    model, x, target = _problem()
    opt = torch.optim.AdamW(model.parameters())
    _train(model, opt, x, target, steps=1)
    with pytest.raises(UnsupportedOptimizerError, match="already has optimizer state"):
        to_8bit_optimizer(opt)


def test_state_bytes_of_adamw8bit_on_the_transformer():
    """Optimizer state of EightBitOptimizer(AdamW) vs torch AdamW on the digits Transformer (dim 256): <= 0.30x."""
    torch.manual_seed(0)
    sizes = {}
    for eight in (False, True):
        model = DigitsTransformer(dim=256, depth=2, heads=8)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if eight:
            opt = to_8bit_optimizer(opt)
        loss = nn.functional.cross_entropy(model(torch.rand(8, 1, 8, 8)), torch.randint(0, 10, (8,)))
        loss.backward()
        opt.step()
        sizes[eight] = optimizer_state_bytes(opt)
    assert sizes[False] == 2 * 4 * sum(p.numel() for p in model.parameters()) + 4 * len(list(model.parameters()))
    assert 0.25 <= sizes[True] / sizes[False] <= 0.30, sizes


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(paged="no"), "`paged` must be a bool"),
        (dict(min_size=-1), "`min_size` must be an integer >= 0; got -1"),
        (dict(min_size=1.5), "`min_size` must be an integer"),
        (dict(strict=1), "`strict` must be a bool"),
    ],
)
def test_callback_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EightBitOptimizer(**kwargs)


def test_callback_swaps_optimizer_and_repoints_the_scheduler(tmp_path):
    pl.seed_everything(0)
    model = DigitsTransformer(dim=32, depth=1, heads=2)  # AdamW + per-step cosine LambdaLR
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = tiny_trainer(
        tmp_path, max_epochs=2, limit_train_batches=6, limit_val_batches=1, callbacks=[EightBitOptimizer(min_size=1024), ckpt], enable_checkpointing=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DigitsDataModule(batch_size=64))
    assert not [w for w in caught if "optimizer.step()" in str(w.message)]  # the scheduler still sees the steps
    slow = [w for w in caught if issubclass(w.category, SlowOnCPUWarning)]  # on a CPU: memory, not time, once
    assert len(slow) == 1 and "saves optimizer-state memory but not time" in str(slow[0].message)
    opt = trainer.optimizers[0]
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert type(opt).__name__ == "AdamW8bit" and sched.optimizer is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])
    assert opt.param_groups[0]["lr"] < 0.9 * model.lr  # the cosine schedule decayed the new optimizer's lr
    assert opt.param_groups[0]["weight_decay"] == model.weight_decay
    assert opt.state[model.blocks[0].attn.qkv.weight]["state1"].dtype == torch.uint8  # 3072 >= 1024: 8-bit
    assert opt.state[model.head.weight]["state1"].dtype == torch.float32  # 320 < 1024: 32-bit
    saved = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)
    assert saved["callbacks"]["EightBitOptimizer"]["converted"] == [{"index": 0, "from": "AdamW", "to": "AdamW8bit"}]
    assert any("__bnb_optimizer_quant_state__" in s for s in saved["optimizer_states"][0]["state"].values())


def test_callback_strict_and_lenient(tmp_path):
    dm = DigitsDataModule(batch_size=64)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[EightBitOptimizer()])
    with pytest.raises(UnsupportedOptimizerError, match="cannot convert optimizer 0 \\(SGD\\): .*nesterov=True.*`strict`=False"):
        trainer.fit(DigitsTransformer(dim=32, depth=1, heads=2, optimizer="sgd"), dm)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[EightBitOptimizer(strict=False, paged=True)])
    with pytest.warns(OptimizerNotConvertedWarning, match="leaves optimizer 0 \\(SGD\\) as it is"), pytest.warns(
        QuantizationNoEffectWarning, match="`paged`=True has no effect on cpu"
    ):
        trainer.fit(DigitsTransformer(dim=32, depth=1, heads=2, optimizer="sgd"), dm)
    assert type(trainer.optimizers[0]) is torch.optim.SGD
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[EightBitOptimizer(strict=False)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DigitsTransformer(dim=32, depth=1, heads=2, optimizer="sgd"), dm)
    assert not [w for w in caught if issubclass(w.category, SlowOnCPUWarning)]  # nothing converted: no cost to warn of


def test_resuming_a_32bit_optimizer_state_is_refused(tmp_path):
    dm = DigitsDataModule(batch_size=64)
    pl.seed_everything(0)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(DigitsTransformer(dim=32, depth=1, heads=2), dm)
    trainer.save_checkpoint(tmp_path / "fp32.ckpt")
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[EightBitOptimizer()])
    with pytest.raises(ValueError, match="state of optimizer 0 was saved by a 32-bit optimizer"):
        trainer.fit(DigitsTransformer(dim=32, depth=1, heads=2), dm, ckpt_path=tmp_path / "fp32.ckpt")


def test_structured_pruning_slices_block_wise_8bit_state():
    """Pruned channels leave the 8-bit Adam statistics of the kept ones in place: the block-wise state is dequantized,
    sliced like the parameter and quantized again in new blocks (within 8-bit rounding of the original values)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from lightning_accel import prune_structured_

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = bnb.optim.AdamW8bit(m.parameters(), lr=1e-3, min_8bit_size=256)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(8, 64)).sum().backward()
        opt.step()
    before = {}
    for n in ("1", "2"):
        st = opt.state[m[0].weight]
        before[n] = bnbf.dequantize_blockwise(st[f"state{n}"], absmax=st[f"absmax{n}"], code=st[f"qmap{n}"], blocksize=256)
    result = prune_structured_(m, torch.zeros(2, 64), amount=0.5, optimizers=[opt])
    (s,) = [s for s in result.slices if s.name == "0.weight"]
    (dim, keep), = s.ops
    st = opt.state[m[0].weight]
    assert st["state1"].dtype == torch.uint8 and st["state1"].shape == (64, 64) and st["absmax1"].numel() == 16
    for n in ("1", "2"):
        got = bnbf.dequantize_blockwise(st[f"state{n}"], absmax=st[f"absmax{n}"], code=st[f"qmap{n}"], blocksize=256)
        want = before[n].index_select(dim, keep)
        assert (got - want).abs().max() <= 0.02 * want.abs().max() + 1e-12
    opt.zero_grad()
    m(torch.randn(8, 64)).sum().backward()
    opt.step()  # the re-bound state trains on
    assert torch.isfinite(m[0].weight).all()
