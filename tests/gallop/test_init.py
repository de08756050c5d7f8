"""The package's public names (gallop/__init__.py): one list, loaded lazily, each the object of its module."""

import importlib
import subprocess
import sys

import pytest

import gallop
import gallop_kernels


def test_every_public_name_is_its_modules_object():
    assert set(gallop.__all__) == {*gallop._EXPORTS, "__version__"}
    for name, module in gallop._EXPORTS.items():
        assert getattr(gallop, name) is getattr(importlib.import_module(f"gallop.{module}"), name), name
    assert gallop.__version__ == gallop_kernels.__version__
    assert dir(gallop) == sorted(gallop.__all__)


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no attribute 'SparseTrainer'"):
        gallop.SparseTrainer  # noqa: B018


def test_importing_gallop_loads_neither_torch_nor_transformers():
    code = "import sys, gallop; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
