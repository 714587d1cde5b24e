"""The sending side: one MirrorDriver per volume runs the cycle to its targets.

``connection`` speaks the protocol to one target (a reader thread collects
acks), ``ratelimit`` caps a mirror's rate and shares a daemon-wide cap,
``persist`` keeps the driver's state in the source store, ``driver`` runs
freeze / ship / wait-for-apply / merge, with fan-out, catch-up and retry.
"""

from cyclemirror.sender.driver import MirrorDriver, MirrorOptions  # noqa: F401
