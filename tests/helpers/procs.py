"""Run training in a child process: real interruptions (the process dies mid-fit) and DDP launches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[2]


class KillAtStep(pl.Callback):
    """Kill the process, without any clean-up, when a batch starts with ``global_step >= step``.

    Killing at the *start* of the next batch lets a ``ModelCheckpoint(every_n_train_steps=...)`` write the
    checkpoint of ``step`` first (Lightning runs checkpoint callbacks last in every hook). Exit code 17.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step >= self.step:
            sys.stdout.flush()
            os._exit(17)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("PYTHONHASHSEED", "0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_script(path: Path, *args: str, timeout: float = 600, expect: int | None = 0) -> subprocess.CompletedProcess:
    """Run a Python file in a fresh interpreter; check the exit code (``None``: any)."""
    proc = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=path.parent
    )
    if expect is not None and proc.returncode != expect:
        raise AssertionError(
            f"{path.name} exited {proc.returncode}, expected {expect}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


# Destroy a process group the script leaves behind before the interpreter's static destructors run: gloo's threads
# are otherwise torn down while joinable, and the process aborts ("terminate called without an active exception",
# exit -6) after the script has finished its work.
_PRELUDE = (
    "import atexit as _atexit\n"
    "def _destroy_process_group():\n"
    "    import torch.distributed as dist\n"
    "    if dist.is_available() and dist.is_initialized():\n"
    "        dist.destroy_process_group()\n"
    "_atexit.register(_destroy_process_group)\n"
)


def run_python(code: str, tmp_path: Path, *args: str, name: str = "script.py", **kwargs: Any) -> subprocess.CompletedProcess:
    """Write ``code`` (dedented) to ``tmp_path/name`` and run it (see :func:`run_script`).

    DDP needs a file: Lightning launches the other ranks by running the same script again.
    """
    path = tmp_path / name
    path.write_text(_PRELUDE + textwrap.dedent(code))
    return run_script(path, *args, **kwargs)
