from __future__ import annotations

import torch
from torch import nn

from lightning_accel.checkpoint import _REPLAYS, load_checkpoint, register_replay
from lightning_accel.demos import ResidualCNN


def test_replays_run_in_order_before_weights_load(tmp_path):
    calls = []

    def widen(model, state):
        calls.append(("widen", state["n"]))
        model.head = nn.Linear(model.head.in_features, state["n"])

    def mark(model, state):
        calls.append(("mark", state))

    register_replay("_Widen", 5, widen)
    register_replay("_Mark", 1, mark)
    try:
        src = ResidualCNN(width=4, depth=1)
        src.head = nn.Linear(8, 3)
        ckpt = {
            "state_dict": src.state_dict(),
            "hyper_parameters": {"width": 4, "depth": 1},
            "callbacks": {"_Widen{'n': 3}": {"n": 3}, "_Mark": {"x": 1}, "Unrelated": {}},
        }
        torch.save(ckpt, tmp_path / "c.ckpt")
        model = load_checkpoint(ResidualCNN, tmp_path / "c.ckpt")
        assert calls == [("mark", {"x": 1}), ("widen", 3)]
        assert model.head.out_features == 3 and not model.training
        x = torch.rand(2, 1, 8, 8)
        assert torch.allclose(model(x), src.eval()(x))
    finally:
        _REPLAYS.pop("_Widen"), _REPLAYS.pop("_Mark")
