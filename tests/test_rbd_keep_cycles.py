"""``serve --keep-cycles N``: an RBD target keeps the last N cycle snapshots as history.

Proves: which snapshots go (a model of the rule, checked with hypothesis:
the applied cycle's and the N-1 newest before it stay, older cycle snapshots
and leftovers of later cycles go, other names are never touched); the flag
and the config key ``rbd_keep_cycles`` are validated (a whole number >= 1,
only with an RBD pool); and, against the real one-node cluster, a ``serve
--rbd-pool --keep-cycles 3`` daemon after six cycles holds exactly the
snapshots of the last three, each equal to the source at its cycle's freeze
(read back through our librbd binding), ``status`` shows the setting, and a
restart with a smaller N prunes at the next cycle.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyclemirror import keys
from cyclemirror.daemon.config import check_keep_cycles, config_from_mapping
from cyclemirror.errors import UsageError
from cyclemirror.receiver.backend import RbdConfig
from cyclemirror.receiver.rbdbackend import snap_cycle, stale_snapshots
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from tests.support.daemons import Daemon, make_key

SIZE = 4 << 20
BLOCK = 4096

# -- the rule --------------------------------------------------------------------------------

names = st.one_of(st.integers(0, 40).map(lambda c: f"cyclemirror-{c}"),
                  st.sampled_from(["mine", "cyclemirror-", "cyclemirror-07", "cyclemirror-x",
                                   "cyclemirror-1~", "backup-3"]))


@given(st.lists(names, unique=True, max_size=25), st.integers(1, 40), st.integers(1, 8))
def test_the_applied_cycle_and_the_newest_before_it_stay(snaps, applied, keep):
    gone = stale_snapshots(snaps, applied, keep)
    assert set(gone) <= set(snaps)
    stay = [s for s in snaps if s not in gone]
    cycles = {c: s for s in snaps if (c := snap_cycle(s)) is not None}
    # Only cycle snapshots go; other names stay whatever they look like.
    assert all(snap_cycle(s) is not None for s in gone)
    # The newest `keep` cycle snapshots at or before the applied cycle stay, no other.
    older = sorted((c for c in cycles if c <= applied), reverse=True)
    expect = set(older[:keep])
    assert {snap_cycle(s) for s in stay if snap_cycle(s) is not None} == expect
    assert (f"cyclemirror-{applied}" in stay) == (f"cyclemirror-{applied}" in snaps)


def test_snapshot_names_are_read_strictly():
    assert snap_cycle("cyclemirror-12") == 12
    for name in ("cyclemirror-", "cyclemirror-012", "cyclemirror--1", "cyclemirror-1 ",
                 "cyclemirror-\u0663", "other-3"):
        assert snap_cycle(name) is None, name


# -- validation ------------------------------------------------------------------------------

def test_keep_cycles_is_validated_on_the_command_line_and_in_the_config(tmp_path, capsys):
    assert check_keep_cycles("3", "--keep-cycles") == 3
    for bad in ("0", "-1", "x", "1.5", "", "\u0663", 0, True, 2.0, 10001):
        with pytest.raises(UsageError, match="whole number from 1"):
            check_keep_cycles(bad, "--keep-cycles")
    where = str(tmp_path / "c.toml")
    cfg = config_from_mapping({"rbd_pool": "mirrors", "rbd_keep_cycles": 5}, where)
    assert cfg.rbd_config().keep_cycles == 5
    assert config_from_mapping({"rbd_pool": "mirrors"}, where).rbd_config().keep_cycles == 1
    with pytest.raises(UsageError, match="rbd_keep_cycles.*whole number"):
        config_from_mapping({"rbd_pool": "mirrors", "rbd_keep_cycles": 0}, where)
    with pytest.raises(UsageError, match="rbd_keep_cycles given without rbd_pool"):
        config_from_mapping({"rbd_keep_cycles": 2}, where).rbd_config()
    with pytest.raises(UsageError, match="keep_cycles"):
        RbdConfig(pool="p", keep_cycles=0)
    # The serve flag: refused before anything starts, naming the flag.
    from cyclemirror.cli import main

    key = make_key(tmp_path / "key")
    base = ["--store", str(tmp_path / "store"), "serve", "--listen", "127.0.0.1:0",
            "--key-file", key]
    assert main(base + ["--rbd-pool", "mirrors", "--keep-cycles", "0"]) != 0
    assert "--keep-cycles must be a whole number" in capsys.readouterr().err
    assert main(base + ["--keep-cycles", "2"]) != 0
    assert "rbd_keep_cycles given without rbd_pool (--rbd-pool)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "store")


# -- the real cluster ------------------------------------------------------------------------

def _binding_or_skip():
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")


def _snapshot_digest(cluster, image: str, snap: str) -> str:
    """sha256 of one snapshot, read through our binding."""
    from cyclemirror.receiver.rbdbackend import connection
    from tests.support.ceph import rbd_config

    img = connection(rbd_config(cluster)).open(image, snap, True)
    try:
        size = img.size()
        h = hashlib.sha256()
        for off in range(0, size, 1 << 20):
            h.update(img.read(off, min(1 << 20, size - off)))
        return h.hexdigest()
    finally:
        img.close()


def _cycle_snapshots(cluster, image: str) -> list[str]:
    import json

    out = cluster.run("rbd", "snap", "ls", "--format", "json", f"{cluster.pool}/{image}")
    return sorted((s["name"] for s in json.loads(out)), key=lambda n: snap_cycle(n) or -1)


def _settled_snapshots(cluster, image: str, expect: list[str]) -> list[str]:
    """The image's snapshots once they are ``expect`` (old ones are removed in the
    background after the source hears of the apply), or as they are after 60 s."""
    import time

    deadline = time.monotonic() + 60
    while True:
        snaps = _cycle_snapshots(cluster, image)
        if snaps == expect or time.monotonic() > deadline:
            return snaps
        time.sleep(0.5)


def test_serve_keep_cycles_keeps_the_last_n_snapshots_each_at_its_freeze(tmp_path,
                                                                         ceph_cluster):
    _binding_or_skip()
    cluster = ceph_cluster
    key_file = make_key(tmp_path / "mirror.key")
    ceph_args = ("--rbd-pool", cluster.pool, "--ceph-conf", cluster.conf,
                 "--ceph-keyring", cluster.keyring)
    target = Daemon(tmp_path, "dst", key_file=key_file, listen=True, metrics=False, nbd=False,
                    extra=(*ceph_args, "--keep-cycles", "3")).start()
    store = Store.create(os.path.join(tmp_path, "src"), node_name="histnode")
    vol = store.create_volume("v1", SIZE)
    rng = random.Random(19)
    vol.write(0, rng.randbytes(SIZE))
    digests: dict[int, str] = {}

    def frozen(f, reader):
        digests[f.number] = hashlib.sha256(reader.read(0, SIZE)).hexdigest()

    def driver_for(daemon):
        host, port = daemon.listen.rsplit(":", 1)
        return MirrorDriver(vol, (host, int(port)), keys.read_key_file(key_file),
                            MirrorOptions(interval=3600, on_frozen=frozen), store=store)

    image = f"{store.node_id}~v1"
    driver = driver_for(target)
    driver.start()
    try:
        cycles = []
        for _ in range(6):
            for _w in range(8):  # a few blocks changed per cycle, so every cycle differs
                vol.write(rng.randrange(SIZE // BLOCK) * BLOCK, rng.randbytes(BLOCK))
            cycles.append(driver.sync(120))
        assert len(set(digests[c] for c in cycles)) == len(cycles)
        expect = [f"cyclemirror-{c}" for c in cycles[-3:]]
        kept = _settled_snapshots(cluster, image, expect)
        assert kept == expect, (kept, cycles)
        for c in cycles[-3:]:
            assert _snapshot_digest(cluster, image, f"cyclemirror-{c}") == digests[c], c
        (row,) = target.status()["incoming"]
        assert row["keep_cycles"] == 3, row
        assert row["image"] == f"rbd:{cluster.pool}/{image}@cyclemirror-{cycles[-1]}", row
        # A restart with a smaller N prunes the history at the next applied cycle.
        driver.stop()
        target.stop()
        target = Daemon(tmp_path, "dst", key_file=key_file, listen=True, metrics=False,
                        nbd=False, extra=(*ceph_args, "--keep-cycles", "2")).start()
        driver = driver_for(target)
        driver.start()
        vol.write(0, rng.randbytes(BLOCK))
        last = driver.sync(120)
        # The new driver may freeze a cycle of its own as it starts, before or after the
        # write above: keep 2 is the applied cycle and the newest before it, whichever.
        applied = [cycles[-1], *sorted(c for c in digests if cycles[-1] < c <= last)]
        assert applied[-1] == last and len(applied) >= 2, (applied, last)
        expect = [f"cyclemirror-{c}" for c in applied[-2:]]
        assert _settled_snapshots(cluster, image, expect) == expect
        for c in applied[-2:]:
            assert _snapshot_digest(cluster, image, f"cyclemirror-{c}") == digests[c], c
    finally:
        driver.stop()
        store.close()
        target.stop()

