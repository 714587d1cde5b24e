"""Failover between two real daemons: roles, generations, promote, a demoted former primary.

Both hosts are ``cyclemirror serve`` subprocesses (each a source and a target),
driven through the real CLI; data goes in and comes out through real NBD
clients (qemu-io).  docs/failover.md describes what is checked here.
"""

from __future__ import annotations

import json

import pytest

from tests.support.daemons import DaemonPool, make_key, wait_for
from tests.support.nbd import run
from tests.support.tools import require_tool

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def pair(tmp_path):
    require_tool("qemu-io")
    key = make_key(tmp_path / "mirror.key")
    with DaemonPool(tmp_path) as pool:
        a = pool.start("a", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hosta"))
        b = pool.start("b", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hostb"))
        yield pool, a, b


def uri(d, name: str) -> str:
    return f"nbd+unix:///{name}?socket={d.nbd_sock}"


def qemu_io(d, name: str, command: str, check: bool = True):
    """One qemu-io command; a write is followed by a flush (acknowledged = durable)."""
    if command.startswith("write"):
        return run("qemu-io", "-f", "raw", "-c", command, "-c", "flush", uri(d, name),
                   check=check)
    return run("qemu-io", "-r", "-f", "raw", "-c", command, uri(d, name), check=check)


def read_ok(d, name: str, pattern: int, offset: int, length: int) -> bool:
    out = qemu_io(d, name, f"read -P {pattern} {offset} {length}", check=False)
    return out.returncode == 0 and b"Pattern verification failed" not in out.stdout


def role_row(d, volume: str) -> dict | None:
    for row in d.status().get("roles", []):
        if row.get("volume") == volume:
            return row
    return None


def mirrored_pair(a, b, *options: str):
    """Volume v on a, written and mirrored to b (with ``options``); the applied cycle."""
    a.cli("volume", "create", "v", "--size", str(SIZE))
    qemu_io(a, "v", f"write -P 1 0 {2 * MiB}")
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "0.2", *options)
    synced = json.loads(a.cli("mirror", "sync", "v", "--json").stdout)
    return synced[0]["applied_cycle"]


def test_roles_and_generations_are_recorded_on_both_sides(pair):
    _pool, a, b = pair
    cycle = mirrored_pair(a, b)
    rows = a.status()
    role = next(r for r in rows["roles"] if r["volume"] == "v")
    assert role["role"] == "primary"
    epoch = role["epoch"]
    mirror_row = rows["mirrors"][0]
    assert mirror_row["role"] == "primary"
    assert mirror_row["common_generation"] == f"{epoch}:{mirror_row['applied_cycle']}"
    assert mirror_row["applied_cycle"] >= cycle
    incoming = b.status()["incoming"][0]
    assert incoming["role"] == "secondary"
    assert incoming["epoch"] == epoch
    assert incoming["generation"] == f"{epoch}:{incoming['applied_cycle']}"
    table = a.cli("status").stdout
    assert "primary" in table and epoch in table


def test_promote_after_the_source_died_and_the_source_learns_it_was_demoted(pair, tmp_path):
    pool, a, b = pair
    mirrored_pair(a, b)
    a_epoch = role_row(a, "v")["epoch"]
    qemu_io(a, "v", f"write -P 3 {3 * MiB} 64k")  # after the last sync: never shipped
    a.kill()

    out = b.cli("mirror", "promote", "hosta/v", "--force", "--json")
    result = json.loads(out.stdout)
    assert result["volume"] == "v" and result["forced"] is True
    assert result["parent"].startswith(a_epoch + ":")
    assert b.status()["incoming"] == []  # the image is a volume now, not a mirror
    row = role_row(b, "v")
    assert row["role"] == "primary" and row["parent"] == result["parent"]
    assert row["promoted_from"]["forced"] is True
    # The volume is the image as of the last applied cycle, writable over NBD.
    assert read_ok(b, "v", 1, 0, 2 * MiB)
    assert read_ok(b, "v", 0, 3 * MiB, 64 * 1024)  # a's unshipped write is not here
    qemu_io(b, "v", f"write -P 2 {MiB} 64k")
    assert read_ok(b, "v", 2, MiB, 64 * 1024)

    # a comes back: its mirror to b is refused, it records that it was demoted ...
    a.start()
    wait_for(lambda: (role_row(a, "v") or {}).get("role") == "demoted", 60,
             "a to learn it was demoted")
    st = a.status()
    assert "is demoted" in (st["mirrors"][0]["last_error"] or "")
    assert st["mirrors"][0]["phase"] == "broken"
    assert "hostb promoted its image" in role_row(a, "v")["demoted"]["message"]
    assert "demoted" in a.cli("status").stdout
    # ... its volume takes no writes but reads work, and b's data is untouched.
    bad = qemu_io(a, "v", "write -P 9 0 4k", check=False)
    assert bad.returncode != 0 or b"Operation not permitted" in bad.stdout + bad.stderr
    assert read_ok(a, "v", 3, 3 * MiB, 64 * 1024)
    assert read_ok(b, "v", 2, MiB, 64 * 1024)
    assert read_ok(b, "v", 1, 0, MiB)
    # Resuming does not help: the demoted volume refuses to connect at all.
    a.cli("mirror", "resume", "v")
    wait_for(lambda: a.status()["mirrors"][0]["phase"] == "broken", 30, "the mirror to break")
    assert read_ok(b, "v", 2, MiB, 64 * 1024)


def test_promote_refusals_change_nothing(pair):
    _pool, a, b = pair
    mirrored_pair(a, b)
    before = b.status()["incoming"]
    for args, code in [
        (("hosta/nope",), 3),                  # no such mirror
        (("nope/v",), 3),                      # no such source
        (("hosta-v",), 2),                     # not SOURCE/VOLUME
        (("hosta/v", "--as", "../x"), 2),      # a bad volume name
        (("hosta/v",), 10),                    # the source is connected: wrong role
    ]:
        proc = b.cli("mirror", "promote", *args, check=False)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert "error" in proc.stderr
    proc = b.cli("mirror", "promote", "hosta/v", check=False)
    assert "mirror rm v" in proc.stderr and "--force" in proc.stderr
    b.cli("volume", "create", "taken", "--size", str(MiB))
    proc = b.cli("mirror", "promote", "hosta/v", "--as", "taken", check=False)
    assert proc.returncode == 4, proc.stderr
    after = b.status()["incoming"]
    # Still the same incoming image, still mirroring (cycles go on meanwhile).
    assert [(r["volume"], r["image"], r["generation"].split(":")[0]) for r in after] == [
        (r["volume"], r["image"], r["generation"].split(":")[0]) for r in before]
    assert after[0]["applied_cycle"] >= before[0]["applied_cycle"]
    assert "v" not in [v["name"] for v in b.status()["volumes"]]
    assert role_row(b, "v") is None
    # A planned promote: the source stops mirroring first, then a plain promote works.
    a.cli("mirror", "break", "v")
    a.cli("mirror", "rm", "v")
    wait_for(lambda: b.cli("mirror", "promote", "hosta/v", check=False).returncode == 0, 30,
             "the source's session to end")
    assert read_ok(b, "v", 1, 0, 2 * MiB)
    assert role_row(b, "v")["promoted_from"]["forced"] is False


def image_digest(d, export: str) -> str:
    import hashlib

    data = run("nbdcopy", uri(d, export), "-").stdout
    return hashlib.sha256(data).hexdigest()


def failed_over(a, b, *, a_writes: bool, options: tuple = ()):
    """a -> b mirrored, a killed (optionally after a write b never got), b promoted and
    written (64 KiB at 1 MiB, 128 KiB at 5 MiB), a restarted and demoted."""
    mirrored_pair(a, b, *options)
    if a_writes:
        qemu_io(a, "v", f"write -P 3 {3 * MiB} 64k")
    a.kill()
    b.cli("mirror", "promote", "hosta/v", "--force")
    qemu_io(b, "v", f"write -P 2 {MiB} 64k")
    qemu_io(b, "v", f"write -P 4 {5 * MiB} 128k")
    a.start()
    wait_for(lambda: (role_row(a, "v") or {}).get("role") == "demoted", 60,
             "a to learn it was demoted")
    return 192 * 1024  # the bytes b wrote since the promotion


def test_failback_ships_only_the_blocks_written_since_the_promotion(pair):
    require_tool("nbdcopy")
    _pool, a, b = pair
    written = failed_over(a, b, a_writes=False)
    b_epoch = role_row(b, "v")["epoch"]
    b.cli("mirror", "start", "v", "--to", a.listen, "--interval", "60", "--compress", "none")
    rows = json.loads(b.cli("mirror", "sync", "v", "--json").stdout)
    row = rows[0]
    assert row["phase"] != "broken", row
    # No full copy: the wire carried the written blocks once, plus framing and messages.
    assert row["shipped_bytes_total"] <= 1.1 * written, row
    assert row["shipped_bytes_total"] >= written
    incoming = a.status()["incoming"]
    assert len(incoming) == 1 and incoming[0]["source_name"] == "hostb"
    assert incoming[0]["epoch"] == b_epoch
    assert role_row(a, "v")["role"] == "secondary" and role_row(a, "v")["kept"] == []
    assert "v" not in [v["name"] for v in a.status()["volumes"]]
    # a's image equals b's volume, byte for byte.
    assert image_digest(a, "mirror/hostb/v") == image_digest(b, "v")
    assert read_ok(a, "mirror/hostb/v", 2, MiB, 64 * 1024)
    assert read_ok(a, "mirror/hostb/v", 1, 0, MiB)
    # More writes on b keep flowing to a as deltas.
    qemu_io(b, "v", f"write -P 5 {7 * MiB} 4k")
    b.cli("mirror", "sync", "v")
    assert image_digest(a, "mirror/hostb/v") == image_digest(b, "v")
    # Then a planned switchover back to a: every acknowledged write is there, and b gets
    # only the difference back (nothing: it was level).
    b.cli("mirror", "switchover", "v", "--to", a.listen)
    assert role_row(a, "v")["role"] == "primary"
    for pattern, offset, length in ((2, MiB, 64 * 1024), (4, 5 * MiB, 128 * 1024),
                                    (5, 7 * MiB, 4096), (1, 0, MiB)):
        assert read_ok(a, "v", pattern, offset, length)
    wait_for(lambda: a.status()["mirrors"], 60, "a's mirror back to b")
    rows = json.loads(a.cli("mirror", "sync", "v", "--json").stdout)
    assert rows[0]["shipped_bytes_total"] < 64 * 1024, rows
    assert image_digest(b, "mirror/hosta/v") == image_digest(a, "v")


def test_split_brain_is_refused_until_the_loser_is_named_and_its_data_is_kept(pair):
    require_tool("nbdcopy")
    _pool, a, b = pair
    failed_over(a, b, a_writes=True)
    b.cli("mirror", "start", "v", "--to", a.listen, "--interval", "60", "--compress", "none")
    wait_for(lambda: b.status()["mirrors"][0]["phase"] == "broken", 60, "the refusal")
    error = b.status()["mirrors"][0]["last_error"]
    assert "split brain" in error and "hosta" in error and "hostb" in error, error
    assert "wrote 65536 bytes" in error and "wrote 196608 bytes" in error, error
    # Nothing changed on a: its volume is there, demoted, with its own write.
    assert "v" in [v["name"] for v in a.status()["volumes"]]
    assert a.status()["incoming"] == []
    assert read_ok(a, "v", 3, 3 * MiB, 64 * 1024)
    # Bad words are refused.
    assert b.cli("mirror", "resolve", "nope", "--discard-changes-on", "hosta",
                 check=False).returncode == 10
    assert b.cli("mirror", "resolve", "v", "--discard-changes-on", "hostc",
                 check=False).returncode == 2
    # (Naming hostb itself is the other choice: the test below.)
    # The user names the loser; the mirror goes on as a delta, a's writes kept aside.
    b.cli("mirror", "resolve", "v", "--discard-changes-on", "hosta")
    b.cli("mirror", "resume", "v")
    b.cli("mirror", "sync", "v")
    assert image_digest(a, "mirror/hostb/v") == image_digest(b, "v")
    kept = role_row(a, "v")["kept"]
    assert len(kept) == 1 and kept[0]["bytes"] == 65536, kept
    with open(kept[0]["path"], "rb") as f:
        f.seek(3 * MiB)
        assert f.read(65536) == b"\x03" * 65536
    assert kept[0]["path"] in a.cli("status").stdout


def image_bytes(d, export: str) -> bytes:
    return run("nbdcopy", uri(d, export), "-").stdout


def test_switchover_and_back_loses_no_acknowledged_write_and_ships_only_the_difference(pair):
    from tests.support import nbd_rawclient as C

    require_tool("nbdcopy")
    _pool, a, b = pair
    mirrored_pair(a, b)
    # One long-lived NBD connection to a's volume, as an application holds it.
    sock = C.connect_unix(a.nbd_sock)
    try:
        C.open_export(sock, "v", structured=False)
        replies = C.ReplyReader(sock, False)
        acked = []
        for i in range(64):
            offset, data = 2 * MiB + i * 4096, bytes([i + 10]) * 4096
            sock.sendall(C.request(C.CMD_WRITE, offset, 4096, handle=i + 1, payload=data))
            assert replies.next().error == 0
            acked.append((offset, data))
        out = json.loads(a.cli("mirror", "switchover", "v", "--to", b.listen, "--json").stdout)
        assert out["to"] == b.listen and out["mirroring_back_to"] == a.listen
        # The old connection: writes fail with EPERM (1).  (Its reads work until the
        # mirror back turns the volume into the new primary's image, docs/failover.md.)
        sock.sendall(C.request(C.CMD_WRITE, 0, 4096, handle=100, payload=b"x" * 4096))
        assert replies.next().error == 1
    finally:
        sock.close()
    # Every acknowledged write is on the new primary.
    image = image_bytes(b, "v")
    for offset, data in acked:
        assert image[offset:offset + 4096] == data
    assert role_row(b, "v")["role"] == "primary"
    assert role_row(b, "v")["promoted_from"]["forced"] is False
    # b mirrors back to a without a full copy; a's volume became b's image.
    wait_for(lambda: [r for r in a.status()["incoming"] if r["source_name"] == "hostb"], 60,
             "the mirror back to a")
    qemu_io(b, "v", f"write -P 6 {6 * MiB} 64k")
    rows = json.loads(b.cli("mirror", "sync", "v", "--json").stdout)
    assert rows[0]["shipped_bytes_total"] < SIZE // 4, rows  # no full copy
    assert image_digest(a, "mirror/hostb/v") == image_digest(b, "v")
    assert role_row(a, "v")["role"] == "secondary"
    # And back again: a is primary, b mirrors a, nothing lost either way.
    out = json.loads(b.cli("mirror", "switchover", "v", "--to", a.listen, "--json").stdout)
    assert role_row(a, "v")["role"] == "primary"
    assert read_ok(a, "v", 6, 6 * MiB, 64 * 1024)
    qemu_io(a, "v", f"write -P 7 {7 * MiB} 4k")
    wait_for(lambda: a.status()["mirrors"], 60, "a's mirror back to b")
    rows = json.loads(a.cli("mirror", "sync", "v", "--json").stdout)
    assert rows[0]["shipped_bytes_total"] < SIZE // 4, rows
    assert image_digest(b, "mirror/hosta/v") == image_digest(a, "v")
    assert image_bytes(a, "v")[2 * MiB:2 * MiB + 4096] == acked[0][1]


def test_switchover_refusals_change_nothing(pair):
    _pool, a, b = pair
    mirrored_pair(a, b)
    for args, code in [
        (("nope", "--to", b.listen), 3),        # not mirrored
        (("v", "--to", "127.0.0.1:1"), 3),      # not one of its targets
    ]:
        proc = a.cli("mirror", "switchover", *args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
    proc = b.cli("mirror", "switchover", "v", "--to", a.listen, check=False)
    assert proc.returncode == 3, proc.stderr  # b is the target, not the source
    assert role_row(a, "v")["role"] == "primary"
    qemu_io(a, "v", "write -P 8 0 4k")          # still writable
    a.cli("mirror", "sync", "v")


def test_a_clone_is_writable_while_mirroring_into_the_image_goes_on(pair):
    require_tool("nbdcopy")
    _pool, a, b = pair
    mirrored_pair(a, b)
    out = json.loads(b.cli("mirror", "clone", "hosta/v", "drill", "--json").stdout)
    assert out["volume"] == "drill" and out["cycle"] >= 1
    # The clone is writable; its writes never reach the mirror image.
    qemu_io(b, "drill", f"write -P 9 0 {MiB}")
    assert read_ok(b, "drill", 9, 0, MiB)
    # Mirroring goes on meanwhile: a writes, cycles apply into the image.
    qemu_io(a, "v", f"write -P 6 {4 * MiB} 64k")
    before = b.status()["incoming"][0]["applied_cycle"]
    a.cli("mirror", "sync", "v")
    assert b.status()["incoming"][0]["applied_cycle"] > before
    assert image_digest(b, "mirror/hosta/v") == image_digest(a, "v")
    assert read_ok(b, "mirror/hosta/v", 1, 0, MiB)
    assert read_ok(b, "drill", 0, 4 * MiB, 64 * 1024)  # a's later write is not in the clone
    # Bad input changes nothing; volume rm removes the clone.
    for args, code in [(("hosta/nope", "x"), 3), (("hosta/v", "drill"), 4),
                       (("hosta/v", "../x"), 2), (("hostav", "x"), 2)]:
        proc = b.cli("mirror", "clone", *args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
    b.cli("volume", "rm", "drill")
    assert [v["name"] for v in b.status()["volumes"]] == []
    assert image_digest(b, "mirror/hosta/v") == image_digest(a, "v")


def test_a_source_lying_about_its_generation_is_refused_over_the_wire(pair):
    from cyclemirror.store import roles

    _pool, a, b = pair
    mirrored_pair(a, b)
    a.stop()
    before = b.status()["incoming"][0]  # after the stop: no cycle applies any more
    rec = roles.load_role(a.store, "v")
    rec.epoch = "0123456789abcdef"  # a lineage b never saw
    roles.save_role(a.store, rec)
    a.start()
    wait_for(lambda: a.status()["mirrors"][0]["phase"] == "broken", 60, "the refusal")
    error = a.status()["mirrors"][0]["last_error"]
    assert "share no cycle" in error and before["generation"] in error, error
    after = b.status()["incoming"][0]
    assert (after["applied_cycle"], after["generation"]) == (before["applied_cycle"],
                                                            before["generation"])


def test_reinstate_after_a_lost_switchover_answer_only_when_the_target_did_not_promote(
        pair):
    import subprocess
    import sys

    from tests.support.daemons import cli_env

    _pool, a, b = pair
    mirrored_pair(a, b)
    # Bad words first: nothing to reinstate on a primary, no such volume.
    assert a.cli("mirror", "reinstate", "v", check=False).returncode == 10
    assert a.cli("mirror", "reinstate", "nope", check=False).returncode == 3
    # The target sleeps inside its promotion, before the commit point, and dies there:
    # the source asked, got no answer, and stays demoted with its writes held.
    b.stop()
    b.args[b.args.index("--listen") + 1] = b.listen  # the source knows it at this address
    b.args += ["--failpoint", "promote.prepared=60"]
    b.start()
    switch = subprocess.Popen(
        [sys.executable, "-m", "cyclemirror.cli", "--store", a.store, "mirror", "switchover",
         "v", "--to", b.listen], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env())
    try:
        wait_for(lambda: "recording the promotion" in b.log(), 60, "b inside its promotion")
        b.kill()
        _out, err = switch.communicate(timeout=60)
    finally:
        if switch.poll() is None:
            switch.kill()
    assert switch.returncode == 10 and "mirror reinstate v" in err, err
    assert role_row(a, "v")["role"] == "demoted"
    assert qemu_io(a, "v", "write -P 9 0 4k", check=False).returncode != 0
    # The target cannot be asked: refused (it might have promoted), nothing changed.
    proc = a.cli("mirror", "reinstate", "v", check=False)
    assert proc.returncode == 10 and "--force" in proc.stderr and b.listen in proc.stderr
    assert role_row(a, "v")["role"] == "demoted"
    # With --force it goes on, saying the risk (a target asked and answering is the
    # split-brain test below: "holds the image").
    proc = a.cli("mirror", "reinstate", "v", "--force")
    assert "warning: forced" in proc.stderr and "both are primary" in proc.stderr, proc
    assert role_row(a, "v")["role"] == "primary"
    qemu_io(a, "v", f"write -P 9 {4 * MiB} 4k")  # writable again, on a new connection
    # The target comes back: it had not promoted (its image is still a mirror), and the
    # resumed mirror brings it up to date.
    b.args = b.args[:-2]
    b.start()
    assert [r["volume"] for r in b.status()["incoming"]] == ["v"]
    rows = json.loads(a.cli("mirror", "sync", "v", "--json").stdout)
    assert rows[0]["phase"] != "broken", rows
    assert image_digest(b, "mirror/hosta/v") == image_digest(a, "v")
    # Now the target does promote (forced): a is told it is demoted, and a reinstate is
    # refused because the target answers that it is primary.
    b.cli("mirror", "promote", "hosta/v", "--force")  # cuts a's session: a reconnects
    wait_for(lambda: role_row(a, "v")["role"] == "demoted", 60, "a to learn it was demoted")
    proc = a.cli("mirror", "reinstate", "v", "--force", check=False)
    assert proc.returncode == 10 and "promoted its copy" in proc.stderr, proc.stderr
    assert role_row(a, "v")["role"] == "demoted"


def test_split_brain_won_by_the_old_primary_resyncs_the_new_one_by_the_differing_blocks(
        pair):
    require_tool("nbdcopy")
    _pool, a, b = pair
    # a: 64 KiB at 3 MiB; b: 64 KiB at 1 MiB and 128 KiB at 5 MiB (a mirrors uncompressed,
    # so its wire bytes count the blocks it ships).
    failed_over(a, b, a_writes=True, options=("--compress", "none"))
    k = role_row(b, "v")["promoted_from"]["cycle"]
    b.cli("mirror", "start", "v", "--to", a.listen, "--interval", "60", "--compress", "none")
    wait_for(lambda: b.status()["mirrors"][0]["phase"] == "broken", 60, "the refusal")
    assert "split brain" in b.status()["mirrors"][0]["last_error"]
    # No side named: refused by the command line, nothing changed.
    proc = b.cli("mirror", "resolve", "v", check=False)
    assert proc.returncode == 2 and "--discard-changes-on" in proc.stderr, proc.stderr
    assert role_row(b, "v")["role"] == "primary"
    # The user names the new primary (this node) as the loser: its writes since the
    # promotion are kept in a file here, and its volume is a's mirror image again.
    out = json.loads(b.cli("mirror", "resolve", "v", "--discard-changes-on", "hostb",
                           "--json").stdout)
    assert out["discarded_here"] and out["cycle"] == k and out["volumes"] == ["v"], out
    assert "mirror reinstate" in out["next"], out
    assert [kp["bytes"] for kp in out["kept"]] == [196608], out
    with open(out["kept"][0]["path"], "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x02" * 65536
    assert "v" not in [v["name"] for v in b.status()["volumes"]]
    assert b.status()["mirrors"] == []
    incoming = b.status()["incoming"]
    assert [(r["source_name"], r["volume"], r["applied_cycle"]) for r in incoming] == [
        ("hosta", "v", k)], incoming
    assert role_row(b, "v")["role"] == "secondary" and role_row(b, "v")["kept"] == out["kept"]
    assert read_ok(b, "mirror/hosta/v", 1, MiB, 65536)  # back to cycle k's content
    # The old primary takes its demotion back (b says it holds the image, not promoted)
    # and ships only what it wrote since cycle k.
    rein = json.loads(a.cli("mirror", "reinstate", "v", "--json").stdout)
    assert [x["answer"] for x in rein["asked"]] == ["holds the image"], rein
    assert role_row(a, "v")["role"] == "primary"
    rows = json.loads(a.cli("mirror", "sync", "v", "--json").stdout)
    assert rows[0]["phase"] != "broken", rows
    assert 65536 <= rows[0]["shipped_bytes_total"] <= 1.1 * 65536, rows
    assert image_digest(b, "mirror/hosta/v") == image_digest(a, "v")
    assert read_ok(b, "mirror/hosta/v", 3, 3 * MiB, 65536)
    qemu_io(a, "v", f"write -P 6 {6 * MiB} 4k")  # a is primary and writable again
