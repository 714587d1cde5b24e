"""The package is built as promised, and loads its heavy parts only where they are used.

The first tests fail when a build silently produced pure-Python stand-ins or
dropped a module, which would make every other test measure the wrong thing;
a partial build must be refused at the first use of any compiled module.  The
last ones check that the command line's thin-client verbs never import numpy,
the compiled modules or the daemon's machinery.
"""

import importlib
import importlib.machinery
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import cyclemirror
from cyclemirror import _cext
from tests.support.daemons import DaemonPool
from tests.support.procenv import child_env


@pytest.mark.parametrize("name", _cext.REQUIRED)
def test_every_required_module_is_a_compiled_extension(name):
    module = importlib.import_module(f"cyclemirror._cext.{name}")
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module.__file__


def test_required_list_names_every_compiled_source():
    # Each cext/NAME.pyx in the source tree must be in REQUIRED, so a module
    # that failed to build cannot go unnoticed at import time, or in OPTIONAL
    # (built where its library is; its users say what to install without it).
    import pathlib

    cext_dir = pathlib.Path(__file__).resolve().parent.parent / "cext"
    if not cext_dir.is_dir():
        pytest.skip("cext/ sources are not beside the tests (installed package only)")
    sources = {p.stem for p in cext_dir.glob("*.pyx")}
    assert sources == set(_cext.REQUIRED) | set(_cext.OPTIONAL)
    assert not set(_cext.REQUIRED) & set(_cext.OPTIONAL)


def test_package_reports_its_version():
    assert cyclemirror.__version__.count(".") == 2


# -- what the command line's thin-client verbs import -------------------------------------
#
# The verbs that only talk JSON to the daemon start in tens of milliseconds only
# if they never load numpy or the compiled modules (the issue: `status --json`
# took 0.2 s, 0.09 s of it numpy, and monitoring scripts call it every few
# seconds).  These check the property, not a time: a fresh interpreter runs the
# real CLI code path and reports what ended up in sys.modules.

PROBE = """
import contextlib, io, json, sys
import cyclemirror.cli
argv = json.loads(sys.argv[1])
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        code = cyclemirror.cli.main(argv)
except SystemExit as exc:  # --help
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "lz4", "zstandard", "xxhash")
               or m.startswith(tuple("cyclemirror." + p for p in
                               ("_cext", "store", "sender", "receiver", "nbd", "wire"))))
print(json.dumps({"code": code, "out": out.getvalue(), "heavy": heavy}))
"""


def _probe(argv):
    """Run cyclemirror.cli.main(argv) in a fresh interpreter: exit code, stdout, heavy modules."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True,
                          text=True, timeout=60, env=child_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with DaemonPool(tmp_path_factory.mktemp("thin")) as pool:
        d = pool.start("src")
        d.cli("volume", "create", "v1", "--size", "1M")
        yield d


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["mirror", "start", "--help"]],
                         ids=" ".join)
def test_help_imports_neither_numpy_nor_compiled_modules(argv):
    result = _probe(argv)
    assert result["code"] == 0 and result["out"].startswith("usage: cyclemirror")
    assert result["heavy"] == []


@pytest.mark.parametrize("argv", [["status", "--json"], ["status"], ["volume", "list", "--json"],
                                  ["status", "--json", "--watch", "--count", "2", "--every",
                                   "0.01"]],
                         ids=" ".join)
def test_status_and_list_against_a_daemon_import_neither_numpy_nor_compiled_modules(daemon, argv):
    result = _probe(["--store", daemon.store, *argv])
    assert result["code"] == 0, result
    assert "v1" in result["out"]  # the daemon really answered
    assert result["heavy"] == []


def test_a_partial_build_is_refused_at_the_first_use_of_a_compiled_module(tmp_path):
    # A copy of the package without one compiled module: the thin client still
    # starts (it needs none), but the first import of any compiled module names
    # the missing one and says how to rebuild, instead of running half-built.
    src = os.path.dirname(os.path.abspath(cyclemirror.__file__))
    copy = tmp_path / "cyclemirror"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    missing = [p for p in (copy / "_cext").iterdir() if p.name.startswith("pagewrite.")
               and p.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))]
    assert missing, "no compiled pagewrite module beside the package to take away"
    for p in missing:
        p.unlink()
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join((str(tmp_path), env["PYTHONPATH"]))

    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, env=env)

    thin = run("import cyclemirror, cyclemirror.cli; print(cyclemirror.__file__)")
    assert thin.returncode == 0, thin.stderr
    assert thin.stdout.strip() == str(copy / "__init__.py")  # the copy, not the real build
    # bitmap itself is present: the check covers the whole set, not just the module asked for.
    for code in ("from cyclemirror._cext import bitmap", "import cyclemirror.store"):
        proc = run(code)
        assert proc.returncode != 0, f"{code!r} ran on a partial build"
        assert "cyclemirror._cext.pagewrite is missing or broken" in proc.stderr, proc.stderr
        assert "pip install ." in proc.stderr


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
