"""The package is built as promised: every compiled module is a real extension.

These fail when a build silently produced pure-Python stand-ins or dropped a
module, which would make every other test measure the wrong thing.
"""

import importlib
import importlib.machinery

import pytest

import cyclemirror
from cyclemirror import _cext


@pytest.mark.parametrize("name", _cext.REQUIRED)
def test_every_required_module_is_a_compiled_extension(name):
    module = importlib.import_module(f"cyclemirror._cext.{name}")
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module.__file__


def test_required_list_names_every_compiled_source():
    # Each cext/NAME.pyx in the source tree must be in REQUIRED, so a module
    # that failed to build cannot go unnoticed at import time.
    import pathlib

    cext_dir = pathlib.Path(__file__).resolve().parent.parent / "cext"
    if not cext_dir.is_dir():
        pytest.skip("cext/ sources are not beside the tests (installed package only)")
    sources = {p.stem for p in cext_dir.glob("*.pyx")}
    assert sources == set(_cext.REQUIRED)


def test_package_reports_its_version():
    assert cyclemirror.__version__.count(".") == 2
