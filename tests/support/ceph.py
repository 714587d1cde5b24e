"""A throwaway one-node Ceph cluster for tests: one mon, one mgr, one bluestore OSD.

Everything lives in one temporary directory: the config, the keyrings, the
monitor's store, the OSD's sparse block file, the logs (the cluster log too),
the admin sockets.  The daemons bind to 127.0.0.1 on a free port and run in the
foreground as our children, so ``stop()`` ends exactly them (and they end with
the test session even when a test fails).

Settings chosen for a small, busy test machine (see issue 19's pitfalls):
the OSD's memory is bounded by a small fixed bluestore cache (autotune off;
``osd_memory_target`` cannot go below 896M), the monitor's free-space warnings
are off (test disks are often fuller than Ceph likes), the pool has one
replica, and no keyring reaches the daemons through ``CEPH_ARGS`` (each finds
its own key through the config's per-daemon section).

``python -m tests.support.ceph DIR`` starts one and waits for Enter (manual use).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

BINARIES = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd")
PACKAGES = "ceph-mon ceph-mgr ceph-osd ceph-common"
POOL = "cmtest"
OSD_BYTES = 4 << 30  # sparse: only what is written takes room
START_TIMEOUT = 120.0


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def rbd_config(cluster: CephCluster):
    """The ``RbdConfig`` of a target that keeps its images in ``cluster``'s test pool."""
    from cyclemirror.receiver.backend import RbdConfig

    return RbdConfig(pool=cluster.pool, conf=cluster.conf, client=cluster.client,
                     keyring=cluster.keyring)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephCluster:
    """Start with ``start()``, end with ``stop()``; ``conf``, ``keyring``, ``pool`` for clients."""

    def __init__(self, directory: str):
        self.dir = os.path.abspath(directory)
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.keyring = os.path.join(self.dir, "admin.keyring")
        self.client = "client.admin"
        self.pool = POOL
        self.procs: list[subprocess.Popen] = []
        self.port = _free_port()

    # -- helpers -----------------------------------------------------------
    def env(self) -> dict:
        env = dict(os.environ)
        env.pop("CEPH_ARGS", None)  # never let a client keyring reach the daemons
        env["CEPH_CONF"] = self.conf
        return env

    def run(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """A ceph CLI command against this cluster; returns its stdout."""
        cmd = list(args)
        if cmd[0] in ("ceph", "rbd", "rados"):
            cmd[1:1] = ["-c", self.conf, "-n", self.client, "--keyring", self.keyring]
        out = subprocess.run(cmd, env=self.env(), capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): "
                               f"{out.stderr.strip()[-2000:]}")
        return out.stdout

    def _spawn(self, *args: str) -> None:
        log = open(os.path.join(self.dir, "log", f"{os.path.basename(args[0])}.out"), "ab")
        try:
            self.procs.append(subprocess.Popen([*args, "-f", "-c", self.conf], env=self.env(),
                                               stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL))
        finally:
            log.close()

    def _write_conf(self, fsid: str) -> None:
        d = self.dir
        text = f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{self.port}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
log to stderr = false
err to stderr = true
debug rocksdb = 0/0
debug bluestore = 0/0
debug bluefs = 0/0
debug bdev = 0/0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
mon data avail warn = 1
mon data avail crit = 0
mon osd full ratio = 0.99
mon osd backfillfull ratio = 0.99
mon osd nearfull ratio = 0.99
# A client killed with -9 keeps its watch on an image until this expires, and
# every snapshot operation waits for that watcher meanwhile (30 s by default).
osd client watch timeout = 5
mgr initial modules =
[mon.a]
mon data = {d}/mon
keyring = {d}/mon.keyring
[mgr.x]
mgr data = {d}/mgr
keyring = {d}/mgr/keyring
[osd.0]
osd data = {d}/osd
keyring = {d}/osd/keyring
osd objectstore = bluestore
bluestore block path = {d}/osd/block.file
bluestore block create = true
bluestore block size = {OSD_BYTES}
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target autotune = false
osd op num shards = 1
osd op num threads per shard = 2
[client.admin]
keyring = {self.keyring}
admin socket = {d}/run/$name.$pid.asok
"""
        with open(self.conf, "w") as f:
            f.write(text)

    # -- life ----------------------------------------------------------------
    def start(self) -> None:
        d = self.dir
        for sub in ("run", "log", "mon", "mgr", "osd"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        fsid = str(uuid.uuid4())
        self._write_conf(fsid)
        try:
            mon_keyring = os.path.join(d, "mon.keyring")
            self.run("ceph-authtool", "--create-keyring", mon_keyring, "--gen-key", "-n", "mon.",
                     "--cap", "mon", "allow *")
            self.run("ceph-authtool", "--create-keyring", self.keyring, "--gen-key", "-n",
                     "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                     "--cap", "mgr", "allow *", "--cap", "mds", "allow *")
            self.run("ceph-authtool", mon_keyring, "--import-keyring", self.keyring)
            monmap = os.path.join(d, "monmap")
            self.run("monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{self.port}]", "--fsid",
                     fsid, monmap)
            self.run("ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap,
                     "--keyring", mon_keyring)
            self._spawn("ceph-mon", "-i", "a")
            self.run("ceph", "auth", "get-or-create", "mgr.x", "mon", "allow profile mgr",
                     "osd", "allow *", "mds", "allow *", "-o", os.path.join(d, "mgr", "keyring"))
            self._spawn("ceph-mgr", "-i", "x")
            osd_uuid = str(uuid.uuid4())
            osd_id = self.run("ceph", "osd", "new", osd_uuid).strip()
            if osd_id != "0":
                raise RuntimeError(f"ceph osd new gave id {osd_id!r}, expected 0")
            self.run("ceph", "auth", "get-or-create", "osd.0", "mon", "allow profile osd",
                     "mgr", "allow profile osd", "osd", "allow *",
                     "-o", os.path.join(d, "osd", "keyring"))
            self.run("ceph-osd", "-c", self.conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid,
                     timeout=120)
            self._spawn("ceph-osd", "-i", "0")
            self.run("ceph", "osd", "pool", "create", self.pool, "8", "8")
            self.run("ceph", "osd", "pool", "set", self.pool, "size", "1",
                     "--yes-i-really-mean-it")
            self.run("rbd", "pool", "init", self.pool, timeout=120)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}); logs in "
                                       f"{self.dir}/log")
            last = self.run("ceph", "pg", "stat", timeout=30, check=False)
            if "active+clean" in last and "unknown" not in last and "peering" not in last \
                    and "creating" not in last:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster did not become healthy in {START_TIMEOUT}s: "
                           f"{last.strip()}; logs in {self.dir}/log")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


if __name__ == "__main__":
    # SIGTERM (and SIGINT, which a shell's background job ignores) end it cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    cluster = CephCluster(sys.argv[1])
    t0 = time.monotonic()
    cluster.start()
    print(f"healthy after {time.monotonic() - t0:.1f}s; conf {cluster.conf}", flush=True)
    try:
        if len(sys.argv) > 2:
            time.sleep(float(sys.argv[2]))
        else:
            input()
    finally:
        cluster.stop()
