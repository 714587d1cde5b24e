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
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from cyclemirror import errors
from cyclemirror.errors import (
    AlreadyExistsError,
    CycleMirrorError,
    DaemonUnavailableError,
    ProtocolError,
    UsageError,
)

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
# Replies carry status of many mirrors; still cap them so a broken daemon
# cannot make the CLI allocate without bound.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
SOCKET_NAME = "control.sock"
# sun_path is 108 bytes on Linux including the terminating NUL.
MAX_UNIX_PATH = 107

log = logging.getLogger("cyclemirror.daemon.control")

Handler = Callable[[str, dict], Any]


def control_socket_path(store_dir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(store_dir), SOCKET_NAME)


def check_unix_path(path: str, what: str) -> None:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise UsageError(
            f"{what} {path!r} is longer than the {MAX_UNIX_PATH} bytes a Unix socket path "
            "may have; use a store directory with a shorter path"
        )


def _error_payload(exc: CycleMirrorError) -> dict:
    return {"type": type(exc).__name__, "exit_code": exc.exit_code, "message": str(exc)}


def error_from_payload(payload: Any) -> CycleMirrorError:
    """Rebuild the daemon's exception on the client, keeping class and exit code."""
    if not isinstance(payload, dict):
        return ProtocolError(f"daemon sent a malformed error: {payload!r}")
    name = payload.get("type")
    message = payload.get("message")
    code = payload.get("exit_code")
    if not isinstance(message, str):
        message = repr(message)
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, CycleMirrorError):
        try:
            exc = cls(message)
        except TypeError:  # a class whose constructor takes other arguments
            exc = CycleMirrorError(message)
    else:
        exc = CycleMirrorError(message)
    # The daemon decides the code; a client built from another version keeps it.
    if isinstance(code, int) and not isinstance(code, bool) and 1 <= code <= 125:
        exc.exit_code = code
    return exc


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


class ControlClient:
    """A connection to a store's daemon; ``call`` returns the result or raises its error."""

    def __init__(self, store_dir: str | os.PathLike, timeout: float | None = 30.0):
        self.path = control_socket_path(store_dir)
        check_unix_path(self.path, "control socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise DaemonUnavailableError(
                f"no daemon answers for store {os.path.dirname(self.path)} (nothing listens on "
                f"{self.path}); start one with 'cyclemirror --store "
                f"{os.path.dirname(self.path)} serve'"
            ) from None
        except OSError as exc:
            sock.close()
            raise DaemonUnavailableError(f"cannot connect to {self.path}: {exc}") from None
        self._sock = sock
        self._reader = sock.makefile("rb")

    def call(self, op: str, /, reply_timeout: float | None = None, **args) -> Any:
        """Send one request; ``reply_timeout`` overrides the socket timeout for slow ops.

        ``op`` is positional-only, so an argument may itself be named ``op``."""
        message = json.dumps({"v": PROTOCOL_VERSION, "op": op, "args": args}).encode() + b"\n"
        if len(message) > MAX_REQUEST_BYTES:
            raise UsageError(f"{op}: request too large for the control socket")
        if reply_timeout is not None:
            self._sock.settimeout(reply_timeout)
        try:
            self._sock.sendall(message)
            line = self._reader.readline(MAX_RESPONSE_BYTES + 1)
        except TimeoutError:
            raise errors.DeadlineError(
                f"the daemon did not answer {op} in time on {self.path}") from None
        except OSError as exc:
            raise DaemonUnavailableError(
                f"lost the connection to the daemon on {self.path} during {op}: {exc}") from None
        if not line:
            raise DaemonUnavailableError(
                f"the daemon on {self.path} closed the connection during {op} "
                "(did it stop? see its log)")
        if len(line) > MAX_RESPONSE_BYTES or not line.endswith(b"\n"):
            raise ProtocolError(f"daemon reply to {op} is truncated or too long")
        try:
            reply = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"daemon reply to {op} is not JSON: {exc}") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ProtocolError(f"daemon reply to {op} is malformed")
        if reply["ok"]:
            return reply.get("result")
        raise error_from_payload(reply.get("error"))

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
