"""The control socket: real Unix sockets, a real server thread, hostile input."""

import json
import os
import socket
import stat
import threading

import pytest

from cyclemirror import errors
from cyclemirror.daemon.control import (
    MAX_REQUEST_BYTES,
    ControlClient,
    ControlServer,
    control_socket_path,
    error_from_payload,
)


class Recorder:
    """A handler with real behaviour: echoes, raises a chosen error, or crashes."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, op, args):
        with self.lock:
            self.calls.append((op, args))
        if op == "echo":
            return args
        if op == "missing":
            raise errors.NotFoundError(f"volume {args.get('name')!r} does not exist")
        if op == "crash":
            raise RuntimeError("boom")
        raise errors.UsageError(f"unknown op {op}")


@pytest.fixture
def server(tmp_path):
    handler = Recorder()
    srv = ControlServer(control_socket_path(tmp_path), handler)
    srv.start()
    yield srv, handler, tmp_path
    srv.close()


def raw_exchange(path, payload: bytes) -> list[dict]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return [json.loads(line) for line in data.splitlines()]


def test_round_trip_keeps_values_and_several_requests_share_a_connection(server):
    _, handler, store = server
    with ControlClient(store) as client:
        assert client.call("echo", name="v1", size=4096) == {"name": "v1", "size": 4096}
        assert client.call("echo", nested={"a": [1, 2]}) == {"nested": {"a": [1, 2]}}
    assert [op for op, _ in handler.calls] == ["echo", "echo"]


def test_daemon_errors_come_back_as_the_same_class_and_exit_code(server):
    _, _, store = server
    with ControlClient(store) as client:
        with pytest.raises(errors.NotFoundError) as info:
            client.call("missing", name="nope")
        assert info.value.exit_code == 3
        assert "'nope' does not exist" in str(info.value)
        # the connection survives an error reply
        assert client.call("echo", x=1) == {"x": 1}


def test_a_handler_crash_is_reported_and_the_server_keeps_serving(server):
    _, _, store = server
    with ControlClient(store) as client:
        with pytest.raises(errors.CycleMirrorError) as info:
            client.call("crash")
        assert "internal error" in str(info.value) and "RuntimeError: boom" in str(info.value)
        assert client.call("echo", ok=True) == {"ok": True}


@pytest.mark.parametrize(
    "line, fragment",
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"v": 99, "op": "echo"}\n', "version 99"),
        (b'{"v": 1}\n', "'op'"),
        (b'{"v": 1, "op": "echo", "args": [1]}\n', "'args'"),
        (b'\xff\xfe\n', "not JSON"),
    ],
)
def test_malformed_requests_get_a_protocol_error_and_never_reach_the_handler(
        server, line, fragment):
    srv, handler, _ = server
    (reply,) = raw_exchange(srv.path, line)
    assert reply["ok"] is False
    assert reply["error"]["type"] == "ProtocolError" and fragment in reply["error"]["message"]
    assert handler.calls == []


def test_an_oversized_request_is_refused_and_the_connection_closed(server):
    srv, handler, _ = server
    replies = raw_exchange(srv.path, b'{"v":1,"op":"echo","args":{"x":"' +
                           b"a" * (MAX_REQUEST_BYTES + 10) + b'"}}\n' +
                           b'{"v":1,"op":"echo"}\n')
    assert len(replies) == 1 and "longer than" in replies[0]["error"]["message"]
    assert handler.calls == []


def test_socket_is_private_and_a_second_server_on_the_same_store_is_refused(server):
    srv, handler, store = server
    assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
    with pytest.raises(errors.AlreadyExistsError):
        ControlServer(srv.path, handler)


def test_a_stale_socket_file_is_replaced(tmp_path):
    path = control_socket_path(tmp_path)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # file stays, nobody listens: what a kill -9 leaves behind
    srv = ControlServer(path, Recorder())
    srv.start()
    try:
        with ControlClient(tmp_path) as client:
            assert client.call("echo", a=1) == {"a": 1}
    finally:
        srv.close()
    assert not os.path.exists(path)


def test_client_without_daemon_raises_daemon_unavailable_naming_the_store(tmp_path):
    with pytest.raises(errors.DaemonUnavailableError) as info:
        ControlClient(tmp_path)
    assert str(tmp_path) in str(info.value) and "serve" in str(info.value)
    assert info.value.exit_code == 5


def test_error_payloads_from_an_unknown_or_hostile_daemon_stay_safe():
    exc = error_from_payload({"type": "NoSuchClass", "message": "x", "exit_code": 42})
    assert type(exc) is errors.CycleMirrorError and exc.exit_code == 42
    exc = error_from_payload({"type": "FrameError", "message": "bad", "exit_code": 6})
    assert isinstance(exc, errors.FrameError)
    exc = error_from_payload({"type": "__class__", "message": "x", "exit_code": 9999})
    assert type(exc) is errors.CycleMirrorError and exc.exit_code == 1
    assert isinstance(error_from_payload("junk"), errors.ProtocolError)


def test_too_long_store_path_is_a_clear_usage_error(tmp_path):
    deep = tmp_path / ("d" * 120)
    with pytest.raises(errors.UsageError) as info:
        ControlClient(deep)
    assert "shorter path" in str(info.value)
