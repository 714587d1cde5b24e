"""Run a mirror target or a mirror source (with a writer) in a child process, for tests.

    python tests/support/mirror_proc.py [--failpoint NAME=SECONDS]... target STORE KEYFILE PORTFILE SNAPDIR
    python tests/support/mirror_proc.py source STORE KEYFILE PORTFILE WORKDIR SIZE SEED [INTERVAL]

``--failpoint`` enables a failpoint (cyclemirror/failpoints.py) in this process
before anything starts.

Target: opens (or creates) the store, serves on 127.0.0.1 (the port in
PORTFILE if it exists, so a restart keeps the address; else a free one,
written there), copies every image to SNAPDIR/<cycle>.img right after each
apply, and at start copies the recovered image to SNAPDIR/recovered-<n>.img
(the state's applied cycle is in the name) so a test can check recovery.
With MIRROR_TEST_RBD set (JSON: pool, conf, client, keyring) the images live
in that Ceph pool, and the copies are read from the applied cycle's snapshot.

Source: opens (or creates) the store and volume ``v1`` of SIZE bytes; a
writer thread makes random block writes (seeded) all the time; the driver
exports each frozen image to WORKDIR/export-<cycle>.img before shipping and
appends one JSON line per applied cycle to WORKDIR/events.jsonl.
MIRROR_TEST_BWLIMIT (bytes/s) caps the mirror's rate.  When the
file WORKDIR/stop appears, the writer stops, the driver syncs, and the
process writes WORKDIR/final.json and exits.
"""

import json
import os
import random
import shutil
import sys
import threading
import time

from cyclemirror import failpoints, keys
from cyclemirror.errors import NotFoundError
from cyclemirror.receiver import TargetServer
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store


def open_store(path):
    if os.path.exists(os.path.join(path)):
        return Store.open(path)
    return Store.create(path)


def rbd_config():
    """The RbdConfig MIRROR_TEST_RBD names, or None (a file target)."""
    spec = os.environ.get("MIRROR_TEST_RBD")
    if not spec:
        return None
    from cyclemirror.receiver.backend import RbdConfig

    return RbdConfig(**json.loads(spec))


def copy_rbd_snapshot(rbd, node, cycle, dst):
    """Read v1's snapshot of ``cycle`` into the file ``dst`` (through our binding)."""
    from cyclemirror.receiver import rbdbackend

    img = rbdbackend.connection(rbd).open(rbdbackend.image_name(node, "v1"),
                                          rbdbackend.snap_name(cycle), True)
    try:
        size = img.size()
        with open(dst, "wb") as f:
            for off in range(0, size, 4 << 20):
                f.write(img.read(off, min(4 << 20, size - off)))
    finally:
        img.close()


def run_target(store_path, keyfile, portfile, snapdir):
    store = open_store(store_path)
    port = int(open(portfile).read()) if os.path.exists(portfile) else 0
    os.makedirs(snapdir, exist_ok=True)
    rbd = rbd_config()

    def snapshot(mirror):
        st = mirror.state
        tmp = os.path.join(snapdir, f".{st.applied_cycle}.tmp")
        if rbd is None:
            shutil.copyfile(mirror.image_path(0), tmp)
        else:
            copy_rbd_snapshot(rbd, st.source_node, st.applied_cycle, tmp)
        os.replace(tmp, os.path.join(snapdir, f"{st.applied_cycle}.img"))

    server = TargetServer(store, keys.read_key_file(keyfile), ("127.0.0.1", port),
                          on_applied=snapshot, rbd=rbd)
    # Recover and copy what recovery left before listening: a source still running
    # reconnects at once (a target's error asks it for a cycle) and would apply the next
    # cycle into the image while it is copied here.  start() recovers again: nothing left.
    os.makedirs(os.path.join(store_path, "mirrors"), exist_ok=True)
    server._recover_all()
    mdir = os.path.join(store_path, "mirrors")
    for node in os.listdir(mdir):
        img = os.path.join(mdir, node, "v1.img")
        state = os.path.join(mdir, node, "v1.state.json")
        if os.path.exists(state) and (rbd is not None or os.path.exists(img)):
            applied = json.load(open(state))["body"]["applied_cycle"]
            if rbd is not None and not applied:
                continue  # nothing in the pool yet
            n = len([f for f in os.listdir(snapdir) if f.startswith("recovered-")])
            # Copied under a temp name: the test may kill this process mid-copy (a restart
            # finds the old port file and does not wait), and a cut copy is not an image.
            tmp = os.path.join(snapdir, f".recovered-{n}.tmp")
            if rbd is None:
                shutil.copyfile(img, tmp)
            else:
                copy_rbd_snapshot(rbd, node, applied, tmp)
            os.replace(tmp, os.path.join(snapdir, f"recovered-{n}-{applied}.img"))
    server.start()
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.address[1]))
    os.replace(tmp, portfile)
    while True:
        time.sleep(3600)


def run_source(store_path, keyfile, portfile, workdir, size, seed, interval=0.1):
    store = open_store(store_path)
    try:
        vol = store.open_volume("v1")
    except NotFoundError:
        vol = store.create_volume("v1", size)
        vol.write(0, random.Random(seed).randbytes(size // 4))
    while not os.path.exists(portfile):
        time.sleep(0.05)
    port = int(open(portfile).read())
    events = open(os.path.join(workdir, "events.jsonl"), "a")

    def on_frozen(frozen, reader):
        path = os.path.join(workdir, f"export-{frozen.number}.img")
        # A restarted source re-ships its newest frozen cycle: same image, keep it.
        if not os.path.exists(path):
            reader.export_to(path)

    def on_applied(cycle, label, stats):
        events.write(json.dumps({"cycle": cycle, "pid": os.getpid(), **stats}) + "\n")
        events.flush()

    driver = MirrorDriver(vol, ("127.0.0.1", port), keys.read_key_file(keyfile),
                          MirrorOptions(interval=interval, on_frozen=on_frozen,
                                        on_applied=on_applied, retry_max=0.5,
                                        bwlimit=int(os.environ.get("MIRROR_TEST_BWLIMIT", "0"))),
                          store=store)
    stop_writer = threading.Event()

    def writer():
        rng = random.Random(seed * 7919 + os.getpid())
        nblocks = size // 4096
        while not stop_writer.is_set():
            # ~100 blocks/s: enough to change every cycle, few enough that a
            # delta stays far below a full copy even after a restart's pause.
            for _ in range(2):
                vol.write(rng.randrange(nblocks) * 4096, rng.randbytes(4096))
            vol.flush()
            time.sleep(0.02)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    driver.start()
    while not os.path.exists(os.path.join(workdir, "stop")):
        time.sleep(0.05)
    stop_writer.set()
    t.join()
    # No cycle of the loop's own after the final one: tests compare the target with
    # the cycle this sync returns (the interval is read at every wait).
    driver.options.interval = 3600
    cycle = driver.sync(120)
    with open(os.path.join(workdir, "final.json"), "w") as f:
        json.dump({"cycle": cycle, "status": driver.status()}, f)
    driver.stop()
    store.close()


if __name__ == "__main__":
    argv = sys.argv[1:]
    while argv and argv[0] == "--failpoint":
        failpoints.enable(*failpoints.parse_spec(argv[1]))
        argv = argv[2:]
    role, *args = argv
    if role == "target":
        run_target(*args)
    else:
        store_path, keyfile, portfile, workdir, size, seed, *rest = args
        run_source(store_path, keyfile, portfile, workdir, int(size), int(seed),
                   *(float(x) for x in rest))
