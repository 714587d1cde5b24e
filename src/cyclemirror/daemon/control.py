"""The control socket: JSON requests from the CLI to the daemon of a store.

Wire format (documented for users in docs/cli.md, "Control socket"): a Unix
stream socket at ``STORE/control.sock``, mode 0600.  Each message is one line
of UTF-8 JSON terminated by ``\\n``; a client may send several requests on one
connection and gets exactly one response line per request, in order::

    request:  {"v": 1, "op": "volume.create", "args": {"name": "v1", "size": 1048576}}
    success:  {"ok": true, "result": ...}
    failure:  {"ok": false, "error": {"type": "NotFoundError", "exit_code": 3,
                                      "message": "..."}}

Everything arriving on the socket is validated before use: a request line is
capped at ``MAX_REQUEST_BYTES`` (a longer one gets an error and the connection
is closed), must be a JSON object with a known version, a string ``op`` and an
object ``args``.  The handler validates the arguments of each op.

Concurrency: one accept thread plus one thread per connection, all blocking
I/O.  The server holds no state of its own beyond its list of connection
threads (guarded by ``_lock``); the handler it calls must be thread-safe.

The client, and what both sides share (the version, the caps, the socket's
path, the rebuilding of errors), is ``control_client``: the command line
imports only that, without this module's logging and threads.  Its names are
re-exported here for the daemon and the tests.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from cyclemirror.daemon.control_client import (  # noqa: F401 (re-exported for callers)
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    MAX_UNIX_PATH,
    PROTOCOL_VERSION,
    SOCKET_NAME,
    ControlClient,
    check_unix_path,
    control_socket_path,
    error_from_payload,
)
from cyclemirror.errors import AlreadyExistsError, CycleMirrorError, ProtocolError

log = logging.getLogger("cyclemirror.daemon.control")

Handler = Callable[[str, dict], Any]


def _error_payload(exc: CycleMirrorError) -> dict:
    return {"type": type(exc).__name__, "exit_code": exc.exit_code, "message": str(exc)}


class ControlServer:
    """Accepts CLI connections on ``path`` and answers each request with ``handler``."""

    def __init__(self, path: str, handler: Handler):
        check_unix_path(path, "control socket")
        self.path = path
        self._handler = handler
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._sock = self._bind(path)
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept",
                                        daemon=True)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise AlreadyExistsError(
                    f"{path} exists and is not a socket; move it away before starting the daemon"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: left behind by a daemon that died
            else:
                raise AlreadyExistsError(
                    f"a daemon already answers on {path}; stop it before starting another"
                )
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is created 0600: the CLI user only
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(16)
        return sock

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve_connection, args=(conn,),
                             name="control-conn", daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            reader = conn.makefile("rb")
            while True:
                line = reader.readline(MAX_REQUEST_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST_BYTES or not line.endswith(b"\n"):
                    if len(line) <= MAX_REQUEST_BYTES:
                        return  # peer closed mid-line: nothing to answer
                    self._send(conn, {"ok": False, "error": _error_payload(ProtocolError(
                        f"control request longer than {MAX_REQUEST_BYTES} bytes; "
                        "connection closed"))})
                    return
                self._send(conn, self.answer(line))
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def answer(self, line: bytes) -> dict:
        """Validate one request line and run it; never raises."""
        try:
            op, args = parse_request(line)
        except CycleMirrorError as exc:
            return {"ok": False, "error": _error_payload(exc)}
        t0 = time.monotonic()
        log.debug("control %s: asked", op)
        try:
            result = self._handler(op, args)
        except CycleMirrorError as exc:
            log.info("control %s failed: %s", op, exc)
            return {"ok": False, "error": _error_payload(exc)}
        except Exception as exc:  # a bug: report it, keep the daemon up
            log.exception("control %s crashed", op)
            return {"ok": False, "error": {
                "type": "CycleMirrorError", "exit_code": 1,
                "message": f"internal error in the daemon while running {op}: "
                           f"{type(exc).__name__}: {exc} (the daemon log has the traceback)"}}
        log.debug("control %s: answered in %.3fs", op, time.monotonic() - t0)
        return {"ok": True, "result": result}

    @staticmethod
    def _send(conn: socket.socket, message: dict) -> None:
        conn.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def parse_request(line: bytes) -> tuple[str, dict]:
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"control request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError("control request must be a JSON object")
    version = request.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"control protocol version {version!r} is not supported (daemon speaks "
            f"{PROTOCOL_VERSION}); use the cyclemirror CLI of the same release as the daemon"
        )
    op = request.get("op")
    args = request.get("args", {})
    if not isinstance(op, str) or not op:
        raise ProtocolError("control request lacks a string 'op'")
    if not isinstance(args, dict):
        raise ProtocolError(f"control request {op}: 'args' must be a JSON object")
    return op, args
