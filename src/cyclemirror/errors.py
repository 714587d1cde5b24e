"""Every exception a user can see, each with its message and exit code.

This module imports nothing from the package, so every layer (even the compiled
modules in ``cyclemirror._cext``) can raise these.  The CLI turns any
``CycleMirrorError`` into one line on stderr and ``exit_code``; nothing else
decides exit codes.

``is_temporary(exc)`` is the one answer to "retry, or stop and report?" for
any exception, wherever it was raised: the source's driver asks it before it
backs off or marks a target broken, and a peer's ``error`` message carries
its answer across the wire.  Each class states its own answer in the class
attribute ``temporary``; only ``is_temporary`` reads it.
"""

from __future__ import annotations

import sys


class CycleMirrorError(Exception):
    """Base of all cyclemirror errors. ``exit_code`` is what the CLI exits with.

    ``temporary``: whether retrying later may help; read it through ``is_temporary``.
    """

    exit_code = 1
    temporary = False


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

    Permanent (a bad key, a size mismatch) unless a subclass says otherwise.
    """

    exit_code = 6


class ConnectionLostError(PeerError):
    """The connection to a peer dropped; the cycle resumes after a reconnect."""

    temporary = True


class ProtocolError(PeerError):
    """A peer sent something that is not valid protocol."""


class AuthenticationError(PeerError):
    """The pre-shared key of the peer does not match ours."""



class CycleGoneError(PeerError):
    """A verify cannot compare like with like now: the target's applied cycle is one the
    source has already merged away (the target lags).  Retrying after it caught up helps."""

    temporary = True


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
    """A frame header or payload failed validation; ``field`` names the first bad one.

    Temporary in both directions: a frame damaged in transit (a flipped bit
    fails a checksum, or makes a field invalid) is worth a retry, which resumes
    after the last acknowledged chunk.  Only the frame codec raises it.
    """

    temporary = True

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


class ClusterUnavailableError(StoreError):
    """A storage cluster that holds mirror images (Ceph) cannot be reached now; retrying
    later may help (the source resumes after its last acknowledged chunk)."""

    temporary = True


class DeadlineError(CycleMirrorError):
    """An operation with a deadline (sync, connect) ran out of time."""

    exit_code = 8
    temporary = True


class RoleError(CycleMirrorError):
    """The volume's role forbids it: a promote while the source is connected, mirroring
    from a demoted volume, split brain until the user names the side that loses
    (docs/failover.md)."""

    exit_code = 10


class DemotedError(RoleError):
    """This host's volume was demoted: a peer promoted its mirror image and is primary now."""


class SplitBrainError(RoleError):
    """Both sides wrote since their last common cycle; a person must name the loser."""


def is_temporary(exc: BaseException) -> bool:
    """True if retrying later may help (reconnect and resume), False to stop and report.

    Our errors answer through their class (or, for a peer's ``error`` message,
    the peer's answer); a certificate the peer does not trust stays untrusted;
    any other OS-level failure (a refused or reset connection, a timeout) is
    temporary; anything else (a bug, a bad value) is permanent.
    """
    if isinstance(exc, CycleMirrorError):
        return bool(exc.temporary)
    if not isinstance(exc, OSError):
        return False
    # Only a TLS error can be this one, and ssl is then loaded already; importing it
    # here keeps `import cyclemirror.errors` (every CLI run) free of ssl's 10-20 ms.
    ssl = sys.modules.get("ssl")
    return not (ssl is not None and isinstance(exc, ssl.SSLCertVerificationError))
