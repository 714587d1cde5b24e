"""The daemon's allocator tuning takes effect on glibc (mallopt accepts both thresholds)."""

import platform
import subprocess
import sys

import pytest

from tests.support.procenv import child_env


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_keep_freed_buffers_is_accepted_by_glibc():
    # In a child, so this test process keeps its own allocator settings.
    code = ("from cyclemirror.daemon import memtune; "
            "import sys; sys.exit(0 if memtune.keep_freed_buffers() else 1)")
    assert subprocess.run([sys.executable, "-c", code], env=child_env()).returncode == 0
