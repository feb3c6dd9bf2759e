"""Every shim over another library's internal still finds that internal (fails loudly on an upgrade that moved it)."""

from __future__ import annotations

import importlib.metadata

import pytest

from lightning_accel._compat import SHIMS


@pytest.mark.parametrize("name", sorted(SHIMS))
def test_shimmed_internal_is_where_it_was_verified(name):
    library, verified, check = SHIMS[name]
    installed = importlib.metadata.version(library.replace("_", "-"))
    try:
        check()
    except (AssertionError, AttributeError, ImportError, KeyError, TypeError) as err:
        pytest.fail(f"{name} of {library} {installed} (verified on {verified}) moved: {err!r}; update lightning_accel/_compat.py")
