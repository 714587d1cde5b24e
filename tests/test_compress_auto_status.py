"""``--compress auto`` between two real daemons on loopback: the pick is shown in status.

Two ``cyclemirror serve`` processes, the source's volume written through its
NBD socket, the mirror started and synced through the real CLI.  What must
hold: ``status --json`` names the pick (one of the candidates, ``none``
included) and the figures it was made from, and the pick is exactly what
``autocodec.choose`` makes of those figures; the text ``status`` shows the
same pick in the mirror's CODEC column ("lz4 (auto)"); every candidate was
tried; the link was measured; the image equals the source.

Nothing here asserts which codec wins on this machine: on loopback that
depends on the CPU the two daemons share (``tests/test_sender_autocodec.py``
tests the decision itself, with a table of link rates).
"""

from __future__ import annotations

import os
import random

import pytest

from cyclemirror.sender.autocodec import CANDIDATES, FIRST, choose, label
from cyclemirror.sender.shipping import PACK_THREADS
from tests.support.daemons import DaemonPool, make_key

MiB = 1 << 20
MANUAL = "3600"


@pytest.fixture
def pair(tmp_path):
    key = make_key(tmp_path / "mirror.key")
    with DaemonPool(tmp_path) as pool:
        t = pool.start("t", key_file=key, listen=True, nbd=False, metrics=False)
        s = pool.start("s", key_file=key, metrics=False)
        yield s, t


def _write(daemon, volume, offset, data):
    from cyclemirror.daemon.nbd_client import NbdClient

    with NbdClient(volume, unix_path=daemon.nbd_sock) as nbd:
        nbd.write(offset, data)
        nbd.flush()


def _mixed(n: int) -> bytes:
    """Half text-like (compresses), half random (does not)."""
    rng = random.Random(3)
    words = [bytes(rng.choice(b"etaoinshrdlu") for _ in range(rng.randint(2, 9)))
             for _ in range(300)]
    text = b" ".join(rng.choice(words) for _ in range(n // 8))[:n // 2]
    return text + os.urandom(n - len(text))


def test_auto_shows_its_pick_and_the_figures_it_was_made_from(pair, tmp_path):
    s, t = pair
    s.cli("volume", "create", "v", "--size", "96M")
    data = _mixed(80 * MiB)
    _write(s, "v", 0, data)
    s.cli("mirror", "start", "v", "--to", t.listen, "--interval", MANUAL, "--compress", "auto")
    s.cli("mirror", "sync", "v", "--timeout", "180")
    (row,) = [m for m in s.status()["mirrors"] if m["volume"] == "v"]
    auto = row["compress_auto"]
    assert row["compress"] == "auto" and auto is not None, row
    names = [c["codec"] for c in auto["candidates"]]
    assert names == [label(c) for c in CANDIDATES] and "none" in names
    assert auto["codec"] in names
    # 80 MiB in batches of at most 8 MiB: the cheap candidates got their first batch (zstd 3
    # and 9 only where the link could make them worth it: autocodec.worth_trying)
    tried = {c["codec"]: c for c in auto["candidates"] if c["batches"] >= 1}
    assert {"none", "lz4", "zstd:1"} <= set(tried) and auto["codec"] in tried, auto
    assert all(c["cpu_rate"] > 0 for c in tried.values()), auto
    assert auto["link_rate"] is not None and auto["link_rate"] > 0, auto
    # the pick is the decision function's answer to the figures shown
    want = choose(auto["link_rate"], [c["cpu_rate"] for c in auto["candidates"]],
                  [c["ratio"] for c in auto["candidates"]], PACK_THREADS,
                  stored=names.index("none"), first=CANDIDATES.index(FIRST))
    assert auto["codec"] == names[want], auto
    # the text status: the mirror's row, the pick under CODEC (the cycle is over: it stays)
    lines = s.cli("status").stdout.splitlines()
    (head,) = [line for line in lines if line.startswith("VOLUME") and "CODEC" in line]
    line = lines[lines.index(head) + 1]  # the one mirror's row
    assert line.startswith("v "), lines
    assert line[head.index("CODEC"):head.index("RATIO")].strip() == f"{auto['codec']} (auto)"
    (incoming,) = [m for m in t.status()["incoming"] if m["volume"] == "v"]
    with open(incoming["image"], "rb") as fh:
        assert fh.read(len(data)) == data
