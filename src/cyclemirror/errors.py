"""Every exception a user can see, each with its message and exit code.

This module imports nothing from the package, so every layer (even the compiled
modules in ``cyclemirror._cext``) can raise these.  The CLI turns any
``CycleMirrorError`` into one line on stderr and ``exit_code``; nothing else
decides exit codes.
"""

from __future__ import annotations


class CycleMirrorError(Exception):
    """Base of all cyclemirror errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(CycleMirrorError, ValueError):
    """A bad argument from the command line, a config file or an API caller."""

    exit_code = 2


class NotFoundError(CycleMirrorError, LookupError):
    """A named volume, mirror or store does not exist."""

    exit_code = 3


class AlreadyExistsError(CycleMirrorError):
    """A named volume, mirror or store already exists."""

    exit_code = 4


class DaemonUnavailableError(CycleMirrorError):
    """The CLI cannot reach the daemon of a store."""

    exit_code = 5


class PeerError(CycleMirrorError):
    """A remote peer broke the protocol, failed authentication, or refused us.

    ``temporary`` says whether retrying later may help (a lost connection) or
    not (a bad key, a size mismatch).
    """

    exit_code = 6
    temporary = False


class ConnectionLostError(PeerError):
    """The connection to a peer dropped; the cycle resumes after a reconnect."""

    temporary = True


class ProtocolError(PeerError):
    """A peer sent something that is not valid protocol."""


class AuthenticationError(PeerError):
    """The pre-shared key of the peer does not match ours."""


class IntegrityError(CycleMirrorError):
    """Stored or received data failed its checksum or format check."""

    exit_code = 7


class BitmapError(CycleMirrorError):
    """Base of extent-bitmap errors."""

    exit_code = 7


class BitmapRangeError(BitmapError, IndexError):
    """A bit or range outside the bitmap: never clipped, never ignored."""


class BitmapFormatError(BitmapError, IntegrityError):
    """A saved bitmap file is torn, foreign, or of another version."""


class FrameError(ProtocolError):
    """A frame header or payload failed validation; ``field`` names the first bad one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ChecksumError(FrameError, IntegrityError):
    """A frame's header or payload checksum did not match its bytes."""


class StoreError(CycleMirrorError):
    """A store or volume operation failed (I/O, space, bad on-disk state)."""

    exit_code = 9


class NoSpaceError(StoreError):
    """A file system is full (ENOSPC, EDQUOT); retrying after space is freed may help."""

    temporary = True


class DeadlineError(CycleMirrorError):
    """An operation with a deadline (sync, connect) ran out of time."""

    exit_code = 8
