"""Shared fixtures for the test suite (helpers live in ``tests.support``).

CYCLEMIRROR_SLOW=1 turns on the long trials (crash loops with many kills,
big volumes); the default run keeps them small so the suite stays fast.
"""

import os
import shutil
import tempfile

import pytest

from tests.support.tools import SLOW


@pytest.fixture
def slow_mode() -> bool:
    return SLOW


@pytest.fixture(scope="session")
def xfs_mount(tmp_path_factory):
    """An XFS file system made with reflink on a loop device, for the whole session."""
    from tests.support.loopfs import loopfs_or_skip

    fs = loopfs_or_skip("xfs", str(tmp_path_factory.mktemp("xfs")))
    yield fs.mount
    fs.close()


@pytest.fixture(scope="session")
def btrfs_mount(tmp_path_factory):
    """A btrfs file system on a loop device, for the whole session."""
    from tests.support.loopfs import loopfs_or_skip

    fs = loopfs_or_skip("btrfs", str(tmp_path_factory.mktemp("btrfs")), 384 << 20)
    yield fs.mount
    fs.close()


@pytest.fixture(scope="session")
def btrfs_zstd_mount(tmp_path_factory):
    """A btrfs file system mounted with compress=zstd (its extents are encoded)."""
    from tests.support.loopfs import loopfs_or_skip

    fs = loopfs_or_skip("btrfs", str(tmp_path_factory.mktemp("btrfs-zstd")), 384 << 20,
                        "compress=zstd")
    yield fs.mount
    fs.close()


@pytest.fixture(scope="session")
def ceph_cluster():
    """A one-node Ceph cluster (tests/support/ceph.py), started once per session on first use.

    Skips where the Ceph daemons are not installed; torn down at the session's end,
    whatever the tests did.
    """
    from tests.support import ceph

    missing = ceph.missing_binaries()
    if missing:
        pytest.skip(f"Ceph is not installed (missing {', '.join(missing)}); "
                    f"scripts/install-deps installs {ceph.PACKAGES}")
    directory = tempfile.mkdtemp(prefix="cyclemirror-ceph-")
    cluster = ceph.CephCluster(directory)
    try:
        cluster.start()
    except Exception as exc:  # noqa: BLE001 - a cluster that cannot start is reported
        pytest.fail(f"the test Ceph cluster did not start: {exc} (its files stay in "
                    f"{directory})")
    try:
        yield cluster
    finally:
        cluster.stop()
        if not os.environ.get("CYCLEMIRROR_KEEP_CEPH"):
            shutil.rmtree(directory, ignore_errors=True)
