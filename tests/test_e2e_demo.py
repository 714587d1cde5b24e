"""``cyclemirror demo`` as a newcomer runs it, and its byte-for-byte check."""

import glob
import os
import tempfile

from cyclemirror.demo import _files_equal
from tests.support.daemons import run_cli


def test_demo_mirrors_verifies_and_cleans_up():
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "cm-demo-*")))
    proc = run_cli("demo", "--seconds", "2", timeout=60)
    out = proc.stdout
    assert "verified           mirror image == source volume, 64.0 MiB byte for byte" in out
    assert ("read-only export   mirror/demo-source/demo on the target reads the same; "
            "writes get EPERM") in out
    for line in ("cycles applied", "bytes shipped", "RPO age", "last cycle"):
        assert line in out
    assert "$ cyclemirror --store source mirror start demo" in out
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "cm-demo-*"))) == before


def test_the_demo_comparison_finds_the_first_differing_byte(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    data = os.urandom(9 << 20)
    a.write_bytes(data)
    b.write_bytes(data)
    assert _files_equal(str(a), str(b)) == (True, None)
    changed = bytearray(data)
    changed[(4 << 20) + 123] ^= 1
    b.write_bytes(bytes(changed))
    assert _files_equal(str(a), str(b)) == (False, (4 << 20) + 123)
    b.write_bytes(data[:-1])
    assert _files_equal(str(a), str(b)) == (False, len(data) - 1)
