"""A slow link made inside the test: two network namespaces joined by a veth pair.

``NetnsPair(rate)`` creates namespaces ``<tag>a`` and ``<tag>b`` with
addresses ``10.251.N.1`` and ``10.251.N.2`` and a ``tc qdisc tbf`` on each
end, so each direction is limited to ``rate`` (e.g. ``"100mbit"``).  A
process runs inside with ``prefix(0)`` / ``prefix(1)`` before its argv
(``ip netns exec NS ...``: ip execs the command, so the pid is the
program's own).  ``link(up=False)`` cuts the wire (both ends stay, packets
are lost until it is up again, as with a pulled cable).

Needs root, ``ip`` and ``tc`` (iproute2) and a kernel that allows network
namespaces, veth and tbf; where any is missing the test is skipped saying
which.  The namespaces (and with them the veth pair) are deleted on exit,
also when the test failed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest

_counter = itertools.count()


class NetnsPair:
    def __init__(self, rate: str = "100mbit", burst: str = "64kb"):
        n = next(_counter)
        self.tag = f"cm{os.getpid() % 100000}n{n}"
        self.ns = (f"{self.tag}a", f"{self.tag}b")
        self.dev = (f"{self.tag}x", f"{self.tag}y")
        net = (os.getpid() + n) % 250 + 1
        self.addr = (f"10.251.{net}.1", f"10.251.{net}.2")
        self.rate, self.burst = rate, burst
        self._made: list[str] = []

    def _ip(self, *args: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip()}")

    def __enter__(self) -> NetnsPair:
        if os.geteuid() != 0:
            pytest.skip("network namespaces need root (the slow-link tests run as root in CI)")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is missing (apt-get install iproute2)")
        try:
            for ns in self.ns:
                self._ip("netns", "add", ns)
                self._made.append(ns)
            self._ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for i in (0, 1):
                self._ip("link", "set", self.dev[i], "netns", self.ns[i])
                self._ip("-n", self.ns[i], "addr", "add", f"{self.addr[i]}/24", "dev", self.dev[i])
                self._ip("-n", self.ns[i], "link", "set", self.dev[i], "up")
                self._ip("-n", self.ns[i], "link", "set", "lo", "up")
                self._ip("netns", "exec", self.ns[i], "tc", "qdisc", "add", "dev", self.dev[i],
                         "root", "tbf", "rate", self.rate, "burst", self.burst,
                         "latency", "100ms")
        except OSError as exc:
            self.close()
            pytest.skip(f"cannot make a namespace pair with a tbf link here: {exc}")
        return self

    def prefix(self, side: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns[side])

    def link(self, up: bool) -> None:
        """Cut (or restore) the wire: A's end goes down, packets are lost meanwhile."""
        self._ip("-n", self.ns[0], "link", "set", self.dev[0], "up" if up else "down")

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made = []

    def __exit__(self, *exc) -> None:
        self.close()
