"""Every YAML under examples/configs/ must keep parsing and running through LightningCLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
sys.path.insert(0, str(ROOT / "examples"))

from train import main  # noqa: E402

from tests.helpers.teacher import config_with_teacher  # noqa: E402


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "digits_cnn.yaml", "digits_transformer.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs(tmp_path, config):
    cli = main(
        [
            "fit",
            "--config",
            str(config_with_teacher(config, tmp_path)),  # a config naming a teacher checkpoint gets one
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
        ]
    )
    assert cli.trainer.state.finished
    assert cli.trainer.global_step >= 1
