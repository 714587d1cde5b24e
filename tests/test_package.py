"""The package is built as promised: every compiled module is a real extension.

These fail when a build silently produced pure-Python stand-ins or dropped a
module, which would make every other test measure the wrong thing.
"""

import importlib
import importlib.machinery
import pathlib
import re
import shutil
import subprocess

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


def _documented_sonames() -> set[str]:
    # The table "Shared libraries the compiled modules link" of docs/packaging.md.
    doc = pathlib.Path(__file__).resolve().parent.parent / "docs" / "packaging.md"
    if not doc.is_file():
        pytest.skip("docs/packaging.md is not beside the tests (installed package only)")
    section = doc.read_text().split("## Shared libraries the compiled modules link", 1)[1]
    section = section.split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(lib[\w+-]+\.so\.\d+)` \|", section, re.M))


def test_compiled_modules_link_exactly_the_documented_libraries():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is missing (apt-get install binutils)")
    documented = _documented_sonames()
    assert {"libxxhash.so.0", "liblz4.so.1", "libzstd.so.1"} <= documented
    needed: dict[str, set[str]] = {}
    for name in _cext.REQUIRED:
        path = importlib.import_module(f"cyclemirror._cext.{name}").__file__
        out = subprocess.run([readelf, "-d", path], capture_output=True, text=True,
                             check=True).stdout
        needed[name] = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out))
    linked = set().union(*needed.values())
    assert linked == documented, (
        f"the modules link {sorted(linked)} ({needed}); docs/packaging.md lists "
        f"{sorted(documented)}: update the table and debian/control together")
