"""The demo's NBD client against a real NBD server (nbdkit), checked with nbdcopy."""

import os
import socket
import subprocess
import time

import pytest

from cyclemirror.daemon.nbd_client import NbdClient
from cyclemirror.errors import ConnectionLostError, StoreError, UsageError
from tests.support.tools import require_tool

SIZE = 1 << 20


def _accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.fixture
def nbdkit_memory(tmp_path):
    nbdkit = require_tool("nbdkit")
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen([nbdkit, "-f", "-U", sock, "memory", str(SIZE)])
    deadline = time.monotonic() + 10
    # The socket file appears at bind(), before listen(): wait until a connect succeeds
    # (a full run saw "Connection refused" right after the file appeared).
    while not _accepts(sock):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("nbdkit did not start")
        time.sleep(0.02)
    yield sock
    proc.terminate()
    proc.wait(timeout=10)


def test_writes_zeroes_and_trims_land_as_nbdcopy_reads_them(nbdkit_memory, tmp_path):
    nbdcopy = require_tool("nbdcopy")
    expected = bytearray(SIZE)
    with NbdClient("", unix_path=nbdkit_memory) as client:
        assert client.size == SIZE
        payload = os.urandom(200_000)
        client.write(12345, payload, fua=True)
        expected[12345:12345 + len(payload)] = payload
        client.write_zeroes(20000, 5000)
        expected[20000:25000] = bytes(5000)
        client.write(SIZE - 10, b"0123456789")
        expected[SIZE - 10:] = b"0123456789"
        client.flush()
        assert client.read(0, SIZE) == bytes(expected)
    out = tmp_path / "copy.img"
    subprocess.run([nbdcopy, f"nbd+unix:///?socket={nbdkit_memory}", str(out)], check=True)
    assert out.read_bytes() == bytes(expected)


def test_out_of_range_requests_are_refused_before_sending(nbdkit_memory):
    with NbdClient("", unix_path=nbdkit_memory) as client:
        with pytest.raises(UsageError):
            client.write(SIZE - 1, b"ab")
        with pytest.raises(UsageError):
            client.read(-1, 1)
        assert client.read(0, 4) == bytes(4)  # still usable


def test_a_server_error_names_the_command_and_offset(tmp_path):
    nbdkit = require_tool("nbdkit")
    sock = str(tmp_path / "ro.sock")
    proc = subprocess.Popen([nbdkit, "-f", "-r", "-U", sock, "memory", "64K"])
    try:
        def accepting() -> bool:  # nbdkit makes the socket file at bind, before it listens
            with socket.socket(socket.AF_UNIX) as probe:
                return os.path.exists(sock) and probe.connect_ex(sock) == 0

        deadline = time.monotonic() + 10
        while not accepting() and time.monotonic() < deadline:
            time.sleep(0.02)
        with NbdClient("", unix_path=sock) as client:
            with pytest.raises(StoreError) as info:
                client.write(4096, b"x")
            assert "write of 1 bytes at offset 4096" in str(info.value)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_nothing_listening_is_a_connection_error(tmp_path):
    with pytest.raises(ConnectionLostError, match="is the daemon running"):
        NbdClient("v", unix_path=str(tmp_path / "none.sock"))
