"""The RPO objective end to end: real daemons, the real CLI, data through NBD.

Proves: a mirror started with ``--rpo`` shows its objective and state in
``status --json`` and the table; when a bandwidth cap makes it fall behind,
``status --check`` says so (exit 2 once the objective is missed, exit 1 while
only predicted to be; one line naming the mirror); once the cap is lifted
(the daemon restarted without it) the mirror catches up with a delta and
``status --check`` exits 0 again.  Bad ``--rpo`` values are refused by name.
"""

import json
import os

import pytest

from cyclemirror.daemon.nbd_client import NbdClient
from tests.support.daemons import DaemonPool, make_key, wait_for

MiB = 1 << 20


@pytest.fixture
def daemons(tmp_path):
    with DaemonPool(tmp_path) as pool:
        yield pool.start


def check(daemon):
    proc = daemon.cli("status", "--check", check=False)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    return proc.returncode, lines[0]


def test_a_capped_mirror_is_reported_at_risk_then_violated_and_recovers(daemons, tmp_path):
    key = make_key(tmp_path / "k")
    target = daemons("dst", key_file=key, listen=True, nbd=False)
    source = daemons("src", key_file=key, extra=("--bwlimit", "256K"))
    source.cli("volume", "create", "v", "--size", "8M")
    out = source.cli("mirror", "start", "v", "--to", target.listen, "--rpo", "1").stdout
    assert "RPO objective of 1s" in out
    source.cli("mirror", "sync", "v", "--timeout", "60")
    wait_for(lambda: check(source)[0] == 0, 30, "the fresh mirror to be within its objective")
    row = source.status()["mirrors"][0]
    assert row["rpo"]["objective"] == 1 and row["rpo"]["state"] == "ok"
    assert row["interval_now"] < 1  # the interval adapts: below the objective
    assert "objective 1s" in source.cli("status").stdout

    with NbdClient("v", unix_path=source.nbd_sock) as nbd:
        nbd.write(0, os.urandom(3 * MiB))  # 3 MiB at 256 KiB/s: about 12 s to ship
        nbd.flush()
    seen = set()

    def judged(code):
        got, line = check(source)
        seen.add(got)
        if got:
            assert "v -> " in line and ("AT RISK" in line or "VIOLATED" in line), line
        return got == code

    wait_for(lambda: judged(2), 60, "status --check to report the objective violated")
    doc = json.loads(source.cli("status", "--json").stdout)
    assert doc["mirrors"][0]["rpo"]["state"] == "violated"

    source.stop()  # lift the cap: the same store, served without --bwlimit
    source = daemons("src", key_file=key)
    wait_for(lambda: check(source)[0] == 0, 60, "the mirror to catch up and be ok again")
    row = source.status()["mirrors"][0]
    assert row["rpo"]["state"] == "ok" and not row["last_cycle"]["full"]


@pytest.mark.parametrize("value, why", [("0", "more than 0"), ("-3", "rpo"), ("soon", "rpo")])
def test_bad_rpo_values_are_refused(daemons, tmp_path, value, why):
    key = make_key(tmp_path / "k")
    source = daemons("src", key_file=key)
    source.cli("volume", "create", "v", "--size", "1M")
    proc = source.cli("mirror", "start", "v", "--to", "127.0.0.1:9", "--rpo", value,
                      check=False)
    assert proc.returncode == 2 and why in proc.stderr, proc.stderr
    assert source.status()["mirrors"] == []
