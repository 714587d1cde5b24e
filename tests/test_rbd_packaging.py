"""The Debian package's RBD dependencies: the binding is built, librbd only recommended.

Proves: installed without its recommends (librbd1, librados2), the built
binding cannot load, and ``serve --rbd-pool`` says which packages to
install, quoting the dynamic loader.  The missing library is real: a copy of
the compiled module whose ``NEEDED`` entry names a library that does not
exist, loaded in a child process in place of the installed one.
"""

from __future__ import annotations

import os

import pytest

from tests.support.daemons import make_key


def _binding_or_skip():
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")


def test_a_binding_whose_librbd_is_missing_names_the_runtime_packages(tmp_path):
    """The Debian package only recommends librbd1: installed without it, the built
    binding cannot load, and ``serve --rbd-pool`` says what to install."""
    import subprocess
    import sys

    _binding_or_skip()
    from cyclemirror._cext import rbd
    from tests.support.procenv import child_env

    binary = open(rbd.__file__, "rb").read()
    assert b"librbd.so.1" in binary
    broken = tmp_path / os.path.basename(rbd.__file__)
    broken.write_bytes(binary.replace(b"librbd.so.1", b"librbX.so.1"))  # as if uninstalled
    code = (
        "import importlib.machinery, importlib.util, sys\n"
        "class Finder:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name != 'cyclemirror._cext.rbd':\n"
        "            return None\n"
        "        loader = importlib.machinery.ExtensionFileLoader(name, sys.argv[1])\n"
        "        return importlib.util.spec_from_file_location(name, sys.argv[1], loader=loader)\n"
        "sys.meta_path.insert(0, Finder())\n"
        "from cyclemirror.cli import main\n"
        "sys.exit(main(sys.argv[2:]))\n")
    key = make_key(tmp_path / "key")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(broken), "--store", str(tmp_path / "store"), "serve",
         "--listen", "127.0.0.1:0", "--key-file", key, "--rbd-pool", "mirrors"],
        capture_output=True, text=True, timeout=60, env=child_env())
    assert proc.returncode != 0
    assert "librbX.so.1" in proc.stderr, proc.stderr  # the loader's own words
    assert "apt-get install librbd1 librados2" in proc.stderr, proc.stderr
