"""The exports the NBD harnesses serve: two small raw images in a temp directory."""

from __future__ import annotations

import atexit
import shutil
import socket
import tempfile
import threading

from cyclemirror.nbd.backends import RawFileBackend

_dir = None
SIZE = 1 << 20


def image_dir() -> str:
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="cm-fuzz-nbd-")
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


def client(sock: socket.socket, data: bytes) -> threading.Thread:
    """A thread that sends ``data``, ends the stream, then reads and drops every reply
    until the server closes (so neither side ever blocks on a full socket buffer)."""
    def run():
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 20):
                pass
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t
