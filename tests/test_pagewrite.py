"""cext/pagewrite.pyx against a pure-Python reference, and the folio sizes it leaves in the page cache.

The reference writes the same bytes with plain os.pwrite calls cut at the same
boundaries; the files must come out equal. The folio test reads the sizes of a
file's cached page-cache folios from /proc/kpageflags (root only) and checks
that the store's writes never build a folio bigger than WRITE_PIECE, which is
what lets the page hand-over in Volume.write reuse base's freed pages
(docs/store.md, "Merge and the page cache").
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror._cext.pagewrite import pwrite_pieces
from cyclemirror.store import Store
from cyclemirror.store.fileops import WRITE_PIECE

PAGE = mmap.PAGESIZE


def reference_pieces(offset: int, n: int, piece: int) -> list[tuple[int, int]]:
    """(file offset, length) of each pwrite: cut wherever the file offset is a multiple of piece."""
    out, pos = [], offset
    while pos < offset + n:
        end = min(offset + n, (pos // piece + 1) * piece)
        out.append((pos, end - pos))
        pos = end
    return out


def reference_pwrite(fd: int, data: bytes, offset: int, piece: int) -> None:
    for pos, length in reference_pieces(offset, len(data), piece):
        view = memoryview(data)[pos - offset : pos - offset + length]
        while len(view):
            done = os.pwrite(fd, view, pos)
            view, pos = view[done:], pos + done


@settings(max_examples=200, deadline=None)
@given(
    before=st.integers(0, 3 * 4096),
    offset=st.integers(0, 5 * 4096),
    length=st.integers(0, 4 * 4096),
    piece_shift=st.integers(0, 14),
    kind=st.sampled_from(["bytes", "bytearray", "memoryview"]),
    seed=st.binary(min_size=1, max_size=64),
)
def test_writes_the_same_bytes_as_the_reference(tmp_path_factory, before, offset, length,
                                                piece_shift, kind, seed):
    d = tmp_path_factory.mktemp("pw")
    data = (seed * (length // len(seed) + 1))[:length]
    buf = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(bytearray(data))}[kind]
    piece = 1 << piece_shift
    paths = [d / "ours", d / "ref"]
    for p in paths:
        p.write_bytes(b"\xa5" * before)  # a partly filled file: the write may extend it
    fd = os.open(paths[0], os.O_RDWR)
    try:
        pwrite_pieces(fd, buf, offset, piece)
    finally:
        os.close(fd)
    fd = os.open(paths[1], os.O_RDWR)
    try:
        reference_pwrite(fd, data, offset, piece)
    finally:
        os.close(fd)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_reference_cuts_at_multiples_of_the_piece():
    assert reference_pieces(100, 50, 64) == [(100, 28), (128, 22)]
    assert reference_pieces(128, 64, 64) == [(128, 64)]
    assert reference_pieces(0, 0, 64) == []


def test_errors_name_the_cause_and_write_nothing_past_it(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            pwrite_pieces(fd, b"x" * 10, 0, 4096)
        assert info.value.errno == errno.EBADF
        assert "pwrite of 10 bytes at offset 0" in str(info.value)
    finally:
        os.close(fd)
    assert path.read_bytes() == b""
    fd = os.open(path, os.O_RDWR)
    try:
        for piece in (0, -4096, 3, 4097):
            with pytest.raises(ValueError, match="power of two"):
                pwrite_pieces(fd, b"x", 0, piece)
        with pytest.raises(ValueError, match="offset"):
            pwrite_pieces(fd, b"x", -1, 4096)
        with pytest.raises(TypeError):
            pwrite_pieces(fd, "text", 0, 4096)
        pwrite_pieces(fd, b"", 0, 4096)  # nothing to write: no call, no error
    finally:
        os.close(fd)
    assert path.read_bytes() == b""


# -- folio sizes ------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_KPF_COMPOUND_HEAD, _KPF_COMPOUND_TAIL = 1 << 15, 1 << 16


def cached_folios(path) -> list[int]:
    """Sizes, in pages, of the page-cache folios that hold the file's cached pages.

    Maps the file, touches only pages mincore reports cached (so nothing is read
    in), and reads each page's frame flags: a compound head starts a large folio,
    its tails follow it, any other page is a folio of one page.
    """
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        cached = [i for i in range(pages) if vec[i] & 1]
        for i in cached:
            ctypes.string_at(addr + i * PAGE, 1)  # map it: pagemap only knows mapped pages
        folios: list[int] = []
        with open("/proc/self/pagemap", "rb", buffering=0) as pm, \
                open("/proc/kpageflags", "rb", buffering=0) as kf:
            for i in cached:
                pm.seek((addr // PAGE + i) * 8)
                entry = struct.unpack("<Q", pm.read(8))[0]
                assert entry >> 63, f"page {i} of {path} is not mapped"
                kf.seek((entry & ((1 << 55) - 1)) * 8)
                flags = struct.unpack("<Q", kf.read(8))[0]
                if flags & _KPF_COMPOUND_TAIL and folios:
                    folios[-1] += 1
                else:
                    folios.append(1)
        return folios
    finally:
        _libc.munmap(addr, size)


def _max_folio_bytes(path) -> int:
    return max(cached_folios(path), default=0) * PAGE


def require_large_folios(tmp_path) -> None:
    if not os.access("/proc/kpageflags", os.R_OK):
        pytest.skip("reading page-cache folio sizes needs /proc/kpageflags, which only root can read")
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, os.urandom(1 << 20), 0)
    finally:
        os.close(fd)
    if _max_folio_bytes(probe) <= 64 << 10:
        pytest.skip("this kernel and filesystem make no page-cache folio bigger than 64 KiB "
                    "from a 1 MiB write (ext4 has large folios from Linux 6.16), so write "
                    "pieces cannot be told apart here")


@pytest.mark.kernel
def test_the_piece_is_the_folio_size_of_the_kernel_s_own_copies(tmp_path):
    require_large_folios(tmp_path)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(os.urandom(1 << 20))
    fs, fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT)
    try:
        assert os.copy_file_range(fs, fd, 1 << 20, 0, 0) == 1 << 20
    finally:
        os.close(fs)
        os.close(fd)
    assert _max_folio_bytes(dst) == WRITE_PIECE, (
        "copy_file_range (merges, swap fills, imports) fills the page cache in folios of "
        f"{_max_folio_bytes(dst)} bytes here, the store's writes in {WRITE_PIECE}: base's "
        "freed pages would not serve the overlay's new ones")


def test_store_writes_build_no_folio_bigger_than_a_piece(tmp_path):
    require_large_folios(tmp_path)
    MiB = 1 << 20
    store = Store.create(str(tmp_path / "store"))
    try:
        vol = store.create_volume("v", 16 * MiB)
        vol.write(0, os.urandom(4 * MiB))  # whole blocks, first touch: the hot path
        vol.write(4 * MiB, os.urandom(2 * MiB), fua=True)
        vol.write(8 * MiB + 512, os.urandom(2 * MiB))  # unaligned: read-modify-write path
        overlay = os.path.join(vol.dir, "overlay-0.img")
        folios = cached_folios(overlay)
        assert sum(folios) * PAGE >= 8 * MiB, "the writes are not in the page cache"
        assert max(folios) * PAGE <= WRITE_PIECE, sorted(folios)[-5:]
        # A copy merge fills base through copy_file_range, whose pieces are the same size.
        vol.freeze()
        vol.merge_through(0)
        assert _max_folio_bytes(os.path.join(vol.dir, "base.img")) <= WRITE_PIECE
    finally:
        store.close()
