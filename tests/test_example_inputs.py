"""Example inputs without user code: the first real forward call is recorded (keyword and dict inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_accel import StructuredPruning
from lightning_accel._inputs import ForwardRecorder, first_sample
from tests.helpers import TinyMLP, tiny_trainer


class _DictMLP(TinyMLP):
    """Batches are dicts and ``forward`` takes keywords, as Hugging Face modules do; no example_input_array."""

    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = None

    def forward(self, features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        return super().forward(features * scale)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(features=batch["features"]), batch["label"])

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        rows = [{"features": torch.randn(16, generator=g), "label": int(torch.randint(0, 4, (1,), generator=g))} for _ in range(64)]
        return DataLoader(rows, batch_size=16)


def test_recorder_binds_positional_and_keyword_arguments_and_removes_itself():
    model = _DictMLP()
    rec = ForwardRecorder()
    rec.attach(model)
    model(torch.randn(4, 16), scale=2.0)
    assert set(rec.example) == {"features", "scale"} and rec.example["features"].shape == (1, 16)
    assert not model._forward_pre_hooks
    assert first_sample((torch.zeros(3, 2), {"a": torch.ones(5)}))[1]["a"].shape == (1,)


def test_recorder_flattens_a_forward_that_takes_keyword_arguments_as_kwargs():
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
            return self.fc(inputs["features"] * inputs["scale"])

    model, rec = Model(), ForwardRecorder()
    rec.attach(model)
    model(features=torch.randn(4, 16), scale=torch.ones(4, 1))
    assert set(rec.example) == {"features", "scale"}
    assert model(**rec.example).shape == (1, 4)


def test_structured_pruning_traces_a_module_with_dict_batches_and_keyword_forward(tmp_path):
    model = _DictMLP()
    cb = StructuredPruning(amount=0.5, interval="step", start=1, end=2, verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[cb])
    trainer.fit(model)
    assert model.fc1.out_features == 16 and model.fc2.out_features == 16
    assert not model._forward_pre_hooks  # the recording hook is gone
    assert model(features=torch.randn(2, 16)).shape == (2, 4)
