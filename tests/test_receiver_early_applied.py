"""A delta applied in place is reported applied before the image's fsync, safely.

The target tells the source "applied" once a delta's writes are in the image
and before the image is fsynced (receiver/mirror.py, ``_redo``): the fsync of
scattered blocks was most of an apply, and the source counts its RPO age from
"applied".  That is safe because the cycle is committed (its staging log is
durable and stays until the state file lets go of it) and recovery redoes a
committed cycle.  Proven with real daemons: a kill -9 of the target between
the report and the fsync (held there by a failpoint), then a restart, leaves
the image equal to the source at that cycle, the scrub record kept, and the
next cycle a delta.
"""

import json
import os
import random

from cyclemirror.daemon.nbd_client import NbdClient
from cyclemirror.receiver.state import MirrorState
from tests.support.daemons import DaemonPool, make_key

MiB = 1 << 20
BS = 4096
SIZE = 8 * MiB
HOLD = "receiver.apply_visible=30"


def incoming(target, source_node) -> dict:
    (row,) = [r for r in target.status()["incoming"] if r["source_node"] == source_node]
    return row


def outgoing(source) -> dict:
    (row,) = source.status()["mirrors"]
    return row


def volume_bytes(daemon) -> bytes:
    with NbdClient("v", unix_path=daemon.nbd_sock) as nbd:
        return nbd.read(0, SIZE)


def scatter(daemon, rng, count) -> None:
    with NbdClient("v", unix_path=daemon.nbd_sock) as nbd:
        for _ in range(count):
            nbd.write(rng.randrange(SIZE // BS) * BS, rng.randbytes(BS))
        nbd.flush()


def test_kill_9_between_the_applied_report_and_the_fsync(tmp_path):
    rng = random.Random(7)
    with DaemonPool(tmp_path) as pool:
        key = make_key(tmp_path / "mirror.key")
        b = pool.start("b", key_file=key, listen=True, nbd=False)
        b.args[b.args.index("127.0.0.1:0")] = b.listen  # restarts listen where the source dials
        a = pool.start("a", key_file=key)
        a.cli("volume", "create", "v", "--size", str(SIZE))
        scatter(a, rng, 200)
        a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "3600")
        a.cli("mirror", "sync", "v")  # the full first cycle: renamed in, no hold
        image = incoming(b, a.node_id)["image"]
        state_path = os.path.join(os.path.dirname(image), "v.state.json")
        # from now on each in-place apply of the target holds 30 s after its report
        b.stop()
        b.args += ["--failpoint", HOLD]
        b.start()
        scatter(a, rng, 300)
        want = volume_bytes(a)
        # sync returns on "applied" while the target sleeps 30 s before the fsync: the
        # state shows it
        a.cli("mirror", "sync", "v", "--timeout", "120")
        cycle = outgoing(a)["applied_cycle"]
        st = MirrorState.load(state_path)
        assert st.applied_cycle == cycle and st.committed is not None \
            and st.committed.cycle == cycle, st
        staging = os.path.join(os.path.dirname(image), st.committed.staging)
        assert os.path.exists(staging), "the committed staging log must stay until the fsync"
        b.kill()
        b.args = [x for x in b.args if x not in ("--failpoint", HOLD)]
        b.start()
        st = MirrorState.load(state_path)
        assert st.applied_cycle == cycle and st.committed is None, st
        assert not os.path.exists(staging)
        with open(image, "rb") as fh:
            assert fh.read() == want, "the image is not the source at the applied cycle"
        # the redo brought the scrub record (made by the full cycle) along: kept, and clean
        assert "scrub record" not in b.log(), b.log()
        proc = b.cli("mirror", "scrub", f"{a.node_id}/v", "--json", check=False, timeout=120)
        assert proc.returncode == 0 and json.loads(proc.stdout)["state"] == "clean", \
            (proc.stdout, proc.stderr)
        # the next cycle is a delta of what was written since, not a full copy
        scatter(a, rng, 1)
        a.cli("mirror", "sync", "v", "--timeout", "60")
        last = outgoing(a)["last_cycle"]
        assert not last["full"] and last["raw_bytes"] == BS, json.dumps(last)
        with open(image, "rb") as fh:
            assert fh.read() == volume_bytes(a)


def test_a_stop_right_after_the_report_lets_the_apply_finish(tmp_path):
    """SIGTERM while an apply holds between its report and its fsync: the daemon lets
    it finish, so the state names no cycle to redo and a daemon started without
    --listen (no recovery there) exports the image."""
    rng = random.Random(8)
    with DaemonPool(tmp_path) as pool:
        key = make_key(tmp_path / "mirror.key")
        b = pool.start("b", key_file=key, listen=True)
        b.args[b.args.index("127.0.0.1:0")] = b.listen
        a = pool.start("a", key_file=key)
        a.cli("volume", "create", "v", "--size", str(SIZE))
        scatter(a, rng, 100)
        a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "3600")
        a.cli("mirror", "sync", "v")
        image = incoming(b, a.node_id)["image"]
        state_path = os.path.join(os.path.dirname(image), "v.state.json")
        b.stop()
        b.args += ["--failpoint", "receiver.apply_visible=3"]
        b.start()
        scatter(a, rng, 100)
        want = volume_bytes(a)
        a.cli("mirror", "sync", "v", "--timeout", "120")
        assert MirrorState.load(state_path).committed is not None  # inside the hold
        assert b.stop() == 0
        st = MirrorState.load(state_path)
        assert st.committed is None and st.applied_cycle == outgoing(a)["applied_cycle"], st
        # started without --listen: no recovery runs, and none is needed
        b.args = [x for x in b.args if x not in ("--listen", b.listen, "--failpoint",
                                                 "receiver.apply_visible=3")]
        b.start()
        with NbdClient(f"mirror/{a.status()['node']['name']}/v", unix_path=b.nbd_sock) as nbd:
            assert nbd.read(0, SIZE) == want
