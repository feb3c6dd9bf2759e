"""scikit-learn's handwritten digits as a LightningDataModule (bundled with scikit-learn: no download)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_accel._validate import check_int, check_number

__all__ = ["DigitsDataModule", "EpochSeededSampler", "load_digits_tensors"]


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a permutation that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at every epoch start, so a run resumed from an epoch-end checkpoint sees
    exactly the batches an uninterrupted run sees (a plain ``shuffle=True`` draws from the global RNG,
    whose state a checkpoint does not hold).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def load_digits_tensors(classes: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(images [N, 1, 8, 8] in [0, 1], labels [N])``, optionally only ``classes``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits demo needs scikit-learn: pip install 'lightning-accel[examples]'"
        ) from err
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    if classes is not None:
        keep = torch.isin(y, torch.tensor(list(classes)))
        x, y = x[keep], y[keep]
    return x, y


class DigitsDataModule(pl.LightningDataModule):
    """Handwritten digits with a fixed, seeded train/val/test split.

    Args:
        batch_size: training and evaluation batch size, e.g. ``64``.
        num_workers: DataLoader workers, e.g. ``0`` (the data is in memory).
        val_fraction: fraction of the data held out for validation, e.g. ``0.1``.
        test_fraction: fraction held out for testing, e.g. ``0.2``.
        seed: seed of the split (independent of the training seed), e.g. ``0``.
        classes: keep only these digits, e.g. ``[0, 1, 2, 3, 4]`` (``None``: all ten). Labels keep their values.
        drop_last: drop the last incomplete training batch (constant shapes help ``torch.compile``).

    The training order depends only on ``seed`` and the epoch (:class:`EpochSeededSampler`), so a run
    resumed from an epoch-end checkpoint trains on the same batches as an uninterrupted one. Under DDP,
    Lightning replaces the sampler by a ``DistributedSampler``.

    Raises:
        ValueError: a bad argument.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        classes: list[int] | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, low=1)
        check_int("num_workers", num_workers, low=0)
        check_number("val_fraction", val_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_number("test_fraction", test_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must be < 1; got {val_fraction} + {test_fraction}"
            )
        if classes is not None and (not classes or any(not isinstance(c, int) or not 0 <= c <= 9 for c in classes)):
            raise ValueError(f"`classes` must be None or a non-empty list of digits 0-9; got {classes!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.classes = classes
        self.drop_last = drop_last
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.classes)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_test = round(len(y) * self.test_fraction)
        n_val = round(len(y) * self.val_fraction)
        test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])

    def _loader(self, ds: TensorDataset | None, shuffle: bool, drop_last: bool = False) -> DataLoader:
        assert ds is not None, "call setup() first"
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(ds), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
