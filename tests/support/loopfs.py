"""Real XFS (reflink) and btrfs file systems on loop devices, made and removed by tests.

``LoopFs(kind, root)`` makes a sparse image under ``root``, formats it
(``mkfs.xfs -m reflink=1`` or ``mkfs.btrfs``), mounts it with ``mount -o
loop`` (and ``options``, e.g. ``compress=zstd``) and ``close()`` unmounts it (the loop device goes with it) and deletes
the image.  ``loopfs_or_skip`` skips, saying what is missing, where the tool,
root or loop devices are not there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
        "btrfs": ["mkfs.btrfs", "-q", "-f"]}
PACKAGE = {"xfs": "xfsprogs", "btrfs": "btrfs-progs"}


class LoopFs:
    def __init__(self, kind: str, root: str, size: int = 512 << 20, options: str = ""):
        self.kind = kind
        tag = kind + ("-" + options.replace("=", "-").replace(",", "-") if options else "")
        self.image = os.path.join(root, f"{tag}.img")
        self.mount = os.path.join(root, f"{tag}-mnt")
        os.makedirs(self.mount, exist_ok=True)
        with open(self.image, "wb") as fh:
            fh.truncate(size)
        try:
            subprocess.run([*MKFS[kind], self.image], check=True, capture_output=True)
            subprocess.run(["mount", "-o", ",".join(["loop", *filter(None, [options])]),
                            self.image, self.mount], check=True, capture_output=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        # A process that still holds a file there (a daemon stopping) makes it busy for a
        # moment; in the end a lazy unmount, so no mount outlives the tests.
        for _ in range(20):
            if subprocess.run(["umount", self.mount], check=False,
                              capture_output=True).returncode == 0 or not os.path.ismount(
                                  self.mount):
                break
            time.sleep(0.25)
        else:
            subprocess.run(["umount", "-l", self.mount], check=False, capture_output=True)
        try:
            os.rmdir(self.mount)
        except OSError:
            pass
        if os.path.exists(self.image):
            os.unlink(self.image)


def loopfs_or_skip(kind: str, root: str, size: int = 512 << 20, options: str = "") -> LoopFs:
    if shutil.which(MKFS[kind][0]) is None:
        pytest.skip(f"{MKFS[kind][0]} is not installed (scripts/install-deps installs "
                    f"{PACKAGE[kind]})")
    if os.geteuid() != 0:
        pytest.skip(f"making a {kind} file system on a loop device needs root")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices here (/dev/loop-control is missing)")
    try:
        return LoopFs(kind, root, size, options)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make and mount a {kind} image on a loop device: "
                    f"{(exc.stderr or b'').decode(errors='replace').strip() or exc}")
