"""Several targets, catch-up, lost change tracking, break and resume (in-process, real sockets).

Proves: one volume to two targets applies every cycle on both; a target that
is down falls behind without stalling the other and later catches up with a
delta (not a full copy) that leaves it equal to the freeze; after the
driver's state is lost the source compares block hashes and ships only the
differing blocks; break stops the cycle and resume ships a delta of what
changed meanwhile; two stores pushing volumes of one name stay apart.
"""

import os
import shutil

import pytest

from cyclemirror import keys
from cyclemirror.errors import UsageError
from cyclemirror.receiver import TargetServer
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.sender.driver import TargetSpec
from cyclemirror.store import Store
from tests.support.mirror import same_file, wait_for

MiB = 1 << 20
BS = 4096


class Recorder:
    def __init__(self, tmp):
        self.tmp = tmp
        self.exports = {}
        self.events = []

    def on_frozen(self, frozen, reader):
        path = os.path.join(self.tmp, f"export-{frozen.number}.img")
        if not os.path.exists(path):
            reader.export_to(path)
        self.exports[frozen.number] = path

    def on_applied(self, cycle, label, stats):
        self.events.append((cycle, label, stats))

    def options(self, **kw):
        return MirrorOptions(on_frozen=self.on_frozen, on_applied=self.on_applied,
                             retry_initial=0.05, retry_max=0.2, interval=3600, **kw)


def image(store, source_store, name):
    return os.path.join(store.path, "mirrors", source_store.node_id, f"{name}.img")


@pytest.fixture
def key():
    return keys.generate_key()


def make_target(tmp_path, name, key, port=0):
    store = Store.create(str(tmp_path / name)) if not (tmp_path / name).exists() \
        else Store.open(str(tmp_path / name))
    server = TargetServer(store, key, ("127.0.0.1", port))
    server.start()
    return store, server


def scribble(vol, blocks, seed):
    for i, b in enumerate(blocks):
        vol.write(b * BS, bytes([(seed + i) % 251 + 1]) * BS)


def test_two_targets_one_down_the_other_goes_on_then_catch_up_is_a_delta(tmp_path, key):
    rec = Recorder(str(tmp_path))
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 8 * MiB)
    vol.write(0, os.urandom(4 * MiB))
    a_store, a = make_target(tmp_path, "a", key)
    b_store, b = make_target(tmp_path, "b", key)
    d = MirrorDriver(vol, [TargetSpec(*a.address, key), TargetSpec(*b.address, key)], key,
                     rec.options(), store=src)
    want = d.request_freeze()
    d.start()
    c1 = d.wait_applied(want, 30)
    for st in (a_store, b_store):
        assert same_file(image(st, src, "v"), rec.exports[c1])
    full = [s for c, _, s in rec.events if c == c1]
    assert len(full) == 2 and all(s["full"] for s in full)
    # One chunk stream feeds both targets: same chunks, same bytes on the wire.
    assert full[0]["chunks"] == full[1]["chunks"]

    b_port = b.address[1]
    b.stop()
    changed = [3, 500, 1500]
    for k in range(3):  # three cycles while b is down
        scribble(vol, [x + k for x in changed], k)
        d_sync_only_a(d, rec, a_store, src)
    b_store.close()
    b_store, b = make_target(tmp_path, "b", key, port=b_port)
    c = d.sync(30)
    assert same_file(image(b_store, src, "v"), rec.exports[c])
    assert same_file(image(a_store, src, "v"), rec.exports[c])
    b_label = f"127.0.0.1:{b_port}"
    catch_up = [s for cc, label, s in rec.events if label == b_label and cc == c][0]
    assert not catch_up["full"]
    assert catch_up["bytes_raw"] == 9 * BS  # exactly the blocks changed while it was down
    d.stop()
    for s in (a, b):
        s.stop()


def d_sync_only_a(d, rec, a_store, src):
    """Freeze and wait until target a applied it (b is down, so sync() would wait)."""
    want = d.request_freeze()
    a_label = d.targets[0].label
    wait_for(lambda: any(c >= want and lab == a_label for c, lab, _ in rec.events), 30,
             f"cycle {want} on target a")
    assert same_file(image(a_store, src, "v"), rec.exports[want])


@pytest.mark.parametrize("damage", ["lost", "torn"])
def test_lost_driver_state_leads_to_a_hash_comparison_not_a_full_copy(tmp_path, key, damage):
    rec = Recorder(str(tmp_path))
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 8 * MiB)
    vol.write(0, os.urandom(8 * MiB))
    t_store, t = make_target(tmp_path, "t", key)
    d = MirrorDriver(vol, t.address, key, rec.options(), store=src)
    want = d.request_freeze()
    d.start()
    d.wait_applied(want, 30)
    d.stop()
    if damage == "lost":
        shutil.rmtree(os.path.join(src.path, "outgoing"))  # change tracking is gone
    else:
        with open(os.path.join(src.path, "outgoing", "v", "state.json"), "w") as f:
            f.write("{ torn")
    scribble(vol, [10, 11, 700], 5)
    rec.events.clear()
    d = MirrorDriver(vol, t.address, key, rec.options(), store=src)
    want = d.request_freeze()
    d.start()
    c = d.wait_applied(want, 30)
    assert same_file(image(t_store, src, "v"), rec.exports[c])
    shipped = [s for cc, _, s in rec.events if cc == c][0]
    assert not shipped["full"] and shipped["bytes_raw"] == 3 * BS
    d.stop()
    t.stop()


def test_break_then_resume_ships_only_what_changed_meanwhile(tmp_path, key):
    rec = Recorder(str(tmp_path))
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 4 * MiB)
    t_store, t = make_target(tmp_path, "t", key)
    d = MirrorDriver(vol, t.address, key, rec.options(), store=src)
    want = d.request_freeze()
    d.start()
    c1 = d.wait_applied(want, 30)
    d.break_cycles()
    wait_for(lambda: d.status()["phase"] == "broken", 10, "the break")
    scribble(vol, [1, 2, 3, 4], 9)
    assert same_file(image(t_store, src, "v"), rec.exports[c1])  # untouched while broken
    d.resume()
    c = d.sync(30)
    assert c > c1
    assert same_file(image(t_store, src, "v"), rec.exports[c])
    assert sum(s["bytes_raw"] for cc, _, s in rec.events if cc > c1) == 4 * BS
    d.stop()
    t.stop()


def test_two_stores_push_volumes_of_one_name_without_collision(tmp_path, key):
    t_store, t = make_target(tmp_path, "t", key)
    drivers, exports = [], []
    for i in range(2):
        rec = Recorder(str(tmp_path / f"r{i}"))
        os.makedirs(rec.tmp)
        src = Store.create(str(tmp_path / f"src{i}"))
        vol = src.create_volume("same", 1 * MiB)
        vol.write(0, bytes([i + 1]) * MiB)
        d = MirrorDriver(vol, t.address, key, rec.options(), store=src)
        d.start()
        c = d.sync(30)
        drivers.append(d)
        exports.append((src, rec.exports[c]))
    for src, exp in exports:
        assert same_file(image(t_store, src, "same"), exp)
    assert not same_file(exports[0][1], exports[1][1])
    for d in drivers:
        d.stop()
    t.stop()


def test_break_now_abandons_the_running_cycle_and_the_target_keeps_the_previous(tmp_path, key):
    rec = Recorder(str(tmp_path))
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 8 * MiB)
    t_store, t = make_target(tmp_path, "t", key)
    d = MirrorDriver(vol, t.address, key, rec.options(), store=src)
    want = d.request_freeze()
    d.start()
    c1 = d.wait_applied(want, 30)
    vol.write(0, os.urandom(4 * MiB))
    d.rate.rate = 1 * MiB  # slow enough to catch the cycle in the middle
    d.request_freeze()
    wait_for(lambda: d.status()["cycle"] == c1 + 1
             and d.status()["targets"][d.targets[0].label]["phase"] == "copying", 30,
             f"the next cycle to start copying (c1={c1})")
    d.break_cycles(now=True)
    wait_for(lambda: d.status()["phase"] == "broken", 30, "the break")
    assert same_file(image(t_store, src, "v"), rec.exports[c1])
    assert not [c for c, _, _ in rec.events if c > c1]  # nothing else was applied
    d.rate.rate = 0
    d.resume()
    # The interval is an hour: resuming must not wait for it.
    wait_for(lambda: any(cc > c1 for cc, _, _ in rec.events), 30,
             "a cycle shipped right after resume")
    c = d.sync(30)
    assert same_file(image(t_store, src, "v"), rec.exports[c])
    later = [s for cc, _, s in rec.events if cc > c1]
    assert all(not s["full"] for s in later)
    assert sum(s["bytes_raw"] for s in later) <= 4 * MiB
    d.stop()
    t.stop()


def test_a_cycle_over_tls_with_a_real_certificate(tmp_path, key):
    import subprocess

    from cyclemirror.wire.handshake import TlsConfig
    from tests.support.tools import require_tool

    openssl = require_tool("openssl")
    cert, pkey = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", pkey, "-out", cert],
                   check=True, capture_output=True)
    rec = Recorder(str(tmp_path))
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 2 * MiB)
    vol.write(0, os.urandom(MiB))
    t_store = Store.create(str(tmp_path / "t"))
    t = TargetServer(t_store, key, ("127.0.0.1", 0), tls=TlsConfig(certfile=cert, keyfile=pkey))
    t.start()
    spec = TargetSpec("127.0.0.1", t.address[1], key,
                      tls=TlsConfig(cafile=cert, server_hostname="localhost"))
    d = MirrorDriver(vol, [spec], key, rec.options(), store=src)
    want = d.request_freeze()
    d.start()
    c = d.wait_applied(want, 30)
    assert same_file(image(t_store, src, "v"), rec.exports[c])
    d.stop()
    # A source that does not trust the certificate stops (permanent), sends nothing.
    other = MirrorDriver(vol, [TargetSpec("127.0.0.1", t.address[1], key,
                                          tls=TlsConfig(server_hostname="localhost"))],
                         key, rec.options(), store=src)
    other.start()
    wait_for(lambda: other.status()["phase"] == "broken", 30, "the untrusting source to stop")
    (t_status,) = other.status()["targets"].values()
    assert "CERTIFICATE_VERIFY_FAILED" in t_status["last_error"]
    other.stop()
    t.stop()


def test_size_mismatch_is_a_permanent_error_that_names_the_fix(tmp_path, key):
    rec = Recorder(str(tmp_path))
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 1 * MiB)
    t_store, t = make_target(tmp_path, "t", key)
    d = MirrorDriver(vol, t.address, key, rec.options(), store=src)
    want = d.request_freeze()
    d.start()
    c = d.wait_applied(want, 30)
    d.stop()
    src.delete_volume("v")
    shutil.rmtree(os.path.join(src.path, "outgoing"))
    vol = src.create_volume("v", 2 * MiB)
    d = MirrorDriver(vol, t.address, key, rec.options(), store=src)
    d.start()
    wait_for(lambda: d.status()["phase"] == "broken", 30, "the driver to stop")
    (t_status,) = d.status()["targets"].values()
    assert "size or block-size change" in t_status["last_error"]
    assert "re-seed" in t_status["last_error"]
    assert os.path.getsize(image(t_store, src, "v")) == 1 * MiB  # the old mirror is intact
    assert same_file(image(t_store, src, "v"), rec.exports[c])
    d.stop()
    t.stop()


def test_both_directions_between_two_stores_at_once(tmp_path, key):
    """A mirrors v1 to B while B mirrors v2 to A; each store is source and target."""
    a_store, a_target = make_target(tmp_path, "A", key)
    b_store, b_target = make_target(tmp_path, "B", key)
    recs, drivers, pairs = [], [], []
    for i, (src, dst_store, dst_target) in enumerate(
            [(a_store, b_store, b_target), (b_store, a_store, a_target)]):
        rec = Recorder(str(tmp_path / f"rec{i}"))
        os.makedirs(rec.tmp)
        vol = src.create_volume(f"v{i + 1}", 2 * MiB)
        vol.write(0, os.urandom(MiB))
        d = MirrorDriver(vol, dst_target.address, key, rec.options(), store=src)
        d.start()
        recs.append(rec)
        drivers.append(d)
        pairs.append((src, dst_store, vol, rec))
    for _ in range(3):  # a few rounds of writes and syncs in both directions at once
        for _src, _dst, vol, _rec in pairs:
            scribble(vol, [7, 300], 3)
        cycles = [d.sync(30) for d in drivers]
    for (src, dst_store, vol, rec), c in zip(pairs, cycles, strict=True):
        assert same_file(image(dst_store, src, vol.name), rec.exports[c])
    for d in drivers:
        d.stop()
    a_target.stop()
    b_target.stop()


def test_a_failure_outside_the_targets_breaks_the_mirror_until_resume(tmp_path, key):
    rec = Recorder(str(tmp_path))
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 1 * MiB)
    t_store, t = make_target(tmp_path, "t", key)
    fail = {"now": True}

    def on_frozen(frozen, reader):
        if fail["now"]:
            raise OSError(28, "No space left on device (simulated by the hook)")
        rec.on_frozen(frozen, reader)

    opts = rec.options()
    opts.on_frozen = on_frozen
    d = MirrorDriver(vol, t.address, key, opts, store=src)
    d.start()
    wait_for(lambda: d.status()["phase"] == "broken", 30, "the driver to stop")
    assert "No space left" in d.status()["last_error"]
    with pytest.raises(UsageError, match="No space left"):
        d.sync(1)
    fail["now"] = False
    d.resume()
    c = d.sync(30)
    assert same_file(image(t_store, src, "v"), rec.exports[c])
    d.stop()
    t.stop()


def test_one_target_is_synced_broken_resumed_removed_and_added_while_the_loop_runs(
        tmp_path, key):
    rec = Recorder(str(tmp_path))
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 4 * MiB)
    vol.write(0, os.urandom(2 * MiB))
    a_store, a = make_target(tmp_path, "a", key)
    b_store, b = make_target(tmp_path, "b", key)
    d = MirrorDriver(vol, [TargetSpec(*a.address, key), TargetSpec(*b.address, key)], key,
                     rec.options(), store=src)
    la, lb = (f"{h}:{p}" for h, p in (a.address, b.address))
    d.start()
    loop = d._thread
    c1, skipped = d.sync_targets(None, 30)
    assert skipped == {}

    # b down: a named sync goes through; a plain one says it did not wait for b.
    b_port = b.address[1]
    b.stop()
    scribble(vol, [1, 2], 1)
    c2, skipped = d.sync_targets([la], 30)
    assert skipped == {} and same_file(image(a_store, src, "v"), rec.exports[c2])
    scribble(vol, [3], 2)
    c3, skipped = d.sync_targets(None, 30)
    assert list(skipped) == [lb] and skipped[lb].startswith("down, retrying")
    assert same_file(image(a_store, src, "v"), rec.exports[c3])
    b_store.close()
    b_store, b = make_target(tmp_path, "b", key, port=b_port)

    # b broken alone: not shipped to, not waited for; a named sync of it is refused.
    d.break_target(lb)
    scribble(vol, [4], 3)
    c4, skipped = d.sync_targets(None, 30)
    assert skipped == {lb: "broken (mirror break)"}
    with pytest.raises(UsageError, match="resume"):
        d.sync_targets([lb], 5)
    d.resume_target(lb)
    c5, skipped = d.sync_targets([lb], 30)
    assert same_file(image(b_store, src, "v"), rec.exports[c5])
    catch_up = [s for c, label, s in rec.events if label == lb and c > c4]
    assert not any(s["full"] for s in catch_up)
    assert sum(s["bytes_raw"] for s in catch_up) == 4 * BS  # blocks 1..4, missed meanwhile

    # b removed, c added: c gets a full copy while a gets its delta; same loop thread.
    d.break_target(lb)
    d.remove_target(lb)
    assert [r.label for r in d.targets] == [la]
    assert lb not in d.state.targets
    c_store, c = make_target(tmp_path, "c", key)
    lc = f"{c.address[0]}:{c.address[1]}"
    scribble(vol, [9], 4)
    d.add_target(TargetSpec(*c.address, key))
    c6, skipped = d.sync_targets(None, 30)
    assert skipped == {} and d._thread is loop
    for st in (a_store, c_store):
        assert same_file(image(st, src, "v"), rec.exports[c6])
    # (add_target asks for a cycle itself: the sync's cycle may be that one or the next;
    # the hook that records it runs just after the apply is known)
    wait_for(lambda: any(cc == c6 for cc, label, _ in rec.events if label == lc), 10,
             "the hook of c's cycle")
    to_c = [s for cc, label, s in rec.events if label == lc]
    to_a = [s for cc, label, s in rec.events if label == la and cc > c5]
    assert to_c[0]["full"] and not any(s["full"] for s in to_c[1:])
    assert not any(s["full"] for s in to_a) and sum(s["bytes_raw"] for s in to_a) == BS
    with pytest.raises(UsageError, match="running"):
        d.remove_target(la)
    d.stop()
    for s in (a, b, c):
        s.stop()


def test_a_target_that_never_answers_does_not_hold_the_others(tmp_path, key, monkeypatch):
    """A host that accepts the connection and then says nothing (or a dead one that
    drops SYNs) ties up only its own dial: the other target's cycles go on meanwhile."""
    import socket

    from cyclemirror.sender import connection

    monkeypatch.setattr(connection, "CONNECT_TIMEOUT", 120.0)  # it hangs until we end it
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    rec = Recorder(str(tmp_path))
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 2 * MiB)
    vol.write(0, os.urandom(MiB))
    a_store, a = make_target(tmp_path, "a", key)
    d = MirrorDriver(vol, [TargetSpec(*a.address, key), TargetSpec(*silent.getsockname(), key)],
                     key, rec.options(dial_grace=0.5), store=src)
    la = f"{a.address[0]}:{a.address[1]}"
    hung = next(r for r in d.targets if r.label != la)
    d.start()
    try:
        for k in range(3):
            scribble(vol, [k], k)
            c, _ = d.sync_targets([la], 60)
            assert same_file(image(a_store, src, "v"), rec.exports[c])
            # ... all while the silent target's first dial is still under way
            assert hung.dial_thread is not None and hung.applied_cycle == 0
        silent.close()  # its dial now fails: a plain sync says it did not wait for it
        wait_for(lambda: hung.dial_thread is None, 30, "the silent target's dial to fail")
        _c, skipped = d.sync_targets(None, 60)
        assert list(skipped) == [hung.label] and skipped[hung.label].startswith("down")
    finally:
        silent.close()
        d.stop()
        a.stop()
