"""A stopped or hung target of a volume mirror holds up nobody else: real daemons.

A source daemon mirrors volume ``v`` to targets B and C (a cycle a second),
every daemon with a 3 s link timeout.  Two ways C stops answering:

* SIGSTOP: its kernel still takes the next cycle's bytes, the daemon answers
  nothing;
* a commit that never comes (failpoint ``receiver.commit``: C takes the whole
  cycle and then hangs, as on a dead disk).  Before, each cycle waited up to an
  hour (``apply_timeout``) for that commit, holding B up with it.

Each time, ``mirror sync v --to B`` returns with B holding every write made
before it, B keeps getting cycles, C's image stays the cycle it held, and
once C answers again it catches up with a delta (its only full copy is its
first).
"""

import json
import os
import signal

import pytest

from tests.support.daemons import DaemonPool, free_port, make_key, wait_for
from tests.test_e2e_one_target import export, full_copies, image, row_of, write

MiB = 1 << 20
LINK = ("--link-timeout", "3")


@pytest.fixture
def rig(tmp_path):
    key = make_key(tmp_path / "mirror.key")
    with DaemonPool(tmp_path) as pool:
        b = pool.start("b", key_file=key, listen=True, nbd=False, extra=LINK)
        c = pool.start("c", key_file=key, nbd=False,
                       extra=(*LINK, "--listen", f"127.0.0.1:{free_port()}"))
        a = pool.start("a", key_file=key, extra=LINK)
        try:
            yield a, b, c
        finally:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGCONT)  # a stopped daemon cannot take SIGTERM


def b_goes_on(a, b, c, held_c: int, tmp_path, what: str) -> None:
    """While C answers nothing: a sync to B returns with every write, B keeps cycling."""
    write(a, "v", 1 * MiB, os.urandom(64 * 1024))
    expected = export(a, "v", tmp_path / f"{what}.img")
    (rb,) = json.loads(a.cli("mirror", "sync", "v", "--to", b.listen, "--timeout", "40",
                             "--json").stdout)
    assert rb["target"] == b.listen and rb["synced"] is True, rb
    assert image(b, a, "v") == expected  # nothing written since that sync
    k = rb["applied_cycle"]
    wait_for(lambda: row_of(a, "v", b)["applied_cycle"] >= k + 1, 40,
             f"B to get cycles at its interval while C {what}")
    assert row_of(a, "v", c)["applied_cycle"] == held_c


def c_catches_up(a, c, held_c: int, tmp_path, what: str) -> int:
    (rc,) = json.loads(a.cli("mirror", "sync", "v", "--to", c.listen, "--timeout", "60",
                             "--json").stdout)
    assert rc["synced"] is True and rc["applied_cycle"] > held_c, rc
    assert full_copies(a, "v", c) == 1, a.log()[-3000:]  # a delta, not a second full copy
    assert image(c, a, "v") == export(a, "v", tmp_path / f"after-{what}.img")
    return rc["applied_cycle"]


def test_a_stopped_or_hung_target_holds_up_neither_the_other_target_nor_its_sync(
        rig, tmp_path):
    a, b, c = rig
    a.cli("volume", "create", "v", "--size", "8M")
    write(a, "v", 0, os.urandom(4 * MiB))
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "1", "--compress", "none")
    a.cli("mirror", "start", "v", "--to", c.listen)
    a.cli("mirror", "sync", "v", "--timeout", "60")
    held_c = row_of(a, "v", c)["applied_cycle"]

    c_image = image(c, a, "v")
    c.proc.send_signal(signal.SIGSTOP)
    try:
        b_goes_on(a, b, c, held_c, tmp_path, "is stopped")
    finally:
        c.proc.send_signal(signal.SIGCONT)
    assert image(c, a, "v") == c_image  # what C held stays one cycle, untouched
    held_c = c_catches_up(a, c, held_c, tmp_path, "the stop")

    # C takes every byte of the next cycle and never commits it.
    c.kill()
    c.args += ["--failpoint", "receiver.commit=60"]
    c.start()
    c_image = image(c, a, "v")
    b_goes_on(a, b, c, held_c, tmp_path, "hangs in its commit")
    assert "had not committed cycle" in a.log(), a.log()[-3000:]
    assert image(c, a, "v") == c_image
    c.kill()
    c.args = c.args[:-2]
    c.start()
    c_catches_up(a, c, held_c, tmp_path, "the hang")
