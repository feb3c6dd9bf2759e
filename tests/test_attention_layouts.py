"""Attention layouts stay consistent under structured pruning (#16): torch's ``nn.MultiheadAttention``, Hugging Face
BERT and ViT self-attention (module attributes and ``config``), timm-style fused ``qkv`` attention. ``prune_heads=True``
removes whole heads, ``False`` the same head dimensions of every head; unknown layouts are refused before training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_accel import StructuredPruning
from lightning_accel.pruning.structured import (
    StructuredPruningError,
    check_attention_layouts,
    prune_structured_,
    replay_pruning_,
    unknown_attention,
)
from tests.helpers import TorchEncoder, tiny_trainer
from tests.helpers.real import build_backbone

pytest.importorskip("transformers", reason="the Hugging Face layouts need `transformers` (the `dev` extra)")


def _sample(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if arch == "bert":
        return {"input_ids": torch.randint(1, 64, (2, 8), generator=g), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def _call(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _attention(model: nn.Module, arch: str) -> list[tuple[str, nn.Module]]:
    kinds = {"bert": "BertSelfAttention", "vit": "ViTAttention", "timm": "TimmAttention"}
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == kinds[arch]]


def _head_attrs(m: nn.Module) -> tuple[int, int, int]:
    """(heads, head size, heads x head size) as the module itself keeps them."""
    heads = getattr(m, "num_heads", None) or m.num_attention_heads
    size = getattr(m, "head_dim", None) or m.attention_head_size
    total = getattr(m, "attn_dim", None) or getattr(m, "all_head_size", heads * size)
    return heads, size, total


def _query(m: nn.Module) -> nn.Linear:
    for name in ("query", "q_proj"):
        if hasattr(m, name):
            return getattr(m, name)
    return m.qkv


@pytest.mark.parametrize("arch", ["bert", "vit", "timm"])
def test_prune_heads_true_removes_heads_false_shrinks_head_size_and_both_replay(arch):
    torch.manual_seed(0)
    x = _sample(arch)
    models, removed = {}, {}
    for prune_heads in (True, False):
        model = build_backbone(arch).eval()
        fresh = copy.deepcopy(model)
        result = prune_structured_(model, x, amount=0.5, prune_heads=prune_heads)
        for name, attn in _attention(model, arch):
            heads, size, total = _head_attrs(attn)
            assert (heads, size) == ((2, 8) if prune_heads else (4, 4)), name
            assert total == heads * size == _query(attn).out_features // (3 if arch == "timm" else 1)
            assert result.heads[name] == heads
        first, attn = _attention(model, arch)[0]
        query = next(f"{first}.{n}" for n, m in attn.named_children() if m is _query(attn))
        op = next(op for op in result.ops if op[0] == query and op[1] == "out")
        removed[prune_heads] = sorted(i for i in op[2] if i < 32)  # timm: the q third of qkv
        if arch != "timm":  # Hugging Face: the shared config follows the (uniform) head count
            assert model.config.num_attention_heads == (2 if prune_heads else 4)
        # a fresh model replays the history without tracing and computes the same function
        assert replay_pruning_(fresh, [result.record()])
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(_call(fresh.eval(), x), _call(model, x))
        assert [_head_attrs(a) for _, a in _attention(fresh, arch)] == [_head_attrs(a) for _, a in _attention(model, arch)]
        if arch != "timm":
            assert fresh.config.num_attention_heads == model.config.num_attention_heads
        models[prune_heads] = model
    # whole heads: two blocks of 8 contiguous channels; head dims: the same 4 offsets in each of the 4 heads
    heads_removed = removed[True]
    assert len(heads_removed) == 16 and {i // 8 for i in heads_removed} != set(range(4))
    assert all(len([i for i in heads_removed if i // 8 == h]) in (0, 8) for h in range(4))
    dims_removed = removed[False]
    offsets = [sorted(i % 8 for i in dims_removed if i // 8 == h) for h in range(4)]
    assert all(o == offsets[0] and len(o) == 4 for o in offsets)
    # the two models differ in head counts and shapes
    a, b = (_attention(models[k], arch)[0][1] for k in (True, False))
    assert _head_attrs(a) != _head_attrs(b)


@pytest.mark.parametrize("prune_heads", [True, False])
def test_multihead_attention_loses_whole_heads_or_the_same_dims_of_every_head(prune_heads):
    torch.manual_seed(0)
    model, x = TorchEncoder().eval(), torch.rand(2, 5, 4)
    fresh = copy.deepcopy(model)
    result = prune_structured_(model, x, amount=0.5, prune_heads=prune_heads)
    attn = model.enc.self_attn
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == ((2, 6, 12) if prune_heads else (4, 3, 12))
    removed = sorted(next(op for op in result.ops if op[0] == "enc.self_attn")[2])
    if prune_heads:
        assert all(len([i for i in removed if i // 6 == h]) in (0, 6) for h in range(4))
    else:
        assert len({tuple(i % 6 for i in removed if i // 6 == h) for h in range(4)}) == 1
    assert replay_pruning_(fresh, [result.record()])
    fresh.load_state_dict(model.state_dict())
    assert fresh.enc.self_attn.num_heads == attn.num_heads
    torch.testing.assert_close(fresh.eval()(x), model(x))


class _LucidrainsAttention(nn.Module):
    """A layout this package does not know: ``heads`` and a ``to_qkv`` Linear (vit-pytorch style)."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class _GQA(nn.Module):
    """Grouped-query attention (fewer key/value heads): refused."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = 4, 2, 4
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.o_proj = nn.Linear(16, 16)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.attn = _LucidrainsAttention()
        self.head = nn.Linear(16, 3)
        self.example_input_array = torch.zeros(1, 5, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(x)).mean(1))


def test_unknown_layouts_are_named_and_refused_before_anything_is_pruned():
    net = _Net()
    assert set(unknown_attention(net)) == {"attn"}
    assert "grouped-query" in unknown_attention(_GQA())[""]
    from transformers import (  # fused c_attn is a Conv1D, not a Linear: refused, not mixed
        GPT2Config,
        GPT2Model,
    )

    gpt2 = GPT2Model(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4))
    assert set(unknown_attention(gpt2)) == {"h.0.attn"}
    # a model that only stores the head count of the attention it contains is not attention itself
    from tests.helpers.real import TimmBlock

    holder = nn.Module()
    holder.num_heads, holder.embed, holder.block, holder.head = 4, nn.Linear(8, 16), TimmBlock(16, 4), nn.Linear(16, 2)
    assert unknown_attention(holder) == {}
    before = {n: p.shape for n, p in net.named_parameters()}
    with pytest.raises(StructuredPruningError, match=r"'attn' \(_LucidrainsAttention\).*exclude=\['attn'\]"):
        prune_structured_(net, torch.zeros(1, 5, 16), amount=0.5)
    assert {n: p.shape for n, p in net.named_parameters()} == before
    # excluded, it is kept whole and the rest is pruned
    check_attention_layouts(net, exclude=["attn"])
    prune_structured_(net, torch.zeros(1, 5, 16), amount=0.5, exclude=["attn"])
    assert net.attn.to_qkv.out_features == 48 and net.attn.to_out.in_features == 16


def test_callback_refuses_an_unknown_layout_at_setup_before_the_first_step(tmp_path):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            raise AssertionError("training must not start")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(4, 5, 16), batch_size=2)

    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[StructuredPruning(amount=0.5, verbose=0)])
    with pytest.raises(StructuredPruningError, match=r"net\.attn"):
        trainer.fit(Module())
    assert trainer.global_step == 0


@pytest.mark.parametrize("arch", ["bert", "timm"])
def test_prune_heads_true_and_false_through_a_checkpoint(tmp_path, arch):
    """The callback with ``prune_heads=True`` and ``False``: different head counts and shapes, and each checkpoint
    rebuilt by ``load_checkpoint`` into a fresh model computes what the trained model computed."""
    import lightning_accel
    from tests.helpers.real import RealClassifier

    got = {}
    for prune_heads in (True, False):
        model = RealClassifier(arch)
        prune = StructuredPruning(amount=0.5, schedule="one_shot", interval="step", start=1, end=1, prune_heads=prune_heads, verbose=0)
        trainer = tiny_trainer(tmp_path / str(prune_heads), max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[prune])
        trainer.fit(model)
        path = tmp_path / f"{prune_heads}.ckpt"
        trainer.save_checkpoint(path)
        x = model.sample()
        loaded = lightning_accel.load_checkpoint(RealClassifier, str(path))
        with torch.no_grad():
            torch.testing.assert_close(loaded(**x), model.eval()(**x))
        attn = _attention(loaded, arch)
        got[prune_heads] = ([_head_attrs(a) for _, a in attn], [tuple(_query(a).weight.shape) for _, a in attn])
    assert got[True][0] == [(2, 8, 16)] * 2 and got[False][0] == [(4, 4, 16)] * 2
    assert got[True] != got[False]
