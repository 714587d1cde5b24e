"""Shared fixtures for the test suite (helpers live in ``tests.support``).

CYCLEMIRROR_SLOW=1 turns on the long trials (crash loops with many kills,
big volumes); the default run keeps them small so the suite stays fast.
"""

import os
import shutil
import tempfile
import threading

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


class _CephStart:
    """The session's Ceph cluster, started in a thread as soon as the collected tests show
    that one of them needs it: its ~15 s of start-up (mkfs, daemons, pool, health) overlap
    the tests that run before the first Ceph test instead of adding to the wall time."""

    def __init__(self):
        from tests.support import ceph

        self.dir = tempfile.mkdtemp(prefix="cyclemirror-ceph-")
        self.cluster = ceph.CephCluster(self.dir)
        self.error: BaseException | None = None
        self.owned = False  # the fixture took it over (and stops it)
        self.thread = threading.Thread(target=self._start, name="ceph-start", daemon=True)
        self.thread.start()

    def _start(self):
        try:
            self.cluster.start()
        except BaseException as exc:  # noqa: BLE001 - reported by the fixture
            self.error = exc

    def close(self):
        self.thread.join()
        self.cluster.stop()
        if self.error is None and not os.environ.get("CYCLEMIRROR_KEEP_CEPH"):
            shutil.rmtree(self.dir, ignore_errors=True)


_ceph_start: _CephStart | None = None


def pytest_collection_finish(session):
    global _ceph_start
    from tests.support import ceph

    if session.config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under xdist a worker starts it at first use: only those given Ceph tests
    if _ceph_start is None and not ceph.missing_binaries() and any(
            "ceph_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        _ceph_start = _CephStart()


def pytest_sessionfinish(session):
    if _ceph_start is not None and not _ceph_start.owned:  # no Ceph test ran after all
        _ceph_start.close()


@pytest.fixture(scope="session")
def ceph_cluster():
    """A one-node Ceph cluster (tests/support/ceph.py), started once per session: in the
    background from the end of collection on (``_CephStart``), else on first use.

    Skips where the Ceph daemons are not installed; torn down at the session's end,
    whatever the tests did.
    """
    global _ceph_start
    from tests.support import ceph

    missing = ceph.missing_binaries()
    if missing:
        pytest.skip(f"Ceph is not installed (missing {', '.join(missing)}); "
                    f"scripts/install-deps installs {ceph.PACKAGES}")
    start = _ceph_start if _ceph_start is not None else _CephStart()
    _ceph_start = start
    start.owned = True
    try:
        start.thread.join()
        if start.error is not None:
            pytest.fail(f"the test Ceph cluster did not start: {start.error} (its files stay "
                        f"in {start.dir})")
        yield start.cluster
    finally:
        start.close()


@pytest.fixture(scope="module")
def rbd_io(ceph_cluster):
    """An I/O context on the test cluster's pool through our librbd binding, per module;
    skips where the binding is not built."""
    try:
        from cyclemirror._cext import rbd
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")
    cluster = rbd.Cluster(ceph_cluster.conf, ceph_cluster.client, ceph_cluster.keyring)
    cluster.connect()
    io = cluster.ioctx(ceph_cluster.pool)
    yield io
    io.close()
    cluster.shutdown()
