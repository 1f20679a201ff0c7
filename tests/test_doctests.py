"""Every docstring example in the library runs as a test (torchjd style)."""

import doctest
import importlib
import pkgutil

import pytest

import raco_ds


def _modules() -> list[str]:
    names = ["raco_ds"]
    for info in pkgutil.walk_packages(raco_ds.__path__, prefix="raco_ds."):
        names.append(info.name)
    return names


@pytest.mark.parametrize("module_name", _modules())
def test_docstring_examples(module_name):
    try:
        module = importlib.import_module(module_name)
    except ImportError as missing:  # optional backends (megatron-core, flash-attn) may be absent
        pytest.skip(f"{module_name} needs an optional package: {missing}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
