"""The receiving side: sessions from sources, staging, verification, journaled apply.

``state`` keeps each mirror's state file (the apply journal), ``staging`` the
durable log of a delta being received, ``mirror`` the per-mirror logic
(begin/receive/checkpoint/commit/apply and crash recovery), ``session`` one
connection's protocol loop, and ``server`` the listening ``TargetServer`` a
daemon hosts.
"""

from cyclemirror.receiver.server import TargetServer  # noqa: F401
