"""The control socket's client against a daemon that answers badly: real Unix sockets.

The client reads reply lines off a bare ``_socket`` (no ``makefile``, to
start fast), so these check its line reading and its refusals: replies split
in small pieces or packed two in one send, an over-long or cut reply, a
daemon that hangs up or says nothing.  tests/test_daemon_control.py covers
the client against the real server.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest

from cyclemirror import errors
from cyclemirror.daemon.control_client import (
    MAX_RESPONSE_BYTES,
    ControlClient,
    control_socket_path,
)


class FakeDaemon:
    """Listens on STORE/control.sock; for each request line, sends what ``script`` returns.

    ``script(request)`` returns a list of byte strings to send one by one; a
    None in it closes the connection there."""

    def __init__(self, store, script):
        self.path = control_socket_path(store)
        self.script = script
        self.requests: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as reader:
            for line in reader:
                request = json.loads(line)
                self.requests.append(request)
                for piece in self.script(request):
                    if piece is None:
                        return  # hang up
                    conn.sendall(piece)

    def close(self):
        self.sock.close()
        self.thread.join(timeout=10)


@pytest.fixture
def fake(tmp_path):
    daemons = []

    def start(script):
        d = FakeDaemon(tmp_path, script)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.close()


def reply(result) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode() + b"\n"


def test_a_reply_sent_byte_by_byte_is_read_whole(fake, tmp_path):
    fake(lambda req: [bytes([b]) for b in reply({"echo": req["args"]})])
    with ControlClient(tmp_path, timeout=10) as client:
        assert client.call("x", a=1) == {"echo": {"a": 1}}
        assert client.call("x", a=2) == {"echo": {"a": 2}}


def test_replies_packed_in_one_send_are_kept_for_the_next_call(fake, tmp_path):
    # A daemon that answers the first request with two lines: the second is
    # the answer to the next call, read from what the client already holds.
    sent = []

    def script(req):
        sent.append(req["op"])
        return [reply("first") + reply("second")] if len(sent) == 1 else []

    d = fake(script)
    with ControlClient(tmp_path, timeout=10) as client:
        assert client.call("one") == "first"
        assert client.call("two") == "second"
    d.close()  # waits until the fake has read the client's requests to the end
    assert [r["op"] for r in d.requests] == ["one", "two"]


def test_a_large_reply_within_the_cap_is_read(fake, tmp_path):
    big = "x" * (3 * 1024 * 1024)
    fake(lambda req: [reply(big)])
    with ControlClient(tmp_path, timeout=30) as client:
        assert client.call("status") == big


def test_a_reply_longer_than_the_cap_is_refused(fake, tmp_path):
    too_long = b'{"ok": true, "result": "' + b"x" * MAX_RESPONSE_BYTES + b'"}\n'
    fake(lambda req: [too_long])
    with ControlClient(tmp_path, timeout=30) as client:
        with pytest.raises(errors.ProtocolError, match="truncated or too long"):
            client.call("status")


@pytest.mark.parametrize("pieces, error, fragment", [
    ([None], errors.DaemonUnavailableError, "closed the connection during status"),
    ([b'{"ok": true, "res', None], errors.ProtocolError, "truncated or too long"),
    ([b"not json\n"], errors.ProtocolError, "not JSON"),
    ([b'["ok"]\n'], errors.ProtocolError, "malformed"),
    ([b'{"ok": false, "error": {"type": "NotFoundError", "exit_code": 3, "message": "no v9"}}\n'],
     errors.NotFoundError, "no v9"),
], ids=["hangs-up", "cut-line", "not-json", "not-an-object", "error-reply"])
def test_bad_or_failed_replies_raise_what_the_cli_reports(fake, tmp_path, pieces, error, fragment):
    fake(lambda req: pieces)
    with ControlClient(tmp_path, timeout=10) as client:
        with pytest.raises(error, match=fragment) as info:
            client.call("status")
    assert info.value.exit_code == error.exit_code


def test_a_daemon_that_never_answers_is_a_deadline_error(fake, tmp_path):
    fake(lambda req: [])
    with ControlClient(tmp_path, timeout=10) as client:
        with pytest.raises(errors.DeadlineError, match="did not answer status in time"):
            client.call("status", reply_timeout=0.3)
