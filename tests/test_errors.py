"""errors.is_temporary: the one answer to "retry or stop", as a table of cases."""

import ssl

import pytest

from cyclemirror import errors
from cyclemirror.wire.link import RemoteError


@pytest.mark.parametrize("exc, temporary", [
    # damaged in transit, either direction: retried, resumes after the last ack
    (errors.ChecksumError("frame payload: checksum mismatch", field="checksum"), True),
    (errors.FrameError("frame header: offset must be 0", field="offset"), True),
    (errors.ConnectionLostError("connection closed"), True),
    (errors.DeadlineError("timed out waiting for the start of cycle 3"), True),
    (errors.NoSpaceError("the target's disk is full"), True),
    (ConnectionResetError(104, "reset by peer"), True),
    (TimeoutError("timed out"), True),
    (OSError(5, "I/O error"), True),
    # the peer's own answer travels with its error message
    (RemoteError("peer reported: disk full", "NoSpaceError", True), True),
    (RemoteError("peer reported: bad key", "AuthenticationError", False), False),
    # retrying cannot help
    (errors.AuthenticationError("the keys differ"), False),
    (errors.ProtocolError("control message 'ack': field 'cycle' must be an integer"), False),
    (errors.PeerError("size mismatch"), False),
    (errors.StoreError("volume is closed"), False),
    (errors.UsageError("bad argument"), False),
    (ssl.SSLCertVerificationError(1, "certificate verify failed"), False),
    (ValueError("a bug"), False),
])
def test_is_temporary_decides_retry_or_stop(exc, temporary):
    assert errors.is_temporary(exc) is temporary
