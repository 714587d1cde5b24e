"""A real file system on an export: nbdfuse + mkfs.ext4 + loop mount.

The export is exposed as a file with nbdfuse, formatted, loop-mounted and
filled with files; after unmounting, a fresh nbdfuse (a new NBD connection)
mounts it again and every file is checked, and e2fsck checks the raw image on
the server side.  Skips, saying what is missing, without FUSE, a free loop
device or root.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import time

import pytest

from tests.support.nbd import raw_server, run
from tests.support.tools import require_tool

MiB = 1 << 20


def _require_fuse_and_loop() -> None:
    for tool in ("nbdfuse", "mkfs.ext4", "losetup", "mount", "umount", "e2fsck"):
        require_tool(tool)
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        pytest.skip("fusermount3 is missing (package fuse3): cannot unmount nbdfuse")
    if os.geteuid() != 0:
        pytest.skip("loop-mounting needs root; this test runs as an ordinary user")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        pytest.skip(f"FUSE is not available here: /dev/fuse cannot be opened ({exc.strerror})")
    free = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
    if free.returncode != 0:
        pytest.skip(f"no free loop device (losetup -f: {free.stderr.strip()})")


class Fuse:
    """nbdfuse exposing one export as <dir>/disk, for the duration of a with-block."""

    def __init__(self, mountdir, uri: str):
        self.dir = str(mountdir)
        self.disk = os.path.join(self.dir, "disk")
        self.argv = ["nbdfuse", self.disk, uri]

    def __enter__(self):
        os.makedirs(self.dir, exist_ok=True)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not os.path.exists(self.disk):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                self.__exit__()
                # /dev/fuse opened fine, so this is a failure of ours, not a missing feature
                pytest.fail(f"nbdfuse did not come up: {err.strip()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        umount = shutil.which("fusermount3") or shutil.which("fusermount")
        subprocess.run([umount, "-u", self.dir], capture_output=True)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_ext4_on_nbdfuse_survives_unmount_and_a_fresh_mount(tmp_path):
    _require_fuse_and_loop()
    rnd = random.Random(2)
    files = {f"d{i % 3}/f{i}.bin": rnd.randbytes(rnd.randrange(1, 3 * MiB)) for i in range(12)}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with raw_server(tmp_path, {"vol": (96 * MiB, False)}) as (srv, paths):
        with Fuse(tmp_path / "fuse1", srv.uri("vol")) as fuse:
            run("mkfs.ext4", "-q", "-F", fuse.disk)
            run("mount", "-o", "loop", fuse.disk, str(mnt))
            try:
                for rel, data in files.items():
                    os.makedirs(mnt / os.path.dirname(rel), exist_ok=True)
                    (mnt / rel).write_bytes(data)
                os.sync()
            finally:
                run("umount", str(mnt))
        # a new nbdfuse process: a new NBD connection, nothing cached from the first
        with Fuse(tmp_path / "fuse2", srv.uri("vol")) as fuse:
            run("mount", "-o", "loop,ro", fuse.disk, str(mnt))
            try:
                for rel, data in files.items():
                    assert _digest(str(mnt / rel)) == hashlib.sha256(data).hexdigest(), rel
            finally:
                run("umount", str(mnt))
        # the image on the server side is a clean file system
        run("e2fsck", "-fn", paths["vol"])
