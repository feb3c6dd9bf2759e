"""Shared test helpers: tiny models and data, subprocess runners for real interruptions and DDP."""

from tests.helpers.procs import KillAtStep, run_python, run_script
from tests.helpers.tiny import RandomDataModule, TinyConvNet, TinyMLP, TorchEncoder, tiny_trainer

__all__ = ["KillAtStep", "RandomDataModule", "TinyConvNet", "TinyMLP", "TorchEncoder", "run_python", "run_script", "tiny_trainer"]
