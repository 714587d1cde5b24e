"""One target at a time, end to end through the CLI with real daemons in subprocesses.

Proves, for a fan-out A -> B and A -> C: with C killed, ``mirror sync --to B``
succeeds and a plain ``mirror sync`` says it did not wait for C; C restarted
catches up with a delta (the bytes shipped, read from status, are the change,
not the volume); C is broken and removed and D added while B keeps getting
deltas from the same cycle loop; on a target, ``mirror rm SOURCE/VOLUME`` is
refused while the source sends and allowed after a break or with --force; and
every new form's bad input gets its documented exit code and changes nothing.
"""

import json
import os
import re

import pytest

from cyclemirror import errors
from cyclemirror.daemon.nbd_client import NbdClient
from tests.support.daemons import DaemonPool, free_port, make_key, wait_for

MiB = 1 << 20
MANUAL = "3600"  # cycles only when a test asks (sync)


@pytest.fixture
def daemons(tmp_path):
    with DaemonPool(tmp_path) as pool:
        yield pool.start


@pytest.fixture
def key(tmp_path):
    return make_key(tmp_path / "mirror.key")


def write(daemon, volume, offset, data):
    with NbdClient(volume, unix_path=daemon.nbd_sock) as nbd:
        nbd.write(offset, data)
        nbd.flush()


def export(daemon, volume, path) -> bytes:
    daemon.cli("volume", "export", volume, "--to", path)
    with open(path, "rb") as fh:
        return fh.read()


def row_of(source, volume, target) -> dict:
    rows = [m for m in source.status()["mirrors"]
            if m["volume"] == volume and m["target"] == target.listen]
    assert len(rows) == 1, source.status()["mirrors"]
    return rows[0]


def incoming(target, source, volume) -> dict | None:
    rows = [m for m in target.status()["incoming"]
            if m["source_node"] == source.node_id and m["volume"] == volume]
    return rows[0] if rows else None


def image(target, source, volume) -> bytes:
    with open(incoming(target, source, volume)["image"], "rb") as fh:
        return fh.read()


def full_copies(source, volume, target) -> int:
    return len(re.findall(rf"mirror {volume} -> {re.escape(target.listen)}: cycle \d+ "
                          r"applied.*full copy", source.log()))


def test_one_target_down_the_others_sync_and_it_catches_up_with_a_delta(
        daemons, key, tmp_path):
    port_c = free_port()
    b = daemons("b", key_file=key, listen=True, nbd=False)
    c = daemons("c", key_file=key, nbd=False, extra=("--listen", f"127.0.0.1:{port_c}"))
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "16M")
    write(a, "v", 0, os.urandom(8 * MiB))
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", MANUAL, "--compress", "none")
    a.cli("mirror", "start", "v", "--to", c.listen)
    a.cli("mirror", "sync", "v", "--timeout", "60")
    c_applied = row_of(a, "v", c)["applied_cycle"]
    c.kill()

    # One target named: that one only, while C is down.
    write(a, "v", 1 * MiB, os.urandom(256 * 1024))
    (row_b,) = json.loads(a.cli("mirror", "sync", "v", "--to", b.listen, "--timeout", "60",
                                "--json").stdout)
    assert row_b["target"] == b.listen and row_b["synced"] is True
    assert row_b["applied_cycle"] > c_applied
    assert image(b, a, "v") == export(a, "v", tmp_path / "e1")

    # No target named: every one that is up; C is named as not waited for, and why.
    write(a, "v", 3 * MiB, os.urandom(512 * 1024))
    proc = a.cli("mirror", "sync", "v", "--timeout", "60")
    assert f"v -> {c.listen}: not waited for: down, retrying" in proc.stdout, proc.stdout
    assert f"v -> {b.listen}: cycle" in proc.stdout
    rows = {r["target"]: r for r in json.loads(
        a.cli("mirror", "sync", "v", "--timeout", "60", "--json").stdout)}
    assert rows[b.listen]["synced"] is True and rows[b.listen]["skipped"] is None
    assert rows[c.listen]["synced"] is False and "down" in rows[c.listen]["skipped"]
    assert image(b, a, "v") == export(a, "v", tmp_path / "e2")
    # Named, C is waited for until the deadline: exit 8, saying where it stands.
    late = a.cli("mirror", "sync", "v", "--to", c.listen, "--timeout", "2", check=False)
    assert late.returncode == errors.DeadlineError.exit_code, late.stderr
    assert c.listen in late.stderr

    # C back: one delta of what it missed (768 KiB written), not the 16 MiB volume.
    c.start()
    (row_c,) = json.loads(a.cli("mirror", "sync", "v", "--to", c.listen, "--timeout", "60",
                                "--json").stdout)
    assert row_c["last_cycle"]["full"] is False
    assert row_c["last_cycle"]["raw_bytes"] == 768 * 1024, row_c["last_cycle"]
    assert row_c["last_cycle"]["bytes"] < 1 * MiB
    assert full_copies(a, "v", c) == 1  # only its first cycle
    assert image(c, a, "v") == export(a, "v", tmp_path / "e3")


def test_break_rm_and_add_one_target_while_the_other_keeps_getting_deltas(
        daemons, key, tmp_path):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    c = daemons("c", key_file=key, listen=True, nbd=False)
    d = daemons("d", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "8M")
    write(a, "v", 0, os.urandom(4 * MiB))
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", MANUAL, "--compress", "none")
    a.cli("mirror", "start", "v", "--to", c.listen)
    a.cli("mirror", "sync", "v", "--timeout", "60")

    # Break C alone: B goes on cycling, C keeps its image.
    out = a.cli("mirror", "break", "v", "--to", c.listen).stdout
    assert f"v -> {c.listen}: broken" in out and b.listen not in out
    assert row_of(a, "v", c)["phase"] == "broken"
    c_image = image(c, a, "v")
    write(a, "v", 0, os.urandom(64 * 1024))
    proc = a.cli("mirror", "sync", "v", "--timeout", "60")
    assert f"v -> {c.listen}: not waited for: broken" in proc.stdout, proc.stdout
    assert row_of(a, "v", b)["phase"] != "broken"
    assert image(c, a, "v") == c_image
    refused = a.cli("mirror", "sync", "v", "--to", c.listen, check=False)
    assert refused.returncode == errors.UsageError.exit_code and "resume" in refused.stderr

    # Resume C alone: one delta of what it missed; B is not touched.  (The resume asks
    # for a cycle itself: count every cycle C got since its break.)
    c_before = row_of(a, "v", c)["applied_cycle"]
    out = a.cli("mirror", "resume", "v", "--to", c.listen).stdout
    assert c.listen in out and b.listen not in out
    a.cli("mirror", "sync", "v", "--to", c.listen, "--timeout", "60")
    wait_for(lambda: raw_since(a, c, c_before, "v") == 64 * 1024, 10,
             f"C's catch-up to carry the 64 KiB ({raw_since(a, c, c_before, 'v')} so far)")
    assert full_copies(a, "v", c) == 1
    assert image(c, a, "v") == export(a, "v", tmp_path / "e1")

    # Remove C (after its break), add D: D gets its full copy, B keeps getting deltas.
    a.cli("mirror", "break", "v", "--to", c.listen)
    running = a.cli("mirror", "rm", "v", check=False)
    assert running.returncode == errors.UsageError.exit_code  # B still runs
    a.cli("mirror", "rm", "v", "--to", c.listen)
    assert {m["target"] for m in a.status()["mirrors"]} == {b.listen}
    a.cli("mirror", "start", "v", "--to", d.listen)
    assert f"mirror v: target {d.listen} added" in a.log()
    write(a, "v", 2 * MiB, os.urandom(128 * 1024))
    rows = {r["target"]: r for r in json.loads(
        a.cli("mirror", "sync", "v", "--timeout", "60", "--json").stdout)}
    assert set(rows) == {b.listen, d.listen}
    assert rows[d.listen]["synced"] and rows[b.listen]["synced"]
    assert full_copies(a, "v", b) == 1 and full_copies(a, "v", d) == 1
    assert rows[b.listen]["last_cycle"]["full"] is False
    assert rows[b.listen]["last_cycle"]["raw_bytes"] <= 128 * 1024
    source = export(a, "v", tmp_path / "e2")
    assert image(b, a, "v") == source and image(d, a, "v") == source


def test_target_side_rm_is_refused_while_the_source_sends(daemons, key):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "2M")
    write(a, "v", 0, os.urandom(MiB))
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", MANUAL)
    a.cli("mirror", "sync", "v", "--timeout", "60")
    name = f"{a.status()['node']['name']}/v"
    before = b.status()["incoming"]

    busy = b.cli("mirror", "rm", name, check=False)
    assert busy.returncode == errors.UsageError.exit_code, busy.stderr
    assert "connected" in busy.stderr and "--force" in busy.stderr
    assert brief(b.status()["incoming"]) == brief(before)  # nothing changed

    # After a break on the source its connection is closed: rm goes through.
    a.cli("mirror", "break", "v")
    wait_for(lambda: b.cli("mirror", "rm", name, check=False).returncode == 0, 30,
             "the target to let the mirror go after the break")
    assert incoming(b, a, "v") is None
    assert not [f for f in os.listdir(os.path.join(b.store, "mirrors", a.node_id))
                if f.startswith("v.")] if os.path.isdir(
        os.path.join(b.store, "mirrors", a.node_id)) else True

    # A source that sends again; --force removes it anyway, and the source starts over.
    a.cli("mirror", "resume", "v")
    a.cli("mirror", "sync", "v", "--timeout", "60")
    assert incoming(b, a, "v") is not None
    out = b.cli("mirror", "rm", f"{a.node_id}/v", "--force").stdout
    assert "removed incoming mirror" in out and "v.img" in out
    assert incoming(b, a, "v") is None or incoming(b, a, "v")["applied_cycle"] >= 1
    a.cli("mirror", "sync", "v", "--timeout", "60")
    assert incoming(b, a, "v")["applied_cycle"] >= 1


def test_bad_input_of_the_one_target_forms_is_refused_and_changes_nothing(daemons, key):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "1M")
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", MANUAL)
    a.cli("mirror", "sync", "v", "--timeout", "60")
    a_before, b_before = a.status()["mirrors"], b.status()["incoming"]
    nowhere = f"127.0.0.1:{free_port()}"
    cases = [
        (a, ("mirror", "sync", "v", "--to", nowhere), errors.NotFoundError, nowhere),
        (a, ("mirror", "break", "v", "--to", nowhere), errors.NotFoundError, nowhere),
        (a, ("mirror", "resume", "v", "--to", nowhere), errors.NotFoundError, nowhere),
        (a, ("mirror", "rm", "v", "--to", nowhere), errors.NotFoundError, nowhere),
        (a, ("mirror", "sync", "nope", "--to", b.listen), errors.NotFoundError, "nope"),
        (a, ("mirror", "rm", "v", "--force"), errors.UsageError, "--force"),
        (a, ("mirror", "rm", "v", "--to", b.listen), errors.UsageError, "break it first"),
        # wrong side: an incoming mirror named on the source, an outgoing one on the target
        (a, ("mirror", "rm", f"{b.node_id}/v"), errors.NotFoundError, "incoming"),
        (b, ("mirror", "rm", "v"), errors.NotFoundError, f"{a.status()['node']['name']}/v"),
        (b, ("mirror", "rm", "nosuchsource/v"), errors.NotFoundError, "incoming mirrors"),
        (b, ("mirror", "rm", f"{a.node_id}/v", "--to", b.listen), errors.UsageError, "--to"),
    ]
    for daemon, args, exc, words in cases:
        proc = daemon.cli(*args, check=False)
        assert proc.returncode == exc.exit_code, (args, proc.stderr)
        assert words in proc.stderr, (args, proc.stderr)
        assert proc.stderr.startswith("cyclemirror: error: ") and proc.stderr.count("\n") == 1
    assert brief(a.status()["mirrors"]) == brief(a_before)
    assert brief(b.status()["incoming"]) == brief(b_before)


def brief(rows) -> list:
    return sorted((r["volume"], r.get("target"), r.get("phase"), r["applied_cycle"])
                  for r in rows)


def test_group_members_join_and_leave_without_a_full_copy_of_the_others(
        daemons, key, tmp_path):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    for name in ("db", "log"):
        a.cli("volume", "create", name, "--size", "4M")
        write(a, name, 0, os.urandom(2 * MiB))
        a.cli("mirror", "start", name, "--to", b.listen, "--interval", MANUAL,
              "--compress", "none", "--group", "app")
    a.cli("mirror", "sync", "db", "--timeout", "60")
    group_mirror = row_of(a, "db", b)["target_mirror"]
    c0 = row_of(a, "db", b)["applied_cycle"]

    # idx joins: the same mirror on the target; the next cycle is a delta carrying
    # db's change and all of idx, never db and log again.
    a.cli("volume", "create", "idx", "--size", "2M")
    write(a, "idx", 0, os.urandom(512 * 1024))
    a.cli("mirror", "start", "idx", "--to", b.listen, "--group", "app")
    assert row_of(a, "idx", b)["target_mirror"] == group_mirror
    write(a, "db", 3 * MiB, os.urandom(4096))
    rows = {r["volume"]: r for r in json.loads(
        a.cli("mirror", "sync", "db", "--timeout", "60", "--json").stdout)}
    assert set(rows) == {"db", "log", "idx"}
    # (the restarted driver may freeze at once, so count every cycle since the join)
    wait_for(lambda: raw_since(a, b, c0) == 4096 + 512 * 1024, 10,
             f"the cycles since {c0} to carry 4 KiB of db and 512 KiB of idx "
             f"({raw_since(a, b, c0)} so far)")
    members = {m["volume"]: m for m in b.status()["incoming"] if m["group"] == group_mirror}
    assert set(members) == {"db", "log", "idx"}
    assert not any(m["joining"] for m in members.values())
    for name in ("db", "log", "idx"):
        assert image(b, a, name) == export(a, name, tmp_path / f"{name}-1")

    # log leaves (after the group's break); the group resumes with a delta of idx only.
    a.cli("mirror", "break", "log")
    a.cli("mirror", "rm", "log")
    a.cli("mirror", "resume", "db")
    c1 = row_of(a, "db", b)["applied_cycle"]
    write(a, "idx", 1 * MiB, os.urandom(4096))
    rows = {r["volume"]: r for r in json.loads(
        a.cli("mirror", "sync", "idx", "--timeout", "60", "--json").stdout)}
    assert set(rows) == {"db", "idx"}
    assert rows["idx"]["target_mirror"] == group_mirror
    wait_for(lambda: raw_since(a, b, c1) == 4096, 10,
             f"the cycles since {c1} to carry 4 KiB of idx ({raw_since(a, b, c1)} so far)")
    members = {m["volume"]: m for m in b.status()["incoming"] if m["group"] == group_mirror}
    assert set(members) == {"db", "idx"}
    for name in ("db", "idx"):
        assert image(b, a, name) == export(a, name, tmp_path / f"{name}-2")
    # On the target, a member alone cannot be removed: the group's images go together.
    member = b.cli("mirror", "rm", f"{a.node_id}/db", check=False)
    assert member.returncode == errors.UsageError.exit_code
    assert f"{a.node_id}/{group_mirror}" in member.stderr
    fulls = re.findall(rf"mirror group app -> {re.escape(b.listen)}: cycle \d+ applied.*"
                       r"full copy", a.log())
    assert len(fulls) == 1, a.log()  # the group's very first cycle only


def raw_since(source, target, cycle: int, unit: str = "group app") -> int:
    """Data bytes of the cycles after ``cycle`` applied on ``target``, from the log."""
    found = re.findall(rf"mirror {unit} -> {re.escape(target.listen)}: cycle (\d+) applied, "
                       r"\d+ bytes sent \((\d+) raw\)", source.log())
    return sum(int(raw) for c, raw in found if int(c) > cycle)
