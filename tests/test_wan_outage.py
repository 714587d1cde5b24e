"""A link outage longer than the link timeout, mid-cycle, in network namespaces.

Two daemons in two namespaces joined by a 100 Mbit/s veth pair
(tests/support/netns.py), both started with ``--link-timeout 3``: a link
that leaves data unacknowledged for 3 s is dead (TCP_USER_TIMEOUT; the
default, 60 s, would make the test a minute long).  Mid-cycle the source's
end of the wire goes down (``ip link set down``), and stays down until the
source has given the connection up (its status says ``reconnecting``: its
next send found the connection aborted) and has failed to dial again: the
outage outlives the connection, which a 3 s cut under the default timeout
would not (TCP would retransmit and carry on).  Then the wire comes back.  What must hold: while it is out,
the target's image stays exactly the previous cycle's (nothing of the cut
cycle is visible); afterwards the cycle resumes after the chunks the target
had staged (``resumed_from`` > 0), is not a full copy, ships no byte twice,
and the image equals the source.  And ``--link-timeout`` is validated.

Timing: nothing asserts that something is fast; every wait is for an event
the status shows, with a generous bound.
"""

from __future__ import annotations

import os

import pytest

from cyclemirror.errors import UsageError
from cyclemirror.wire import sockio
from tests.support.daemons import DaemonPool, make_key, run_cli, wait_for
from tests.support.netns import NetnsPair

MiB = 1 << 20
MANUAL = "3600"
LINK_TIMEOUT = "3"


@pytest.fixture
def link():
    with NetnsPair("100mbit") as pair:
        yield pair


@pytest.fixture
def pair(tmp_path, link):
    key = make_key(tmp_path / "mirror.key")
    with DaemonPool(tmp_path) as pool:
        t = pool.start("t", key_file=key, nbd=False, metrics=False, prefix=link.prefix(1),
                       extra=("--listen", f"{link.addr[1]}:0", "--insecure",
                              "--link-timeout", LINK_TIMEOUT))
        s = pool.start("s", key_file=key, metrics=False, prefix=link.prefix(0),
                       extra=("--insecure", "--link-timeout", LINK_TIMEOUT))
        yield s, t


def _write(daemon, volume, offset, data):
    from cyclemirror.daemon.nbd_client import NbdClient

    with NbdClient(volume, unix_path=daemon.nbd_sock) as nbd:
        nbd.write(offset, data)
        nbd.flush()


def _incoming(target, source, volume) -> dict:
    (row,) = [m for m in target.status()["incoming"]
              if m["source_node"] == source.node_id and m["volume"] == volume]
    return row


def _image(target, source, volume) -> bytes:
    with open(_incoming(target, source, volume)["image"], "rb") as fh:
        return fh.read()


def _export(daemon, volume, path) -> bytes:
    daemon.cli("volume", "export", volume, "--to", path)
    with open(path, "rb") as fh:
        return fh.read()


def _mirror(source, volume) -> dict:
    (row,) = [m for m in source.status()["mirrors"] if m["volume"] == volume]
    return row


def test_an_outage_longer_than_the_link_timeout_resumes_the_cycle_untorn(pair, link, tmp_path):
    s, t = pair
    s.cli("volume", "create", "v", "--size", "24M")
    first = os.urandom(2 * MiB)
    _write(s, "v", 0, first)
    # 4 MiB/s: the 20 MiB cycle takes ~5 s, time to see it staged and cut the wire
    s.cli("mirror", "start", "v", "--to", t.listen, "--interval", MANUAL, "--compress", "none",
          "--bwlimit", "4M")
    s.cli("mirror", "sync", "v", "--timeout", "120")
    before = _image(t, s, "v")
    assert before == _export(s, "v", tmp_path / "before")
    row = _mirror(s, "v")
    shipped_before, cycle_before = row["shipped_bytes_total"], row["applied_cycle"]

    data = os.urandom(20 * MiB)
    _write(s, "v", 3 * MiB, data)
    s.cli("mirror", "sync", "v", "--timeout", "0.2", check=False)  # start the cycle only
    wait_for(lambda: (_incoming(t, s, "v")["receiving"] or {}).get("chunks", 0) >= 1,
             60, "the target to stage a chunk of the cycle")

    link.link(up=False)
    try:
        # the source gives the connection up: data stayed unacknowledged for 3 s
        wait_for(lambda: _mirror(s, "v")["phase"] == "reconnecting", 60,
                 "the source to drop the dead link")
        # ...and dials again into the cut wire, which fails too (no route, or a timeout)
        wait_for(lambda: "cannot connect" in (_mirror(s, "v")["last_error"] or ""), 60,
                 "a failed redial while the wire is out")
        # the send failed (the cycle after the synced one: a sync that came after the first
        # cycle was applied made an empty cycle of its own)
        assert "ConnectionLostError" in s.log() and f"of cycle {cycle_before + 1}" in s.log()
        staged = _incoming(t, s, "v")["receiving"]
        assert staged and staged["chunks"] >= 1, staged
        assert _image(t, s, "v") == before  # nothing of the cut cycle is visible
        assert _incoming(t, s, "v")["applied_cycle"] == cycle_before
    finally:
        link.link(up=True)

    # the cut cycle finishes by itself (a 'mirror sync' would add a cycle of its own)
    row = wait_for(lambda: (lambda r: r if r["applied_cycle"] > cycle_before else None)(
        _mirror(s, "v")), 180, "the cut cycle to be applied")
    assert row["last_error"] is None, row
    last = row["last_cycle"]
    assert last["cycle"] == cycle_before + 1 and last["full"] is False, last
    assert last["resumed_from"] > 0, last  # after the chunks the target had staged
    assert row["shipped_bytes_total"] - shipped_before < len(data) + 2 * MiB, row  # not twice
    assert _image(t, s, "v") == _export(s, "v", tmp_path / "after")
    # the target saw the dead session end and the source's new one open
    assert t.log().count("mirror v from") >= 2, t.log()


def test_link_timings_scale_with_the_timeout_and_the_default_is_the_minute():
    assert sockio.link_timings(60) == {"TCP_KEEPIDLE": sockio.KEEPIDLE,
                                       "TCP_KEEPINTVL": sockio.KEEPINTVL,
                                       "TCP_KEEPCNT": sockio.KEEPCNT,
                                       "TCP_USER_TIMEOUT": sockio.LINK_DEAD_AFTER_MS}
    assert sockio.link_timings(3) == {"TCP_KEEPIDLE": 1, "TCP_KEEPINTVL": 1, "TCP_KEEPCNT": 6,
                                      "TCP_USER_TIMEOUT": 3000}
    for bad in (0.5, 3601):
        with pytest.raises(ValueError):
            sockio.link_timings(bad)


def test_a_bad_link_timeout_is_refused_with_the_range(tmp_path):
    from cyclemirror.daemon.config import parse_link_timeout

    assert parse_link_timeout("90s") == 90 and parse_link_timeout(5) == 5
    for bad in ("0", "2h", "soon"):
        with pytest.raises(UsageError, match="link.timeout"):
            parse_link_timeout(bad)
    refused = run_cli("--store", str(tmp_path / "x"), "serve", "--link-timeout", "0.1",
                      check=False, timeout=60)
    assert refused.returncode == 2 and "1-3600 s" in refused.stderr, refused.stderr
    config = tmp_path / "c.toml"
    config.write_text('link_timeout = "2h"\n')
    refused = run_cli("--store", str(tmp_path / "y"), "serve", "--config", config,
                      check=False, timeout=60)
    assert refused.returncode == 2 and "link_timeout" in refused.stderr, refused.stderr
