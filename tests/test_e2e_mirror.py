"""End to end through the CLI with real daemons in subprocesses: every mirror command,
fan-out with a target killed and restarted, fan-in, both directions, restarts
mid-cycle, and status/metrics figures checked against what was shipped.

Data goes in through the source daemon's NBD socket; the check is always the
strongest one available: the target's mirror image (a plain file) compared
byte for byte with an export of the source volume taken at a quiet moment.
"""

import json
import os
import re
import threading

import pytest

from cyclemirror import errors
from cyclemirror.daemon.nbd_client import NbdClient
from tests.support.daemons import DaemonPool, free_port, make_key, wait_for
from tests.support.metrics import parse_exposition, value

MiB = 1 << 20
# Cycles only when a test asks (sync), unless a test wants them repeating.
MANUAL = "3600"


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


def export(daemon, volume, path):
    daemon.cli("volume", "export", volume, "--to", path)
    with open(path, "rb") as fh:
        return fh.read()


def image_of(target, source_node, volume):
    rows = [m for m in target.status()["incoming"]
            if m["source_node"] == source_node and m["volume"] == volume]
    assert len(rows) == 1, target.status()["incoming"]
    with open(rows[0]["image"], "rb") as fh:
        return rows[0], fh.read()


def mirror_row(source, volume, target):
    rows = [m for m in source.status()["mirrors"]
            if m["volume"] == volume and m["target"] == target.listen]
    assert len(rows) == 1
    return rows[0]


def test_every_mirror_command_keeps_the_image_equal_to_the_source(daemons, key, tmp_path):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v1", "--size", "8M")
    first = os.urandom(2 * MiB)
    write(a, "v1", 1 * MiB, first)
    out = a.cli("mirror", "start", "v1", "--to", b.listen, "--interval", MANUAL,
                "--compress", "zstd:3", "--bwlimit", "64M").stdout
    assert f"mirroring v1 to {b.listen}" in out
    again = a.cli("mirror", "start", "v1", "--to", b.listen, check=False)
    assert again.returncode == errors.AlreadyExistsError.exit_code

    (synced,) = json.loads(a.cli("mirror", "sync", "v1", "--json").stdout)
    row, image = image_of(b, a.node_id, "v1")
    assert image == export(a, "v1", tmp_path / "e1")
    assert row["applied_cycle"] == synced["applied_cycle"] >= 1
    assert synced["compress"] == "zstd:3" and synced["bwlimit"] == 64 * MiB

    # break: later writes stay on the source, the image keeps the last freeze
    a.cli("mirror", "break", "v1")
    assert mirror_row(a, "v1", b)["phase"] == "broken"
    write(a, "v1", 0, b"after-break" * 1000)
    proc = a.cli("mirror", "sync", "v1", check=False)
    assert proc.returncode == errors.UsageError.exit_code and "resume" in proc.stderr
    assert image_of(b, a.node_id, "v1")[1] == image

    # resume ships only the change, and the image catches up
    a.cli("mirror", "resume", "v1")
    a.cli("mirror", "sync", "v1", "--to", b.listen, "--timeout", "60")
    row = mirror_row(a, "v1", b)
    assert row["last_cycle"]["raw_bytes"] <= 64 * 1024  # 11000 bytes dirty 3 blocks
    assert image_of(b, a.node_id, "v1")[1] == export(a, "v1", tmp_path / "e2")

    # break --now, then remove the mirror; the target keeps its image
    a.cli("mirror", "break", "v1", "--now")
    assert a.cli("mirror", "rm", "v1").returncode == 0
    assert a.status()["mirrors"] == []
    assert image_of(b, a.node_id, "v1")[0]["applied_cycle"] == row["applied_cycle"]
    missing = a.cli("mirror", "resume", "v1", check=False)
    assert missing.returncode == errors.NotFoundError.exit_code
    busy = a.cli("volume", "rm", "v1")
    assert busy.returncode == 0


def test_status_and_metrics_report_what_was_shipped(daemons, key):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "16M")
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", MANUAL, "--compress", "none")
    a.cli("mirror", "sync", "v")  # the empty volume (zero records), in one or two cycles
    before = mirror_row(a, "v", b)["applied_cycle"]
    payload = os.urandom(3 * MiB)
    write(a, "v", 4 * MiB, payload)
    a.cli("mirror", "sync", "v")
    row = mirror_row(a, "v", b)
    last = row["last_cycle"]
    # exactly the dirty blocks, uncompressed, plus frame headers and control messages
    assert last["raw_bytes"] == len(payload)
    assert len(payload) <= last["bytes"] <= len(payload) + 64 * 1024
    assert last["compression_ratio"] == pytest.approx(last["raw_bytes"] / last["bytes"])
    assert row["cycles_total"] == row["applied_cycle"] == before + 1
    assert row["phase"] == "idle" and row["last_error"] is None
    incoming, _ = image_of(b, a.node_id, "v")
    assert incoming["applied_cycle"] == before + 1
    assert incoming["freeze_time"] == pytest.approx(row["applied_freeze_time"], abs=0.5)

    _, samples = parse_exposition(a.scrape())
    lb = {"volume": "v", "target": b.listen}
    assert value(samples, "cyclemirror_mirror_applied_cycle", **lb) == before + 1
    assert value(samples, "cyclemirror_mirror_last_cycle_raw_bytes", **lb) == len(payload)
    assert value(samples, "cyclemirror_mirror_last_cycle_bytes", **lb) == last["bytes"]
    assert value(samples, "cyclemirror_mirror_cycles_total", **lb) == before + 1
    assert value(samples, "cyclemirror_mirror_shipped_bytes_total", **lb) == row[
        "shipped_bytes_total"] >= last["bytes"]
    assert value(samples, "cyclemirror_mirror_phase", phase="idle", **lb) == 1
    # the histograms saw every applied cycle (the RPO age from the second on: the
    # first one's predecessor is unknown to a fresh daemon)
    assert value(samples, "cyclemirror_mirror_cycle_duration_seconds_count", **lb) == before + 1
    assert value(samples, "cyclemirror_mirror_cycle_shipped_bytes_count", **lb) == before + 1
    assert value(samples, "cyclemirror_mirror_cycle_shipped_bytes_sum", **lb) == row[
        "shipped_bytes_total"]
    assert value(samples, "cyclemirror_mirror_cycle_shipped_bytes_bucket", le="+Inf",
                 **lb) == before + 1
    assert value(samples, "cyclemirror_mirror_rpo_age_before_apply_seconds_count", **lb) == before
    # and the daemon process itself
    assert value(samples, "process_resident_memory_bytes") > 1 << 20
    assert value(samples, "process_open_fds") > 0
    _, target_samples = parse_exposition(b.scrape())
    assert value(target_samples, "cyclemirror_incoming_applied_cycle", volume="v") == before + 1
    text = a.cli("status").stdout
    assert "v" in text and b.listen in text and "idle" in text
    log = a.log()
    assert f"mirror v -> {b.listen}: cycle {before + 1} applied" in log


def test_fan_out_survives_a_target_killed_and_restarted_with_a_delta(daemons, key, tmp_path):
    port_c = free_port()
    b = daemons("b", key_file=key, listen=True, nbd=False)
    c = daemons("c", key_file=key, nbd=False, extra=("--listen", f"127.0.0.1:{port_c}"))
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "16M")
    write(a, "v", 0, os.urandom(8 * MiB))
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "0.3")
    a.cli("mirror", "start", "v", "--to", c.listen)  # interval inherited: one cycle for both
    a.cli("mirror", "sync", "v", "--timeout", "60")
    c.kill()
    changed = os.urandom(1 * MiB)
    write(a, "v", 2 * MiB, changed)
    # b keeps getting cycles while c is gone; c reconnects in vain
    c_applied = mirror_row(a, "v", c)["applied_cycle"]
    wait_for(lambda: mirror_row(a, "v", b)["applied_cycle"] >= c_applied + 3, 30,
             "cycles to b while c is down")
    assert mirror_row(a, "v", c)["applied_cycle"] == c_applied
    c.start()
    wait_for(lambda: mirror_row(a, "v", c)["applied_cycle"] > c_applied, 60, "c to catch up")
    row_c = mirror_row(a, "v", c)
    # the catch-up carried the change (1 MiB), never the 8 MiB volume again
    assert row_c["last_cycle"]["raw_bytes"] <= 2 * MiB
    full_copies = re.findall(rf"mirror v -> {re.escape(c.listen)}: cycle \d+ applied.*full copy",
                             a.log())
    assert len(full_copies) == 1, a.log()  # only the very first cycle
    a.cli("mirror", "break", "v")
    source = export(a, "v", tmp_path / "src")
    assert image_of(b, a.node_id, "v")[1] == source
    assert image_of(c, a.node_id, "v")[1] == source
    # One target at a time: resuming b leaves c broken.
    out = a.cli("mirror", "resume", "v", "--to", b.listen).stdout
    assert b.listen in out and c.listen not in out
    assert mirror_row(a, "v", c)["phase"] == "broken"


def test_fan_in_two_stores_on_one_host_send_same_named_volumes_to_one_target(
        daemons, key, tmp_path):
    t = daemons("t", key_file=key, listen=True, nbd=False)
    s1 = daemons("s1", key_file=key)
    s2 = daemons("s2", key_file=key)
    assert s1.node_id != s2.node_id
    datas = {}
    for s in (s1, s2):
        s.cli("volume", "create", "data", "--size", "4M")
        datas[s.node_id] = os.urandom(1 * MiB)
        write(s, "data", 0, datas[s.node_id])
        s.cli("mirror", "start", "data", "--to", t.listen, "--interval", MANUAL)
    for s in (s1, s2):
        s.cli("mirror", "sync", "data")
    rows = t.status()["incoming"]
    assert sorted(r["source_node"] for r in rows) == sorted([s1.node_id, s2.node_id])
    assert len({r["image"] for r in rows}) == 2
    for s in (s1, s2):
        _, image = image_of(t, s.node_id, "data")
        assert image == export(s, "data", tmp_path / f"{s.name}.img")
        assert image[:MiB] == datas[s.node_id]


def test_both_directions_between_two_hosts_at_once(daemons, key, tmp_path):
    a = daemons("a", key_file=key, listen=True)
    b = daemons("b", key_file=key, listen=True)
    a.cli("volume", "create", "v1", "--size", "4M")
    b.cli("volume", "create", "v2", "--size", "4M")
    write(a, "v1", 0, os.urandom(MiB))
    write(b, "v2", MiB, os.urandom(MiB))
    a.cli("mirror", "start", "v1", "--to", b.listen, "--interval", "0.5")
    b.cli("mirror", "start", "v2", "--to", a.listen, "--interval", "0.5")
    write(a, "v1", 2 * MiB, os.urandom(MiB))
    write(b, "v2", 3 * MiB, os.urandom(MiB))
    a.cli("mirror", "sync", "v1")
    b.cli("mirror", "sync", "v2")
    a.cli("mirror", "break", "v1")
    b.cli("mirror", "break", "v2")
    assert image_of(b, a.node_id, "v1")[1] == export(a, "v1", tmp_path / "v1")
    assert image_of(a, b.node_id, "v2")[1] == export(b, "v2", tmp_path / "v2")
    # each side lists the other's mirror as incoming and its own as outgoing
    assert [m["volume"] for m in a.status()["mirrors"]] == ["v1"]
    assert [m["volume"] for m in a.status()["incoming"]] == ["v2"]


def test_source_daemon_killed_mid_cycle_resumes_where_it_was(daemons, key, tmp_path):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "16M")
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", MANUAL, "--compress", "none",
          "--bwlimit", "2M")
    a.cli("mirror", "sync", "v")
    write(a, "v", 0, os.urandom(8 * MiB))
    with_socket = a.cli("mirror", "sync", "v", "--timeout", "0.2", check=False)
    assert with_socket.returncode == errors.DeadlineError.exit_code
    # kill -9 once the target holds a few chunks of the 8 MiB cycle durably
    wait_for(lambda: (image_of(b, a.node_id, "v")[0]["receiving"] or {}).get("chunks", 0) >= 2,
             60, "the target to stage chunks")
    a.kill()
    image_before = image_of(b, a.node_id, "v")[1]
    assert image_before == bytes(16 * MiB)  # the half-received cycle is not visible
    a.start()  # no 'mirror start' again: the store remembers the mirror
    row = mirror_row(a, "v", b)
    assert row["phase"] != "broken"
    a.cli("mirror", "sync", "v", "--timeout", "60")
    row = mirror_row(a, "v", b)
    assert row["shipped_bytes_total"] < 8 * MiB  # resumed after the staged chunks
    resumed = re.findall(r"mirror v -> \S+: cycle \d+ applied, .* resumed after chunk (\d+)",
                         a.log())
    assert resumed and int(resumed[-1]) >= 2, a.log()
    assert image_of(b, a.node_id, "v")[1] == export(a, "v", tmp_path / "after")


def test_target_daemon_restarted_mid_cycle_keeps_a_consistent_image(daemons, key, tmp_path):
    port = free_port()
    b = daemons("b", key_file=key, nbd=False, extra=("--listen", f"127.0.0.1:{port}"))
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "16M")
    first = os.urandom(2 * MiB)
    write(a, "v", 0, first)
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", MANUAL, "--compress", "none",
          "--bwlimit", "2M")
    a.cli("mirror", "sync", "v", "--timeout", "60")
    applied = image_of(b, a.node_id, "v")[0]["applied_cycle"]
    write(a, "v", 0, os.urandom(8 * MiB))
    a.cli("mirror", "sync", "v", "--timeout", "0.2", check=False)
    wait_for(lambda: (image_of(b, a.node_id, "v")[0]["receiving"] or {}).get("chunks", 0) >= 2,
             60, "the target to stage chunks")
    b.kill()
    b.start()
    row, image = image_of(b, a.node_id, "v")
    assert row["applied_cycle"] == applied and image[:2 * MiB] == first  # the old freeze
    a.cli("mirror", "sync", "v", "--timeout", "60")
    assert image_of(b, a.node_id, "v")[1] == export(a, "v", tmp_path / "after")


def test_a_restarted_daemon_keeps_broken_mirrors_broken(daemons, key):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "1M")
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", MANUAL)
    a.cli("mirror", "sync", "v")
    a.cli("mirror", "break", "v")
    assert a.stop() == 0
    a.start()
    assert mirror_row(a, "v", b)["phase"] == "broken"
    a.cli("mirror", "resume", "v")
    a.cli("mirror", "sync", "v")
    assert mirror_row(a, "v", b)["applied_cycle"] >= 2


def test_a_long_first_cycle_shows_progress_with_rate_and_time_left(daemons, key):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "16M")
    write(a, "v", 0, os.urandom(8 * MiB))
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", MANUAL, "--compress", "none",
          "--bwlimit", "2M")

    def moving():
        row = mirror_row(a, "v", b)
        p = row["progress"]
        return p if p and p["done"] >= MiB else None

    p = wait_for(moving, 30, "the first cycle to report progress")
    assert p["cycle"] == 1 and 8 * MiB <= p["total"] <= 16 * MiB
    assert 0 < p["done"] < p["total"] and p["rate"] > 0 and p["eta"] > 0
    # exact counts from the driver (no estimate): compression off, so raw and wire agree
    assert "estimated" not in p and p["full"] is True and p["resumed_from"] == 0
    assert 0 < p["raw_bytes"] <= p["done"] and p["wire_bytes"] >= p["raw_bytes"]
    table = a.cli("status").stdout
    bar = [line for line in table.splitlines() if "ETA" in line]
    assert len(bar) == 1 and "[#" in bar[0] and "/s" in bar[0], table
    _, samples = parse_exposition(a.scrape())
    assert value(samples, "cyclemirror_mirror_progress_total_bytes", volume="v",
                 target=b.listen) == p["total"]
    a.cli("mirror", "sync", "v", "--timeout", "60")
    row = mirror_row(a, "v", b)
    assert row["progress"] is None
    # nothing was written since the first cycle's freeze: sync waited for that cycle
    assert row["applied_cycle"] == row["last_cycle"]["cycle"] == p["cycle"]


def test_a_wrong_key_or_dead_target_shows_in_status_logs_and_metrics(daemons, key, tmp_path):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "1M")
    a.cli("volume", "create", "w", "--size", "1M")
    other = make_key(tmp_path / "other.key")
    missing = a.cli("mirror", "start", "v", "--to", b.listen, "--key-file", tmp_path / "nokey",
                    check=False)
    assert missing.returncode == errors.UsageError.exit_code and "nokey" in missing.stderr
    a.cli("mirror", "start", "v", "--to", b.listen, "--key-file", other, "--interval", "0.5")
    dead = f"127.0.0.1:{free_port()}"
    a.cli("mirror", "start", "w", "--to", dead, "--interval", "0.5")

    def failing(volume, to):
        row = [m for m in a.status()["mirrors"] if m["volume"] == volume and m["target"] == to]
        return row[0] if row and row[0]["last_error"] else None

    bad = wait_for(lambda: failing("v", b.listen), 30, "the key mismatch to show")
    assert bad["phase"] == "broken" and "Authentication" in bad["last_error"]
    # the target saw the failed sessions too (its words depend on which side gave up first)
    assert any("session with 127.0.0.1" in e for e in b.status()["incoming_errors"])
    assert "recent errors of incoming sessions" in b.cli("status").stdout
    gone = wait_for(lambda: failing("w", dead), 30, "the dead target to show")
    assert gone["phase"] == "reconnecting" and gone["applied_cycle"] == 0
    _, samples = parse_exposition(a.scrape())
    assert value(samples, "cyclemirror_mirror_error", volume="v", target=b.listen) == 1
    assert value(samples, "cyclemirror_mirror_phase", phase="broken", volume="v",
                 target=b.listen) == 1
    log = a.log()
    assert f"mirror v -> {b.listen}: AuthenticationError" in log
    assert f"mirror w -> {dead}: ConnectionLostError" in log
    sync = a.cli("mirror", "sync", "v", "--timeout", "5", check=False)
    assert sync.returncode in (errors.PeerError.exit_code, errors.UsageError.exit_code)


def test_many_volumes_each_with_its_own_cycle(daemons, key, tmp_path):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    intervals = {"fast": "0.2", "slow": "2", "manual": MANUAL}
    for name, interval in intervals.items():
        a.cli("volume", "create", name, "--size", "2M")
        write(a, name, 0, os.urandom(256 * 1024))
        a.cli("mirror", "start", name, "--to", b.listen, "--interval", interval)
    wait_for(lambda: mirror_row(a, "fast", b)["applied_cycle"] >= 5, 30, "fast cycles")
    cycles = {name: mirror_row(a, name, b)["applied_cycle"] for name in intervals}
    # each repeats on its own interval: the manual one at most did its first cycle
    assert cycles["fast"] > cycles["slow"] and cycles["manual"] <= 1
    for name in intervals:
        a.cli("mirror", "sync", name)
        a.cli("mirror", "break", name)
        assert image_of(b, a.node_id, name)[1] == export(a, name, tmp_path / name)


def _counter(image: bytes, offset: int) -> int:
    return int.from_bytes(image[offset:offset + 8], "little")


def test_a_group_of_two_volumes_is_frozen_and_applied_at_one_instant(daemons, key, tmp_path):
    """A writer puts counter n into db, then into log, while group cycles repeat: at any
    one instant db's counter is log's or one more, so the two applied images on the
    target must show exactly that; freezing the members one after another would not."""
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    for name in ("db", "log"):
        a.cli("volume", "create", name, "--size", "2M")
        write(a, name, 0, os.urandom(512 * 1024))
        a.cli("mirror", "start", name, "--to", b.listen, "--interval", "0.3", "--group", "app")
    group_mirror = mirror_row(a, "db", b)["target_mirror"]
    assert mirror_row(a, "log", b)["target_mirror"] == group_mirror
    assert group_mirror.startswith("app-") and mirror_row(a, "log", b)["group"] == "app"

    stop = threading.Event()
    written = []

    def writer():
        with NbdClient("db", unix_path=a.nbd_sock) as ndb, \
                NbdClient("log", unix_path=a.nbd_sock) as nlog:
            n = 0
            while not stop.is_set():
                n += 1
                block = n.to_bytes(8, "little") * 512
                ndb.write(MiB, block)
                ndb.flush()
                nlog.write(MiB, block)
                nlog.flush()
            written.append(n)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(3):
            a.cli("mirror", "sync", "db")
        a.cli("mirror", "break", "log")  # a member's break stops the whole group
        assert mirror_row(a, "db", b)["phase"] == mirror_row(a, "log", b)["phase"] == "broken"
    finally:
        stop.set()
        thread.join()
    # (The target may also list the group as it was before log joined: another mirror.)
    rows = {m["volume"]: m for m in b.status()["incoming"]
            if m["source_node"] == a.node_id and m["group"] == group_mirror}
    assert rows["db"]["applied_cycle"] == rows["log"]["applied_cycle"] >= 4
    assert rows["db"]["freeze_time"] == rows["log"]["freeze_time"]
    db_n = _counter(group_image(rows["db"]), MiB)
    log_n = _counter(group_image(rows["log"]), MiB)
    assert db_n - log_n in (0, 1) and 0 < db_n <= written[0], (db_n, log_n, written)

    # Resume and sync on a member act on the group; then each image equals its source.
    a.cli("mirror", "resume", "db")
    (row_db, row_log) = json.loads(a.cli("mirror", "sync", "log", "--json").stdout)
    assert {row_db["volume"], row_log["volume"]} == {"db", "log"}
    assert row_db["applied_cycle"] == row_log["applied_cycle"] > rows["db"]["applied_cycle"]
    a.cli("mirror", "break", "db")
    for name in ("db", "log"):
        assert group_image(rows[name]) == export(a, name, tmp_path / name)


def group_image(row) -> bytes:
    with open(row["image"], "rb") as fh:
        return fh.read()


def test_group_members_must_share_one_cycle_and_refusals_say_why(daemons, key):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    for name in ("x", "y", "z"):
        a.cli("volume", "create", name, "--size", "1M")
    a.cli("mirror", "start", "x", "--to", b.listen, "--interval", MANUAL, "--group", "g")
    bad = a.cli("mirror", "start", "y", "--to", b.listen, "--interval", "5", "--group", "g",
                check=False)
    assert bad.returncode == errors.UsageError.exit_code
    assert "group 'g'" in bad.stderr and "interval" in bad.stderr
    a.cli("mirror", "start", "z", "--to", b.listen, "--interval", MANUAL)
    bad = a.cli("mirror", "start", "z", "--to", f"127.0.0.1:{free_port()}", "--group", "g",
                check=False)
    assert bad.returncode == errors.UsageError.exit_code and "group" in bad.stderr
    # y joins with the group's settings inherited; both members reach the target.
    a.cli("mirror", "start", "y", "--to", b.listen, "--group", "g")
    assert mirror_row(a, "y", b)["interval"] == float(MANUAL)
    a.cli("mirror", "sync", "y")
    rows = {m["volume"]: m for m in b.status()["incoming"]
            if m["group"] == mirror_row(a, "x", b)["target_mirror"]}
    assert rows["x"]["applied_cycle"] == rows["y"]["applied_cycle"] >= 1
    # A member's rm needs a break first, and a group-wide --to acts on every member.
    assert a.cli("mirror", "rm", "x", check=False).returncode == errors.UsageError.exit_code


def test_a_restarted_daemon_resumes_its_group_with_deltas(daemons, key, tmp_path):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    for name in ("p", "q"):
        a.cli("volume", "create", name, "--size", "1M")
        write(a, name, 0, os.urandom(256 * 1024))
        a.cli("mirror", "start", name, "--to", b.listen, "--interval", MANUAL, "--group", "pq")
    a.cli("mirror", "sync", "p")
    assert a.stop() == 0
    a.start()
    write(a, "q", 512 * 1024, os.urandom(4096))
    (row_p, row_q) = json.loads(a.cli("mirror", "sync", "q", "--json").stdout)
    assert row_p["applied_cycle"] == row_q["applied_cycle"] >= 2
    assert row_q["last_cycle"]["full"] is False and row_q["last_cycle"]["raw_bytes"] == 4096
    applied = re.findall(r"mirror group pq -> \S+: cycle (\d+) applied.*", a.log())
    assert applied, a.log()
    a.cli("mirror", "break", "q")
    rows = {m["volume"]: m for m in b.status()["incoming"]
            if m["group"] == row_q["target_mirror"]}
    for name in ("p", "q"):
        with open(rows[name]["image"], "rb") as fh:
            assert fh.read() == export(a, name, tmp_path / name)


def test_as_names_the_mirror_on_the_target(daemons, key, tmp_path):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", "1M")
    write(a, "v", 0, os.urandom(64 * 1024))
    bad = a.cli("mirror", "start", "v", "--to", b.listen, "--as", "../etc", check=False)
    assert bad.returncode == errors.UsageError.exit_code and "as" in bad.stderr
    out = a.cli("mirror", "start", "v", "--to", b.listen, "--as", "v-offsite",
                "--interval", MANUAL).stdout
    assert "as v-offsite" in out
    a.cli("mirror", "sync", "v")
    row, image = image_of(b, a.node_id, "v-offsite")
    assert row["image"].endswith("/v-offsite.img")
    assert image == export(a, "v", tmp_path / "v.img")
    assert mirror_row(a, "v", b)["remote_name"] == "v-offsite"
    # Two of our volumes under one name on a target would overwrite one image.
    a.cli("volume", "create", "v-offsite", "--size", "1M")
    clash = a.cli("mirror", "start", "v-offsite", "--to", b.listen, check=False)
    assert clash.returncode == errors.UsageError.exit_code and "already arrives" in clash.stderr


def test_mirrors_declared_in_the_config_file_start_at_boot_and_restarts_keep_a_break(
        daemons, key, tmp_path):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    first = daemons("a", key_file=key)  # make the store and its volume, then restart with config
    first.cli("volume", "create", "v", "--size", "2M")
    write(first, "v", 0, os.urandom(MiB))
    assert first.stop() == 0
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'key_file = "{key}"\n[[mirror]]\nvolume = "v"\nto = "{b.listen}"\n'
                   'interval = 0.3\ncompress = "zstd:1"\n')
    a = daemons("a", extra=("--config", str(cfg)))
    row = wait_for(lambda: mirror_row(a, "v", b) if mirror_row(a, "v", b)["applied_cycle"] >= 2
                   else None, 30, "the configured mirror to run")
    assert row["compress"] == "zstd:1" and row["interval"] == 0.3
    a.cli("mirror", "break", "v")
    assert a.stop() == 0
    a.start()  # same config: the store's record (broken) wins over the file
    assert mirror_row(a, "v", b)["phase"] == "broken"
    assert image_of(b, a.node_id, "v")[1] == export(a, "v", tmp_path / "v.img")


def test_a_mirror_that_cannot_start_after_a_restart_says_why_and_resumes_later(
        daemons, key, tmp_path):
    import shutil

    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a")  # no daemon key: the mirror brings its own
    own_key = tmp_path / "own.key"
    shutil.copy(key, own_key)
    a.cli("volume", "create", "v", "--size", "1M")
    a.cli("mirror", "start", "v", "--to", b.listen, "--key-file", own_key, "--interval", MANUAL)
    a.cli("mirror", "sync", "v")
    assert a.stop() == 0
    own_key.unlink()
    a.start()
    row = mirror_row(a, "v", b)
    assert row["phase"] == "broken" and str(own_key) in row["last_error"]
    assert "cannot start" in a.log() and str(own_key) in a.log()
    shutil.copy(key, own_key)
    a.cli("mirror", "resume", "v")
    a.cli("mirror", "sync", "v")
    row = mirror_row(a, "v", b)
    assert row["last_error"] is None and row["applied_cycle"] >= 2
