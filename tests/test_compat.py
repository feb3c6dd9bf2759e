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


def test_bitsandbytes_is_imported_without_reaching_for_hub_kernels():
    """With a `kernels` package installed (transformers pulls it in), bitsandbytes 0.50 would call
    `kernels.get_kernel` at import and fetch CPU kernels from a model hub; our import keeps it offline."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, types
        calls = []
        fake = types.ModuleType("kernels")
        fake.get_kernel = lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(RuntimeError("network"))
        sys.modules["kernels"] = fake
        from lightning_accel.quantization.bnb import require_bitsandbytes
        require_bitsandbytes()
        import bitsandbytes.backends.cpu.ops  # noqa: F401
        assert calls == [], calls
        assert sys.modules["kernels"] is fake  # the user's own `kernels` stays importable
        print("offline")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "offline" in out.stdout, out.stderr[-2000:]
