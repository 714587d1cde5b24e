"""The client side of the control socket: what the command line needs to ask the daemon.

The wire format is described in ``cyclemirror.daemon.control`` (and for users
in docs/cli.md, "Control socket"); the server lives there, this module holds
the client and what both sides share: the protocol version, the size caps,
the socket's path and the rebuilding of the daemon's errors.

It is imported by every thin-client verb of the command line, which
monitoring scripts run every few seconds, so it imports only ``os``,
``json``, ``_socket`` and ``cyclemirror.errors``.  ``_socket`` is the C module
behind ``socket``: ``socket.py`` itself turns hundreds of constants into enums
at import time (several milliseconds, more than the request takes), and the
client needs none of what it adds (``makefile``, ``selectors``).
"""

from __future__ import annotations

import _socket
import json
import os

from cyclemirror import errors
from cyclemirror.errors import CycleMirrorError, DaemonUnavailableError, ProtocolError, UsageError

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
# Replies carry status of many mirrors; still cap them so a broken daemon
# cannot make the CLI allocate without bound.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
SOCKET_NAME = "control.sock"
# sun_path is 108 bytes on Linux including the terminating NUL.
MAX_UNIX_PATH = 107
_RECV_BYTES = 256 * 1024


def control_socket_path(store_dir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(store_dir), SOCKET_NAME)


def check_unix_path(path: str, what: str) -> None:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise UsageError(
            f"{what} {path!r} is longer than the {MAX_UNIX_PATH} bytes a Unix socket path "
            "may have; use a store directory with a shorter path"
        )


def error_from_payload(payload: object) -> CycleMirrorError:
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


class ControlClient:
    """A connection to a store's daemon; ``call`` returns the result or raises its error."""

    def __init__(self, store_dir: str | os.PathLike, timeout: float | None = 30.0):
        self.path = control_socket_path(store_dir)
        check_unix_path(self.path, "control socket")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
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
        self._pending = b""  # bytes received after the last complete reply line

    def _readline(self, limit: int) -> bytes:
        """One line, with its ``\\n``; fewer bytes (or none) if the daemon closed first.

        Returns at most ``limit`` bytes: a longer line comes back cut, without
        its ``\\n``, which the caller refuses."""
        buf = bytearray(self._pending)
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if 0 <= end < limit:
                self._pending = bytes(buf[end + 1:])
                return bytes(buf[:end + 1])
            if len(buf) >= limit:
                self._pending = b""
                return bytes(buf[:limit])
            start = len(buf)
            chunk = self._sock.recv(_RECV_BYTES)
            if not chunk:
                self._pending = b""
                return bytes(buf)
            buf += chunk

    def call(self, op: str, /, reply_timeout: float | None = None, **args) -> object:
        """Send one request; ``reply_timeout`` overrides the socket timeout for slow ops.

        ``op`` is positional-only, so an argument may itself be named ``op``."""
        message = json.dumps({"v": PROTOCOL_VERSION, "op": op, "args": args}).encode() + b"\n"
        if len(message) > MAX_REQUEST_BYTES:
            raise UsageError(f"{op}: request too large for the control socket")
        if reply_timeout is not None:
            self._sock.settimeout(reply_timeout)
        try:
            self._sock.sendall(message)
            line = self._readline(MAX_RESPONSE_BYTES + 1)
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
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
