"""A real embedded dataset and two real models, shared by examples, tests and benchmarks
(as ``lightning.pytorch.demos`` is for Lightning).

* :class:`DigitsDataModule`: scikit-learn's bundled handwritten digits (1,797 8x8 images, no download).
* :class:`ResidualCNN`: conv + BatchNorm + residual blocks + linear head.
* :class:`DigitsTransformer`: a Transformer encoder classifier over image patches.
"""

from lightning_accel.demos.data import DigitsDataModule, EpochSeededSampler, load_digits_tensors
from lightning_accel.demos.models import Attention, Block, DigitsClassifier, DigitsTransformer, ResidualCNN

__all__ = [
    "Attention",
    "Block",
    "DigitsClassifier",
    "DigitsDataModule",
    "DigitsTransformer",
    "EpochSeededSampler",
    "ResidualCNN",
    "load_digits_tensors",
]
