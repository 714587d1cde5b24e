"""The export backends on real files and a real store: zeroing, trimming, refusals, checks."""

from __future__ import annotations

import errno
import os

import pytest

from cyclemirror._cext import pagewrite
from cyclemirror.errors import StoreError, UsageError
from cyclemirror.nbd import RawFileBackend, VolumeBackend
from cyclemirror.nbd.backends import as_backend
from cyclemirror.store import Store

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"\xaa" * (4 * MiB))
    return str(path)


def allocated(path):
    return os.stat(path).st_blocks * 512


def test_write_zeroes_punches_unless_no_hole_and_both_read_back_as_zeroes(image):
    b = RawFileBackend(image, readonly=False)
    before = allocated(image)
    assert b.write_zeroes(0, MiB) is True
    assert allocated(image) <= before - MiB  # a hole
    assert b.write_zeroes(2 * MiB, MiB, no_hole=True) is True
    assert allocated(image) <= before - MiB and allocated(image) >= before - MiB - 65536
    assert b.read(0, MiB) == bytes(MiB) and b.read(2 * MiB, MiB) == bytes(MiB)
    assert b.read(MiB, MiB) == b"\xaa" * MiB
    assert b.block_status(0, 4 * MiB)[0] == (MiB, 3)
    b.close()


def test_trim_reads_back_as_zeroes_and_unaligned_edges_are_exact(image):
    b = RawFileBackend(image, readonly=False)
    b.trim(1000, 10_000)
    data = b.read(0, 20_000)
    assert data[:1000] == b"\xaa" * 1000
    assert data[1000:11_000] == bytes(10_000)
    assert data[11_000:] == b"\xaa" * 9000
    b.close()


def test_read_only_raw_backend_refuses_every_change_with_eperm(image):
    b = RawFileBackend(image)
    assert b.readonly and not b.fast_zero
    for call in (lambda: b.write(0, b"x"), lambda: b.trim(0, 4096),
                 lambda: b.write_zeroes(0, 4096)):
        with pytest.raises(PermissionError) as info:
            call()
        assert info.value.errno == errno.EPERM
    b.close()


@pytest.mark.parametrize("offset,length", [(-1, 1), (0, 4 * MiB + 1), (4 * MiB, 1), (1.5, 1)])
def test_raw_backend_checks_ranges(image, offset, length):
    b = RawFileBackend(image, readonly=False)
    with pytest.raises(UsageError):
        b.read(offset, length)
    b.close()


def test_a_truncated_image_is_an_error_not_short_data(image):
    b = RawFileBackend(image)
    os.truncate(image, MiB)
    with pytest.raises(StoreError, match="short read"):
        b.read(2 * MiB, 4096)
    b.close()


def test_fallocate_helpers_report_the_real_errno(image):
    fd = os.open(image, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            pagewrite.punch_hole(fd, 0, 4096)
        assert info.value.errno == errno.EBADF  # not open for writing
        with pytest.raises(OSError) as info:
            pagewrite.zero_range(fd, 0, 4096)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_volume_backend_wraps_a_store_volume(tmp_path):
    with Store.create(str(tmp_path / "s")) as store:
        vol = store.create_volume("v", 4 * MiB)
        wrapped = as_backend(vol)
        assert isinstance(wrapped, VolumeBackend) and wrapped.volume is vol
        assert wrapped.fast_zero and wrapped.can_multi_conn and not wrapped.readonly
        wrapped.write(4096, memoryview(b"\x11" * 8192), True)
        assert wrapped.write_zeroes(8192, 4096, no_hole=True, fast_only=True) is True
        assert vol.read(4096, 8192) == b"\x11" * 4096 + bytes(4096)
        ro = VolumeBackend(vol, readonly=True)
        with pytest.raises(PermissionError):
            ro.write(0, b"x")
        with pytest.raises(PermissionError):
            ro.write_zeroes(0, 4096)
        assert as_backend(ro) is ro
