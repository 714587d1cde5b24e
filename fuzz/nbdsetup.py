"""The exports the NBD harnesses serve: two small raw images in a temp directory.

The directory is on tmpfs (``/dev/shm``) when there is one: a FLUSH or FUA
request fsyncs the image, which on a disk costs milliseconds per input and
made ``nbd_requests`` run at a few hundred inputs a second; on tmpfs the
same fsync call is made and returns at once.
"""

from __future__ import annotations

import atexit
import queue
import shutil
import socket
import tempfile
import threading

from cyclemirror.nbd.backends import RawFileBackend
from fuzz.harness import fast_tmp

_dir = None
SIZE = 1 << 20


def image_dir() -> str:
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="cm-fuzz-nbd-", dir=fast_tmp())
        atexit.register(shutil.rmtree, _dir, True)
        for name in ("v", "ro"):
            with open(f"{_dir}/{name}.img", "wb") as fh:
                fh.truncate(SIZE)
                fh.write(b"data" * 1024)
    return _dir


def lookup(name: str):
    if name == "v":
        return RawFileBackend(f"{image_dir()}/v.img", readonly=False)
    if name == "ro":
        return RawFileBackend(f"{image_dir()}/ro.img", readonly=True, per_connection=True)
    if name == "boom":
        raise OSError("lookup failure")
    return None


def list_names():
    return ["v", "ro"]


class _Job:
    """One input's turn at the client thread; ``join`` waits for it like a thread's join."""

    __slots__ = ("sock", "data", "done")

    def __init__(self, sock: socket.socket, data: bytes):
        self.sock, self.data, self.done = sock, data, threading.Event()

    def join(self, timeout: float | None = None) -> None:
        self.done.wait(timeout)


class _Client:
    """One long-lived thread that plays the client of every input in turn.

    Starting a thread per input cost more than most inputs take to serve;
    what the thread does per input is unchanged: send the bytes, end the
    stream, read and drop every reply until the server closes.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._buf = memoryview(bytearray(1 << 20))
        threading.Thread(target=self._loop, daemon=True, name="fuzz-nbd-client").start()

    def submit(self, job: _Job) -> _Job:
        self._jobs.put(job)
        return job

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job.sock.sendall(job.data)
                job.sock.shutdown(socket.SHUT_WR)
                while job.sock.recv_into(self._buf):
                    pass
            except OSError:
                pass
            finally:
                job.done.set()


_client: _Client | None = None


def client(sock: socket.socket, data: bytes) -> _Job:
    """Send ``data`` on ``sock``, end the stream, then read and drop every reply until
    the server closes (so neither side ever blocks on a full socket buffer); done by
    the process's client thread, the result's ``join`` waits for it.

    The server side must be closed (or reach EOF) for the job to end, as with
    any peer that reads until EOF.
    """
    global _client
    if _client is None:
        _client = _Client()
    return _client.submit(_Job(sock, data))
