"""Verify, repair and scrub end to end: real daemons in processes, the real CLI, real files.

Proves, with silent corruption flipped into the target's image file behind
its daemon's back (the last block of a volume whose size is no multiple of
64 MiB or 1 MiB among it):

* ``mirror verify`` names exactly those extents and exits 7; status and
  metrics show a mismatch not repaired; ``mirror scrub`` on the target finds
  the same blocks without the source; ``--repair`` ships exactly those blocks
  (the status's wire figures) and the next verify and scrub are clean; a
  clean verify costs under 0.1% of the volume on the wire;
* while a writer writes and cycles apply, verifies and scrubs report exactly
  the corruption, never a block the writer changed;
* kill -9 of the source or the target during a verify: the mirror stays
  consistent, the verify run again resumes where it stopped, no full copy;
  kill -9 of either side during a repair: the repair completes after the
  restart, no full copy;
* verify and scrub run on the schedule of the config file;
* a member of a consistency group is verified, repaired (its blocks land in
  the right member) and scrubbed on its own.
"""

import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest

from cyclemirror.daemon.nbd_client import NbdClient
from cyclemirror.receiver.state import MirrorState
from tests.support.corrupt import flip
from tests.support.daemons import DaemonPool, cli_env, free_port, make_key, wait_for

MiB = 1 << 20
BS = 4096
SIZE = 70 * MiB + 3 * BS  # neither 64 MiB nor 1 MiB divides it
MANUAL = "3600"
MISMATCH = 7


@pytest.fixture
def daemons(tmp_path):
    with DaemonPool(tmp_path) as pool:
        yield pool.start


@pytest.fixture
def key(tmp_path):
    return make_key(tmp_path / "mirror.key")


def fill(daemon, volume, size, seed=1):
    rng = random.Random(seed)
    with NbdClient(volume, unix_path=daemon.nbd_sock) as nbd:
        for off in range(0, size, 8 * MiB):
            nbd.write(off, rng.randbytes(min(8 * MiB, size - off)))
        nbd.flush()


def incoming(target, source_node):
    (row,) = [m for m in target.status()["incoming"] if m["source_node"] == source_node]
    return row




def extents(blocks):
    return [{"offset": b * BS, "length": BS} for b in sorted(blocks)]


def verify(source, *args, check_code=None):
    proc = source.cli("mirror", "verify", "v", *args, "--json", check=False, timeout=300)
    if check_code is not None:
        assert proc.returncode == check_code, (proc.stdout, proc.stderr)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else proc.stderr


def scrub(target, source, *args):
    proc = target.cli("mirror", "scrub", f"{source.node_id}/v", *args, "--json", check=False,
                      timeout=300)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else proc.stderr


def row_of(source, target):
    (row,) = [m for m in source.status()["mirrors"] if m["target"] == target.listen]
    return row


def metric(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def full_copies(source):
    return len(re.findall(r"cycle \d+ applied.*full copy", source.log()))


def setup_mirror(daemons, key, interval=MANUAL, target_extra=(), size=SIZE):
    # a fixed port: a restarted target must be found at the same address
    b = daemons("b", key_file=key, nbd=False,
                extra=("--listen", f"127.0.0.1:{free_port()}", *target_extra))
    a = daemons("a", key_file=key)
    a.cli("volume", "create", "v", "--size", str(size))
    fill(a, "v", size)
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", interval, "--compress",
          "none")
    a.cli("mirror", "sync", "v", "--timeout", "120")
    return a, b


def test_verify_names_the_corruption_repair_heals_it_and_scrub_sees_it_alone(daemons, key):
    a, b = setup_mirror(daemons, key)
    code, (clean,) = verify(a, check_code=0)
    assert clean["state"] == "clean" and clean["mismatched_blocks"] == 0
    assert clean["length"] == SIZE
    assert clean["wire_bytes"] < SIZE // 1000  # well under 0.1% of the volume
    image = incoming(b, a.node_id)["image"]
    bad = [3 * MiB + 11, 64 * MiB + 5 * BS, 65 * MiB, SIZE - 1]
    flip(image, bad)
    want = extents({o // BS for o in bad})

    code, (found,) = verify(a, check_code=MISMATCH)
    assert found["state"] == "mismatch" and found["extents"] == want
    assert found["mismatched_blocks"] == len(want) and found["repair"] is None
    row = row_of(a, b)
    assert row["verify"]["state"] == "mismatch" and row["verify"]["mismatched_blocks"] == 4
    assert "NOT REPAIRED" in a.cli("status").stdout
    assert metric(a.scrape(), "cyclemirror_mirror_verify_unrepaired", volume="v") == 1
    text = a.cli("mirror", "verify", "v", check=False)
    assert text.returncode == MISMATCH and "4 blocks differ" in text.stdout
    assert f"offset {SIZE - BS}  length {BS}" in text.stdout

    # The target alone, without asking the source, finds the same blocks.
    code, rot = scrub(b, a)
    assert code == MISMATCH and rot["state"] == "rot" and rot["extents"] == want
    assert rot["checked_blocks"] == SIZE // BS and rot["unchecked_blocks"] == 0
    assert incoming(b, a.node_id)["scrub"]["state"] == "rot"
    assert metric(b.scrape(), "cyclemirror_incoming_scrub_rot", volume="v") == 1

    # --repair ships exactly those blocks, in a cycle of their own (nothing else changed).
    code, (healed,) = verify(a, "--repair", check_code=0)
    assert healed["state"] == "repaired" and healed["extents"] == want
    assert healed["repair"]["blocks"] == 4 and healed["repair"]["applied"]
    last = row_of(a, b)["last_cycle"]
    assert last["raw_bytes"] == 4 * BS  # the four blocks, no more
    assert 4 * BS < last["bytes"] < 4 * BS + 4096  # plus frame headers and messages
    assert healed["repair"]["wire_bytes"] == last["bytes"]
    assert row_of(a, b)["verify"]["state"] == "repaired"
    assert "NOT REPAIRED" not in a.cli("status").stdout

    code, (after,) = verify(a, check_code=0)
    assert after["state"] == "clean"
    code, rescrub = scrub(b, a)
    assert code == 0 and rescrub["state"] == "clean"
    assert metric(a.scrape(), "cyclemirror_mirror_verify_unrepaired", volume="v") == 0
    assert metric(a.scrape(), "cyclemirror_mirror_verify_age_seconds", volume="v") >= 0
    assert incoming(b, a.node_id)["source_verify"]["mismatched_blocks"] == 0
    assert full_copies(a) == 1  # the first cycle only


def test_verify_and_scrub_while_a_writer_writes_report_exactly_the_corruption(daemons, key):
    a, b = setup_mirror(daemons, key, interval="0.1")
    image = incoming(b, a.node_id)["image"]
    bad = [SIZE - 6 * MiB + 3, SIZE - 2 * MiB, SIZE - 1]  # the writer stays below SIZE - 8 MiB
    flip(image, bad)
    want = extents({o // BS for o in bad})
    stop = threading.Event()

    def writer():
        rng = random.Random(3)
        with NbdClient("v", unix_path=a.nbd_sock) as nbd:
            while not stop.is_set():
                for _ in range(16):
                    nbd.write(rng.randrange((SIZE - 8 * MiB) // BS) * BS, rng.randbytes(BS))
                nbd.flush()
                time.sleep(0.01)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        cycles = set()
        for _ in range(3):
            code, (found,) = verify(a, check_code=MISMATCH)
            assert found["extents"] == want, found["cycles"]
            cycles.update(found["cycles"])
            code, rot = scrub(b, a)
            assert code == MISMATCH and rot["extents"] == want
            cycles.update(rot["cycles"])
        assert len(cycles) >= 3, cycles  # cycles applied all along
    finally:
        stop.set()
        t.join()


def start_verify(source, *args):
    return subprocess.Popen([sys.executable, "-m", "cyclemirror.cli", "--store", source.store,
                             "mirror", "verify", "v", "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())


def verify_running(source, target, least: int):
    v = row_of(source, target)["verify"]
    return v["state"] == "running" and (v["running"] or {}).get("done", 0) >= least


def test_kill_9_of_either_side_during_a_verify_then_it_resumes(daemons, key):
    size = 3 * 64 * MiB + 3 * BS  # progress is recorded per 64 MiB piece: three of them
    a, b = setup_mirror(daemons, key, size=size)
    image = incoming(b, a.node_id)["image"]
    bad = [MiB, size - 1]
    flip(image, bad)
    want = extents({o // BS for o in bad})
    # slow enough to be killed in the middle: 64 MiB pieces at 16 MiB/s on each side
    run = start_verify(a, "--bwlimit", "16M")
    try:
        wait_for(lambda: verify_running(a, b, 64 * MiB), 60, "the verify to pass 64 MiB")
        a.kill()
    finally:
        run.wait(30)
    a.start()
    code, (resumed,) = verify(a, check_code=MISMATCH)
    assert resumed["resumed_from"] >= 64 * MiB
    assert resumed["extents"] == want  # the first one found before the kill

    # the target this time
    run = start_verify(a, "--bwlimit", "16M", "--restart")
    wait_for(lambda: verify_running(a, b, 64 * MiB), 60, "the verify to pass 64 MiB again")
    b.kill()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 6, (out, err)  # the peer went away
    v = row_of(a, b)["verify"]
    assert v["state"] == "mismatch"  # the last finished verify still stands, loudly
    assert "ConnectionLostError" in (v["error"] or ""), v
    b.start()
    code, (again,) = verify(a, check_code=MISMATCH)
    assert again["resumed_from"] >= 64 * MiB
    assert again["extents"] == want
    # the image stayed consistent and nothing was copied again
    assert full_copies(a) == 1
    with NbdClient("v", unix_path=a.nbd_sock) as nbd:
        nbd.write(0, b"n" * BS)
        nbd.flush()
    a.cli("mirror", "sync", "v")
    assert row_of(a, b)["last_cycle"]["raw_bytes"] == BS


def committed(target, source_node) -> bool:
    row = incoming(target, source_node)
    state = os.path.join(os.path.dirname(row["image"]), "v.state.json")
    try:
        return MirrorState.load(state).committed is not None
    except Exception:  # noqa: BLE001 - mid-replace
        return False


def test_kill_9_of_either_side_during_a_repair_then_it_completes(daemons, key, tmp_path):
    # every record (or SCATTER extent) the target applies takes a second (failpoints.py)
    a, b = setup_mirror(daemons, key, target_extra=("--failpoint", "receiver.apply_record=1"))
    image = incoming(b, a.node_id)["image"]
    flip(image, [2 * MiB, 40 * MiB])
    # The target dies inside the repair's apply: recovery finishes it.
    run = start_verify(a, "--repair")
    wait_for(lambda: committed(b, a.node_id), 60, "the repair cycle to be committed")
    b.kill()
    b.start()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, (out, err)
    (healed,) = json.loads(out)
    assert healed["state"] == "repaired"
    code, (clean,) = verify(a, check_code=0)

    # The source dies with a repair owed (the mirror broken, so it cannot ship yet).
    flip(image, [5 * MiB])
    a.cli("mirror", "break", "v")
    code, (owed,) = verify(a, "--repair", check_code=8)
    assert owed["state"] == "repairing" and owed["repair"]["cycle"] is None
    a.kill()
    a.start()
    assert row_of(a, b)["verify"]["state"] == "repairing"
    a.cli("mirror", "resume", "v")
    wait_for(lambda: row_of(a, b)["verify"]["state"] == "repaired", 60, "the repair")
    assert row_of(a, b)["last_cycle"]["raw_bytes"] == BS
    code, (clean,) = verify(a, check_code=0)
    code, rot = scrub(b, a)
    assert code == 0 and rot["state"] == "clean"
    assert full_copies(a) == 1


def test_verify_and_scrub_run_on_the_configured_schedule(daemons, key, tmp_path):
    conf_b = tmp_path / "b.toml"
    conf_b.write_text('scrub_every = "1s"\nscrub_bwlimit = "1G"\n')
    conf_a = tmp_path / "a.toml"
    conf_a.write_text('verify_every = 1\nverify_repair = true\nverify_bwlimit = "1G"\n')
    b = daemons("b", key_file=key, listen=True, nbd=False, extra=("--config", str(conf_b)))
    a = daemons("a", key_file=key, extra=("--config", str(conf_a)))
    a.cli("volume", "create", "v", "--size", "6M")
    fill(a, "v", 6 * MiB)
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", MANUAL)
    a.cli("mirror", "sync", "v")
    wait_for(lambda: row_of(a, b)["verify"]["state"] == "clean", 60, "a scheduled verify")
    wait_for(lambda: incoming(b, a.node_id)["scrub"]["state"] == "clean", 60,
             "a scheduled scrub")
    flip(incoming(b, a.node_id)["image"], [MiB])
    # the scheduled verify finds it and (verify_repair) heals it
    wait_for(lambda: row_of(a, b)["verify"]["state"] == "repaired", 60, "a scheduled repair")
    assert "scheduled verify of" not in a.log()  # no scheduled run failed
    assert "scheduled scrub of" not in b.log()
    assert row_of(a, b)["verify"]["age"] is not None


def test_a_group_member_is_verified_repaired_and_scrubbed_on_its_own(daemons, key):
    b = daemons("b", key_file=key, listen=True, nbd=False)
    a = daemons("a", key_file=key)
    for name, size in (("m1", 4 * MiB), ("m2", 6 * MiB + BS)):
        a.cli("volume", "create", name, "--size", str(size))
        fill(a, name, size, seed=len(name) + size)
        a.cli("mirror", "start", name, "--to", b.listen, "--interval", MANUAL, "--group", "g",
              "--compress", "none")
    a.cli("mirror", "sync", "m1")
    rows = [m for m in b.status()["incoming"] if m["source_node"] == a.node_id]
    image = next(m["image"] for m in rows if m["volume"] == "m2")
    flip(image, [6 * MiB])  # the last block of the second member
    proc = a.cli("mirror", "verify", "m1", "--json", check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["state"] == "clean"
    proc = a.cli("mirror", "verify", "m2", "--repair", "--json", check=False)
    assert proc.returncode == 0, proc.stderr
    (healed,) = json.loads(proc.stdout)
    assert healed["extents"] == [{"offset": 6 * MiB, "length": BS}]
    assert healed["state"] == "repaired"
    m2_row = next(m for m in a.status()["mirrors"] if m["volume"] == "m2")
    assert m2_row["last_cycle"]["raw_bytes"] == BS  # the one block, into the right member
    proc = b.cli("mirror", "scrub", f"{a.node_id}/m2", "--json", check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)["state"] == "clean"
    proc = a.cli("mirror", "verify", "m2", "--json", check=False)
    assert proc.returncode == 0, proc.stdout
