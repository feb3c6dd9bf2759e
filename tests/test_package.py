from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lightning_accel


def test_version_and_py_typed():
    assert isinstance(lightning_accel.__version__, str) and lightning_accel.__version__.count(".") == 2
    assert (Path(lightning_accel.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("name", [n for n in lightning_accel.__all__ if n != "__version__"])
def test_every_public_name_resolves(name):
    obj = getattr(lightning_accel, name)
    assert obj is not None
    assert name in dir(lightning_accel)


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lightning_accel.Nope  # noqa: B018


def test_import_is_lazy():
    code = (
        "import sys, lightning_accel as m; assert 'lightning_accel._lifecycle' not in sys.modules; "
        "m.AccelCallback; assert 'lightning_accel._lifecycle' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
