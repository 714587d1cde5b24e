"""A target whose disk fills up mid-cycle: a clear, temporary error, then a resume.

The target's store lives on a real, small tmpfs mounted by the test, so the
ENOSPC comes from the kernel.  The source must show an error that names the
mirror and says what to do, keep retrying (not give up), and, once the file
system is grown, finish the cycle with an image equal to the frozen volume.
Needs root (mount); skips with a message otherwise.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from cyclemirror import keys
from cyclemirror.receiver import TargetServer
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from tests.support.mirror import same_file, wait_for

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs for a real ENOSPC")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); no real ENOSPC to test")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_target_disk_is_a_temporary_error_and_the_cycle_finishes_after_growth(
        tmp_path, small_fs):
    key = keys.generate_key()
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 16 * MiB)
    vol.write(0, os.urandom(12 * MiB))  # incompressible: 12 MiB cannot fit in 6
    exports = {}

    def on_frozen(frozen, reader):
        path = str(tmp_path / f"export-{frozen.number}.img")
        if not os.path.exists(path):
            reader.export_to(path)
        exports[frozen.number] = path

    t_store = Store.create(str(small_fs / "t"))
    server = TargetServer(t_store, key, ("127.0.0.1", 0))
    server.start()
    d = MirrorDriver(vol, server.address, key,
                     MirrorOptions(on_frozen=on_frozen, retry_initial=0.05, retry_max=0.3,
                                   interval=3600), store=src)
    try:
        d.start()

        def target_status():
            (row,) = d.status()["targets"].values()
            return row

        wait_for(lambda: "disk is full" in (target_status()["last_error"] or ""), 60,
                 "the target's disk-full error to reach the source")
        row = target_status()
        assert row["phase"] != "broken", row  # temporary: the driver keeps retrying
        assert "mirror 'v'" in row["last_error"] and "free space" in row["last_error"]
        assert any("disk is full" in e for e in server.errors)
        # The operator grows the file system; the source's next retry goes through.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
        c = d.sync(60)
        image = os.path.join(t_store.path, "mirrors", src.node_id, "v.img")
        assert same_file(image, exports[c])
    finally:
        d.stop()
        server.stop()
        t_store.close()
        src.close()
