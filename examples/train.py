"""LightningCLI entry point for the digits examples.

    python examples/train.py fit --config examples/configs/digits_cnn.yaml
    python examples/train.py fit --config examples/configs/demo.yaml --trainer.max_epochs=3

Any LightningModule and callback can be named by ``class_path`` in the YAML; models and data are
chosen by ``class_path`` as well (``lightning_accel.demos`` holds the digits ones).
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_accel.demos  # noqa: F401  (registers the demo classes for short class names)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:] or None)
