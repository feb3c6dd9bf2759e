from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN, load_digits_tensors
from tests.helpers import KillAtStep, run_python, tiny_trainer


def test_digits_are_real_and_split_is_fixed():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() >= 0.0 and x.max() <= 1.0 and set(y.tolist()) == set(range(10))
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=0)
    a.setup(), b.setup()
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    sizes = (len(a.train_set), len(a.val_set), len(a.test_set))
    assert sum(sizes) == 1797 and sizes[2] == round(1797 * 0.2)
    c = DigitsDataModule(seed=1)
    c.setup()
    assert not torch.equal(a.test_set.tensors[1], c.test_set.tensors[1])
    few = DigitsDataModule(classes=[0, 1, 2, 3, 4])
    few.setup()
    assert set(few.train_set.tensors[1].tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "`batch_size` must be an integer >= 1; got 0"),
        (dict(val_fraction=0.6, test_fraction=0.5), "`val_fraction` \\+ `test_fraction` must be < 1"),
        (dict(classes=[3, 11]), "`classes` must be None or a non-empty list of digits"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ResidualCNN(width=0), "`width`"),
        (lambda: DigitsTransformer(dim=30, heads=4), "divisible"),
        (lambda: DigitsTransformer(patch_size=3), "`patch_size` must be one of"),
        (lambda: ResidualCNN(optimizer="lamb"), "`optimizer` must be one of 'adamw', 'adam', 'sgd'"),
    ],
)
def test_models_reject_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", [lambda: ResidualCNN(width=8, depth=1), lambda: DigitsTransformer(dim=16, heads=2, patch_size=2)])
def test_models_forward_and_fit(tmp_path, make):
    model = make()
    assert model(model.example_input_array).shape == (2, 10)
    trainer = tiny_trainer(tmp_path, fast_dev_run=2)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    trainer.test(model, DigitsDataModule(batch_size=32), verbose=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, epochs",
    [(lambda: ResidualCNN(), 15), (lambda: DigitsTransformer(), 40)],
    ids=["cnn", "transformer"],
)
def test_models_reach_95_percent(tmp_path, make, epochs):
    pl.seed_everything(0)
    model = make()
    dm = DigitsDataModule()
    trainer = tiny_trainer(tmp_path, max_epochs=epochs)
    trainer.fit(model, dm)
    acc = trainer.test(model, dm, verbose=False)[0]["test_acc"]
    assert acc >= 0.95, acc


def test_kill_and_resume_harness_matches_uninterrupted(tmp_path):
    """The subprocess helpers really interrupt a fit (killed at the start of epoch 2), and the demo data
    plus plain Lightning resume it exactly from the epoch-end checkpoint."""
    script = """
        import sys, torch, lightning.pytorch as pl
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning_accel.demos import ResidualCNN, DigitsDataModule
        from tests.helpers import KillAtStep
        mode, out = sys.argv[1], sys.argv[2]
        pl.seed_everything(0)
        ckpt = ModelCheckpoint(dirpath="ckpts", every_n_epochs=1, save_top_k=-1)
        cbs = [ckpt] + ([KillAtStep(3)] if mode == "kill" else [])
        trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, deterministic=True, callbacks=cbs, limit_val_batches=0)
        model = ResidualCNN(width=8, depth=1)
        trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path="ckpts/epoch=0-step=3.ckpt" if mode == "resume" else None)
        torch.save(model.state_dict(), out)
    """
    run_python(script, tmp_path, "kill", "k.pt", expect=17)
    assert (tmp_path / "ckpts" / "epoch=0-step=3.ckpt").exists()
    assert not (tmp_path / "k.pt").exists()
    run_python(script, tmp_path, "resume", "resumed.pt")
    run_python(script, tmp_path, "full", "full.pt")
    resumed, full = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt")
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    assert KillAtStep(1).step == 1
