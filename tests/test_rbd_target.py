"""Mirror images in a Ceph pool: a real one-node cluster (tests/support/ceph.py).

Proves, with source and target in separate processes on loopback and writes
running all the time: a full first cycle and the deltas after it land in an
RBD image whose snapshot ``cyclemirror-<cycle>`` equals the source at that
cycle's freeze instant; only the last cycle's snapshot is kept (older ones
go in a thread after the apply is reported); ``status``
names pool, image and snapshot; kill -9 of the target during an apply leaves
the last snapshot at a freeze instant (read with Ceph's own ``rbd export``
while the target is down), recovery rolls back and redoes, and the next
cycle is no full copy; nor is the one after a kill -9 of the source.  Without the librbd binding, asking for an RBD target
says what to install.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.support.mirror import Rig, same_file, wait_for
from tests.support.procenv import child_env

SLOW_APPLY = {"receiver.apply_record": 0.05}


def _binding_or_skip():
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")


@pytest.fixture
def rbd_rig(tmp_path, ceph_cluster, request):
    _binding_or_skip()
    spec = {"pool": ceph_cluster.pool, "conf": ceph_cluster.conf,
            "client": ceph_cluster.client, "keyring": ceph_cluster.keyring}
    r = Rig(str(tmp_path), size=8 << 20, interval=0.05)
    r.rbd_env = {"MIRROR_TEST_RBD": json.dumps(spec)}
    r.cluster = ceph_cluster
    yield r
    r.close()  # the images stay: their names are unique, and the cluster ends with the session


def _node(rig):
    mdir = os.path.join(rig.tmp, "dst", "mirrors")
    nodes = os.listdir(mdir) if os.path.isdir(mdir) else []
    return nodes[0] if nodes else None


def _state(rig) -> dict:
    node = _node(rig)
    try:
        return json.load(open(os.path.join(rig.tmp, "dst", "mirrors", node,
                                           "v1.state.json")))["body"]
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def _rbd_export(rig, cycle, dst) -> str:
    """Ceph's own client reads the snapshot of ``cycle`` into ``dst``."""
    spec = f"{rig.cluster.pool}/{_node(rig)}~v1@cyclemirror-{cycle}"
    rig.cluster.run("rbd", "export", "--no-progress", spec, str(dst))
    return str(dst)


def _snapshots(rig) -> list[str]:
    out = rig.cluster.run("rbd", "snap", "ls", "--format", "json",
                          f"{rig.cluster.pool}/{_node(rig)}~v1")
    return [s["name"] for s in json.loads(out)]


def _start_target(rig, failpoints=None):
    rig.start_target(failpoints=failpoints, **rig.rbd_env)


def test_full_cycle_and_deltas_into_rbd_equal_the_source_at_each_freeze(rbd_rig, tmp_path):
    rig = rbd_rig
    _start_target(rig)
    rig.start_source()
    wait_for(lambda: len(rig.events()) >= 4, 90, "four applied cycles")
    final = rig.finish()
    events = rig.events()
    assert events[0]["full"] and events[0]["cycle"] == 1
    assert all(not e["full"] for e in events[1:]), events
    # Every cycle's snapshot, read by the target right after its apply, is the freeze.
    checked = 0
    for name in os.listdir(rig.snapdir):
        if name.endswith(".img") and name[0].isdigit():
            cycle = int(name.split(".")[0])
            assert same_file(os.path.join(rig.snapdir, name), rig.export(cycle)), cycle
            checked += 1
    assert checked >= 4
    # The last snapshot through Ceph's own client; older ones are gone.
    assert same_file(_rbd_export(rig, final["cycle"], tmp_path / "last.img"),
                     rig.export(final["cycle"]))
    # (older ones are removed in the background once the state says applied)
    wait_for(lambda: _snapshots(rig) == [f"cyclemirror-{final['cycle']}"], 60,
             "only the last cycle's snapshot")
    # No image files in the store: the images are in the pool.
    ndir = os.path.join(rig.tmp, "dst", "mirrors", _node(rig))
    assert not [f for f in os.listdir(ndir) if ".img" in f]
    # status: pool/image@snapshot instead of a path.
    from cyclemirror.daemon.incoming import incoming_status

    (row,) = incoming_status(os.path.join(rig.tmp, "dst"), 0.0)
    assert row["image"] == (f"rbd:{rig.cluster.pool}/{_node(rig)}~v1"
                            f"@cyclemirror-{final['cycle']}"), row
    assert row["applied_cycle"] == final["cycle"]


def test_kill_9_of_target_in_apply_then_source_keeps_the_last_snapshot_at_a_freeze(rbd_rig,
                                                                                  tmp_path):
    rig = rbd_rig
    _start_target(rig, SLOW_APPLY)
    rig.start_source()
    wait_for(lambda: len(rig.events()) >= 2, 90, "the first cycles")
    for _attempt in range(20):  # the apply may end between seeing it and the kill
        wait_for(lambda: _state(rig).get("committed") is not None, 60,
                 "a committed delta on the target")
        rig.kill("target")
        body = _state(rig)
        if body.get("committed") is not None:
            break
        _start_target(rig, SLOW_APPLY)
    else:
        pytest.fail("no kill landed inside an apply")
    applied, cut = body["applied_cycle"], body["committed"]["cycle"]
    assert cut > applied >= 1
    # While the target is down the last snapshot is a freeze instant (the head is torn).
    assert same_file(_rbd_export(rig, applied, tmp_path / "during.img"), rig.export(applied))
    before = len(rig.events())
    _start_target(rig)  # recovery at full speed: the writer goes on meanwhile
    wait_for(lambda: len(rig.events()) >= before + 2, 90, "cycles after the restart")
    # Then the source: it resumes against the RBD image without a full copy.
    rig.kill("source")
    before = len(rig.events())
    rig.start_source()
    wait_for(lambda: len(rig.events()) >= before + 2, 90, "cycles after the source's restart")
    final = rig.finish()
    recovered = [n for n in os.listdir(rig.snapdir) if n.startswith("recovered-")]
    assert recovered
    for name in recovered:  # recovery redid the cut cycle: its snapshot is that freeze
        cycle = int(name.rsplit("-", 1)[1].split(".")[0])
        assert cycle >= cut
        assert same_file(os.path.join(rig.snapdir, name), rig.export(cycle)), name
    later = rig.events()[1:]
    assert later and all(not e["full"] for e in later), later
    # The writer changes ~100 blocks/s; the cycle after the restart carries what it
    # wrote while the target reconnected and recovered (the killed target's watch on
    # the image holds snapshot operations up to osd_client_watch_timeout, 5 s in the
    # test cluster): a fraction of the volume; a full copy would ship all its data.
    # (A quarter was too tight: a fresh Debian run under load shipped 2.02 MiB of 8.)
    assert max(e["bytes_raw"] for e in later) < rig.size // 2, later
    assert same_file(_rbd_export(rig, final["cycle"], tmp_path / "final.img"),
                     rig.export(final["cycle"]))


def test_an_rbd_target_without_the_librbd_binding_says_what_to_install(tmp_path):
    # A build without librbd's headers has no cyclemirror._cext.rbd: play that build.
    code = ("import sys; sys.modules['cyclemirror._cext.rbd'] = None\n"
            "from cyclemirror.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    key = tmp_path / "key"
    from cyclemirror import keys

    keys.write_key_file(str(key), keys.generate_key())
    proc = subprocess.run(
        [sys.executable, "-c", code, "--store", str(tmp_path / "store"), "serve",
         "--listen", "127.0.0.1:0", "--key-file", str(key), "--rbd-pool", "mirrors"],
        capture_output=True, text=True, timeout=60, env=child_env())
    assert proc.returncode != 0
    assert "librbd-dev" in proc.stderr and "librados-dev" in proc.stderr, proc.stderr
    assert "rebuild" in proc.stderr, proc.stderr


def test_rbd_settings_in_the_config_file_are_validated(tmp_path):
    from cyclemirror.daemon.config import config_from_mapping
    from cyclemirror.errors import UsageError

    where = str(tmp_path / "c.toml")
    cfg = config_from_mapping({"rbd_pool": "mirrors", "rbd_namespace": "site-a",
                               "ceph_conf": "ceph.conf", "ceph_client": "client.cm",
                               "ceph_keyring": "/etc/ceph/k"}, where)
    rbd = cfg.rbd_config()
    assert (rbd.pool, rbd.namespace, rbd.client, rbd.keyring) == (
        "mirrors", "site-a", "client.cm", "/etc/ceph/k")
    assert rbd.conf == str(tmp_path / "ceph.conf")  # relative to the config file
    assert config_from_mapping({}, where).rbd_config() is None
    with pytest.raises(UsageError, match="without rbd_pool"):
        config_from_mapping({"ceph_conf": "/etc/ceph/ceph.conf"}, where).rbd_config()
    with pytest.raises(UsageError, match="not a valid Ceph pool"):
        config_from_mapping({"rbd_pool": "a/b"}, where)
    with pytest.raises(UsageError, match="client.NAME"):
        config_from_mapping({"rbd_pool": "p", "ceph_client": "admin"}, where)
