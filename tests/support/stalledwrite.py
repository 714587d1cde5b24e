"""A write(2) held inside the kernel: after it set the file's times, before its bytes.

``StalledWrite(fd, offset, data)`` starts ``pwrite(fd, buf, offset)`` in a thread
where ``buf`` is one anonymous page registered with userfaultfd and left
missing.  The kernel sets the file's mtime and ctime when the write begins, then
copies from ``buf``, faults, and waits for us; ``start()`` returns once the
page-fault event arrived (a point in the write, not a moment: nothing is timed).
Whatever the test does then (a snapshot, say) happens between the write's time
update and its bytes.  ``release()`` fills the page with ``data`` (UFFDIO_COPY)
and waits for the write to finish; ``close()`` gives the page up if a test failed
before that (closing the userfaultfd lets the write go on with a zero page).

``missing()`` says why this cannot run here (an architecture whose syscall
number is not known here, a kernel without userfaultfd or one that refuses it to
us), or None.  Root may catch kernel-mode faults, which this needs (a write's
copy from user memory is one), so ``UFFD_USER_MODE_ONLY`` is not asked for.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import select
import struct
import threading

PAGE = mmap.PAGESIZE
_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F        # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00   # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_COPY = 0xC028AA03       # _IOWR(0xAA, 0x03, struct uffdio_copy)
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
MSG_SIZE = 32                  # sizeof(struct uffd_msg)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _userfaultfd() -> int:
    nr = _NR_USERFAULTFD.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"no userfaultfd syscall number for {platform.machine()}")
    fd = _libc.syscall(nr, os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"userfaultfd: {os.strerror(e)}")
    try:
        fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("QQQ", UFFD_API, 0, 0)))
    except OSError:
        os.close(fd)
        raise
    return fd


def missing() -> str | None:
    """Why a write cannot be stalled here, or None."""
    try:
        os.close(_userfaultfd())
    except OSError as exc:
        return (f"userfaultfd is not available ({exc.strerror}; it needs Linux 4.3+, root "
                "or vm.unprivileged_userfaultfd=1, and no seccomp filter refusing it)")
    return None


class StalledWrite:
    def __init__(self, fd: int, offset: int, data: bytes):
        if len(data) != PAGE:
            raise ValueError(f"a stalled write is one page ({PAGE} bytes), got {len(data)}")
        self.fd, self.offset, self.data = fd, offset, data
        self.written: int | None = None
        self.error: BaseException | None = None
        self._uffd = -1
        self._map: mmap.mmap | None = None
        self._addr = 0
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 60) -> StalledWrite:
        """Start the write; return once it waits for its source page inside the kernel."""
        self._uffd = _userfaultfd()
        self._map = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        fcntl.ioctl(self._uffd, UFFDIO_REGISTER, bytearray(
            struct.pack("QQQQ", self._addr, PAGE, UFFDIO_REGISTER_MODE_MISSING, 0)))
        self._thread = threading.Thread(target=self._write, name="stalled-write", daemon=True)
        self._thread.start()
        ready, _, _ = select.select([self._uffd], [], [], timeout)
        if not ready:
            raise AssertionError(f"the write at {self.offset} never faulted on its source "
                                 f"page in {timeout}s (error: {self.error!r}, wrote "
                                 f"{self.written})")
        msg = os.read(self._uffd, MSG_SIZE)
        event, address = msg[0], struct.unpack_from("Q", msg, 16)[0]
        if event != UFFD_EVENT_PAGEFAULT or address & ~(PAGE - 1) != self._addr:
            raise AssertionError(f"userfaultfd: event {event:#x} at {address:#x}, expected "
                                 f"a page fault at {self._addr:#x}")
        return self

    def _write(self) -> None:
        try:
            self.written = os.pwrite(self.fd, memoryview(self._map), self.offset)
        except BaseException as exc:  # noqa: BLE001 - reported by release()
            self.error = exc

    def release(self, timeout: float = 60) -> int:
        """Give the write its bytes; wait for it; return what it wrote."""
        src = ctypes.create_string_buffer(self.data, PAGE)
        fcntl.ioctl(self._uffd, UFFDIO_COPY, bytearray(
            struct.pack("QQQQq", self._addr, ctypes.addressof(src), PAGE, 0, 0)))
        self._thread.join(timeout)
        if self._thread.is_alive() or self.error is not None or self.written != PAGE:
            raise AssertionError(f"the released write at {self.offset} did not finish: "
                                 f"wrote {self.written}, error {self.error!r}")
        return self.written

    def close(self) -> None:
        if self._uffd >= 0:
            os.close(self._uffd)  # a write still waiting goes on (with a zero page)
            self._uffd = -1
        if self._thread is not None:
            self._thread.join(30)
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> StalledWrite:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
