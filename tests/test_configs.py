"""Every YAML under examples/configs/ must keep parsing and running through LightningCLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
sys.path.insert(0, str(ROOT / "examples"))

from train import main  # noqa: E402

from tests.helpers.teacher import config_with_teacher  # noqa: E402


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "digits_cnn.yaml", "digits_transformer.yaml", "digits_pipeline.yaml"}


def _cheap(config: Path, tmp_path: Path) -> Path:
    """The config as written, but compiled by the ``eager`` backend, exported without AOTInductor and timed twice: the same
    callbacks and arguments are built and run, without minutes of native code generation in a one-step run."""
    data = yaml.safe_load(config.read_text())
    changed = False
    for cb in (data.get("trainer") or {}).get("callbacks") or []:
        name = str(cb.get("class_path", "")).rsplit(".", 1)[-1]
        extra = {
            "TorchCompile": {"backend": "eager"},
            "AccelerationReport": {"export_compile": False, "repeats": 2, "warmup": 1},
            "AutoCompress": {"export_format": "onnx", "repeats": 3, "amounts": [0.5, 0.9], "measure_batches": 1},
        }.get(name)
        if extra:
            cb["init_args"] = {**(cb.get("init_args") or {}), **extra}
            changed = True
    if not changed:
        return config
    out = tmp_path / f"cheap_{config.name}"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs(tmp_path, config):
    cli = main(
        [
            "fit",
            "--config",
            str(_cheap(config_with_teacher(config, tmp_path), tmp_path)),  # a named teacher checkpoint is made
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
        ]
    )
    assert cli.trainer.state.finished
    assert cli.trainer.global_step >= 1
