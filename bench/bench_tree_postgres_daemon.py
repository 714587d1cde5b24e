"""pgbench TPS with the daemons mirroring its data directory every second, against pgbench alone.

Run on demand (root: it makes btrfs images on loop devices and runs Debian's
PostgreSQL as the postgres user):
    PYTHONPATH=src:. python -m pytest -p no:timeout bench/bench_tree_postgres_daemon.py -s

What users run, unlike ``bench_tree_postgres.py`` (the library's cycle in the
bench's own process): Debian's PostgreSQL (``tests/support/pgcluster.py``: a
Unix socket, default initdb settings, fsync on) on a data directory that is a
btrfs subvolume of one loop file system; a source ``cyclemirror serve`` (its
store on that file system) holds it as tree object ``pg`` and mirrors it
(``mirror start pg --interval 1``, default compression) over loopback TCP to a
target ``serve`` whose store is on a second btrfs loop file system.  pgbench
is initialised at CYCLEMIRROR_BENCH_PG_SCALE (default 10, about 150 MiB) and
cycle 1 shipped.

Then CYCLEMIRROR_BENCH_ROUNDS (default 3) rounds, each up to five pgbench runs of
CYCLEMIRROR_BENCH_PG_SECONDS (default 20) with CYCLEMIRROR_BENCH_PG_CLIENTS
(default 2) clients, the order rotating from round to round, after a
CHECKPOINT each:

* **mirrored**: ``mirror resume pg --to TARGET``, a CHECKPOINT and ``mirror
  sync pg --to TARGET`` (the changes of the other runs shipped first, not
  counted), then pgbench while the daemon runs a cycle every second;
* **plain**: ``mirror break pg`` (the daemons keep running, idle), then
  pgbench alone;
* **freeze only**: the mirror broken, a thread in the bench makes what a
  cycle makes on the source file system and nothing else: every second a
  read-only btrfs snapshot of the data directory (the freeze, the same ioctl)
  and the deletion of the previous one (the merge).  What this run loses
  against plain is the snapshots' cost to PostgreSQL (btrfs commits a
  transaction for each); what mirrored loses beyond it is the rest of the
  cycle: the delta, the frames, and the target's apply and syncfs, which here
  share the disk (and the 2 CPUs) with PostgreSQL;
* **mirrored, store elsewhere**: the same from a second source daemon whose
  store (the tree's record, the targets' state: written and fsynced at each
  cycle) is in the bench's directory, not on the data's btrfs (its snapshots
  are, beside the subvolume), to the same target;
* **mirrored, memory target** (unless CYCLEMIRROR_BENCH_PG_MEM_TARGET=0): the
  same, to a second target of the same mirror (the first one in a break: a
  fan-out target at a time), a daemon whose btrfs image is a file in
  /dev/shm: its writes and syncfs cost no disk time, as on another host.

CYCLEMIRROR_BENCH_PG_KINDS (kinds separated by ";") runs only some of them.

While a mirrored run goes, the bench asks the source daemon for its status
over the control socket every CYCLEMIRROR_BENCH_PG_POLL seconds (default 0.5):
the cycles applied on the target during the run (cycles per second) and the
RPO age (now minus the freeze time of the newest applied cycle) at each poll.
The other runs poll it alike, so that every kind pays for the polls.

It prints each run's TPS, the medians and their ratios to plain (the issue's
target for mirrored: at least 0.8x), the cycles per second and RPO ages of the
mirrored runs, the daemons' CPU seconds per mirrored second, and the load
average before and after.  After the last round a clone of the target's tree is
recovered by a second PostgreSQL and pg_amcheck'ed, so the copies measured were
good ones.  Nothing asserts a time.
"""

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cyclemirror.daemon.control_client import ControlClient  # noqa: E402
from cyclemirror.store import btrfsioctl  # noqa: E402
from tests.support import pgcluster as pg  # noqa: E402
from tests.support.daemons import Daemon, free_port, make_key  # noqa: E402
from tests.support.loopfs import loopfs_or_skip  # noqa: E402
from tests.support.trees import delete_subvolumes, subvolume  # noqa: E402

SECONDS = int(os.environ.get("CYCLEMIRROR_BENCH_PG_SECONDS", "20"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
SCALE = int(os.environ.get("CYCLEMIRROR_BENCH_PG_SCALE", "10"))
CLIENTS = int(os.environ.get("CYCLEMIRROR_BENCH_PG_CLIENTS", "2"))
POLL = float(os.environ.get("CYCLEMIRROR_BENCH_PG_POLL", "0.5"))
# A second target whose btrfs image is in /dev/shm: what the target's writes on the disk
# PostgreSQL uses cost it (on another host they would not share it).
MEM_TARGET = os.environ.get("CYCLEMIRROR_BENCH_PG_MEM_TARGET", "1") != "0" and \
    os.path.isdir("/dev/shm")
KINDS = ["mirrored", "plain", "freeze only", "mirrored, store elsewhere"] + (
    ["mirrored, memory target"] if MEM_TARGET else [])
if os.environ.get("CYCLEMIRROR_BENCH_PG_KINDS"):  # some of them, e.g. "mirrored;plain"
    KINDS = [k for k in KINDS if k in os.environ["CYCLEMIRROR_BENCH_PG_KINDS"].split(";")]
NAME = "pg"


def mirror_row(d: Daemon, tgt: Daemon) -> dict:
    with ControlClient(d.store, timeout=30) as client:
        rows = [r for r in client.call("status")["mirrors"]
                if r["volume"] == NAME and r["target"] == tgt.listen]
    assert len(rows) == 1, rows
    return rows[0]


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (its threads included), from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Poller:
    """The source's status every POLL seconds in a thread: (time, applied cycle, RPO age)
    of its mirror to ``tgt``."""

    def __init__(self, src: Daemon, tgt: Daemon):
        self.src, self.tgt = src, tgt
        self.samples: list[tuple[float, int, float | None]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                row = mirror_row(self.src, self.tgt)
                self.samples.append((time.monotonic(), row["applied_cycle"], row["rpo_age"]))
                self._stop.wait(POLL)
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread
            self.error = exc

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error


class Freezer:
    """Every second a read-only snapshot of ``subvol`` and the deletion of the previous one,
    in a thread, until stopped (what a cycle does to the source file system)."""

    def __init__(self, subvol: str, where: str):
        self.subvol, self.where = subvol, where
        self.count = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="freezer", daemon=True)

    def _run(self) -> None:
        prev = None
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                snap = os.path.join(self.where, f"snap-{self.count}")
                btrfsioctl.snapshot(self.subvol, snap, readonly=True)
                self.count += 1
                if prev is not None:
                    btrfsioctl.delete_subvolume(prev)
                prev = snap
                self._stop.wait(max(0.0, start + 1.0 - time.monotonic()))
            if prev is not None:
                btrfsioctl.delete_subvolume(prev)
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread
            self.error = exc

    def start(self) -> "Freezer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def polled(src: Daemon, tgt: Daemon):
    """The same status polls as a mirrored run's, so every kind of run pays for them."""
    poller = Poller(src, tgt).start()
    try:
        yield poller
    finally:
        poller.stop()


def pgbench_run(server) -> float:
    server.psql("CHECKPOINT")
    return pg.pgbench_tps(pg.pgbench_start(server, SECONDS, CLIENTS), timeout=SECONDS + 120)


def mirrored_run(src: Daemon, tgt: Daemon, server, daemons: list[Daemon]) -> dict:
    """One pgbench run while ``src`` mirrors to ``tgt`` alone (the mirror's other targets in
    a break): its TPS, cycles/s applied on ``tgt``, RPO ages and the daemons' CPU."""
    src.cli("mirror", "resume", NAME, "--to", tgt.listen)
    # Catch up first: the other runs' changes, and what the run's own CHECKPOINT writes
    # (the dirty pages of the run before) are not this run's to ship.
    server.psql("CHECKPOINT")
    src.cli("mirror", "sync", NAME, "--to", tgt.listen, "--timeout", "600")
    poller = Poller(src, tgt).start()
    cpu0 = sum(cpu_seconds(d.proc.pid) for d in daemons)
    t0 = time.monotonic()
    try:
        tps = pgbench_run(server)
    finally:
        took = time.monotonic() - t0
        cpu1 = sum(cpu_seconds(d.proc.pid) for d in daemons)
        poller.stop()
    src.cli("mirror", "break", NAME)
    s = poller.samples
    return {"tps": tps, "rate": (s[-1][1] - s[0][1]) / (s[-1][0] - s[0][0]),
            "ages": [a for _, _, a in s if a is not None], "cpu": (cpu1 - cpu0) / took}


def test_pgbench_tps_with_the_daemons_mirroring_every_second():
    pg.skip_unless_postgres()
    top = pg.workdir("bench-tree-pgd-")
    filesystems, daemons, extra_dirs = [], [], []
    try:
        mounts = {}
        sides = ["source", "target"] + (["memory target"] if MEM_TARGET else [])
        for side in sides:
            if side == "memory target":
                where = tempfile.mkdtemp(prefix="bench-tree-pgd-", dir="/dev/shm")
                os.chmod(where, 0o755)  # the postgres user checks a clone of it
                extra_dirs.append(where)
            else:
                where = os.path.join(top, side)
                os.mkdir(where)
            fs = loopfs_or_skip("btrfs", where, 8 << 30)
            filesystems.append(fs)
            mounts[side] = fs.mount
        src_mount = mounts["source"]
        pgdata = subvolume(src_mount, "pgdata")
        pg.initdb(pgdata, os.path.join(top, "initdb.log"))
        server = pg.PgServer(pgdata, os.path.join(top, "sock"), 5435,
                             os.path.join(top, "source.log"))
        server.start()
        pg.prepare(server, SCALE)
        key = make_key(os.path.join(top, "key"))
        src = Daemon(src_mount, "src", key_file=key, nbd=False, metrics=False)
        daemons.append(src.start())
        targets = {}
        for side in sides[1:]:
            d = Daemon(mounts[side], "tgt", key_file=key, nbd=False, metrics=False,
                       extra=("--listen", f"127.0.0.1:{free_port()}"))
            daemons.append(d.start())
            targets[side] = d
        tgt = targets["target"]
        src.cli("tree", "add", NAME, pgdata)
        t = time.monotonic()
        for d in targets.values():
            src.cli("mirror", "start", NAME, "--to", d.listen, "--interval", "1")
        src.cli("mirror", "sync", NAME, "--timeout", "600")
        first_s = time.monotonic() - t
        fulls = mirror_row(src, tgt)["applied_cycle"]
        src.cli("mirror", "break", NAME)
        # a second source daemon whose store is not on the data's file system (its
        # snapshots are: beside the subvolume), mirroring the same tree to the target
        src2 = Daemon(top, "src2", key_file=key, nbd=False, metrics=False)
        if "mirrored, store elsewhere" in KINDS:
            daemons.append(src2.start())
            src2.cli("tree", "add", NAME, pgdata)
            src2.cli("mirror", "start", NAME, "--to", tgt.listen, "--interval", "1")
            src2.cli("mirror", "sync", NAME, "--timeout", "600")
            src2.cli("mirror", "break", NAME)
        load_before = os.getloadavg()
        kinds = KINDS
        runs: dict[str, list] = {k: [] for k in kinds}
        snaps = os.path.join(src_mount, "bench-freezes")
        os.mkdir(snaps)
        for r in range(ROUNDS):
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                if kind == "plain":
                    with polled(src, tgt):
                        runs[kind].append({"tps": pgbench_run(server)})
                    extra = ""
                elif kind == "freeze only":
                    freezer = Freezer(pgdata, snaps).start()
                    try:
                        with polled(src, tgt):
                            runs[kind].append({"tps": pgbench_run(server)})
                    finally:
                        freezer.stop()
                    extra = f", {freezer.count} snapshots"
                else:
                    to = targets["memory target" if "memory" in kind else "target"]
                    m = mirrored_run(src2 if "elsewhere" in kind else src, to, server, daemons)
                    runs[kind].append(m)
                    extra = (f", {m['rate']:.2f} cycles/s applied, RPO age median "
                             f"{statistics.median(m['ages']):.2f} s max {max(m['ages']):.2f} s, "
                             f"daemons' CPU {m['cpu']:.2f} s/s")
                print(f"round {r + 1} {kind}: {runs[kind][-1]['tps']:.1f} tps{extra}; load "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
        load_after = os.getloadavg()
        # the copies were good: a clone of the target's current tree recovers and checks
        src.cli("mirror", "resume", NAME, "--to", tgt.listen)
        src.cli("mirror", "sync", NAME, "--to", tgt.listen, "--timeout", "600")
        src.cli("mirror", "break", NAME)
        clone = os.path.join(mounts["target"], "clone")
        subprocess.run(["btrfs", "subvolume", "snapshot",
                        os.path.join(tgt.store, "mirrors", src.node_id, "trees", NAME), clone],
                       check=True, capture_output=True)
        check = pg.check_copy(clone, os.path.join(top, "check"), 5436)
        server.stop("fast")
        p_tps = statistics.median(x["tps"] for x in runs["plain"])
        print(f"\npgbench scale {SCALE}, {CLIENTS} clients, {SECONDS} s runs, {ROUNDS} rounds "
              f"(order rotating), through 'cyclemirror serve' daemons (mirror --interval 1); "
              f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
        print(f"mirror start + sync (cycle 1 full, then {fulls - 1} delta(s)): {first_s:.2f} s")
        for kind in kinds:
            tps = [x["tps"] for x in runs[kind]]
            med = statistics.median(tps)
            print(f"{kind + ':':<27} " + ", ".join(f"{x:.1f}" for x in tps)
                  + f"; median {med:.1f} tps" + ("" if kind == "plain" else
                                                 f", {med / p_tps:.2f}x plain"))
            if kind.startswith("mirrored"):
                ages = [a for x in runs[kind] for a in x["ages"]]
                print(f"{'':<27} cycles/s applied median "
                      f"{statistics.median(x['rate'] for x in runs[kind]):.2f}; RPO age median "
                      f"{statistics.median(ages):.2f} s, max {max(ages):.2f} s "
                      f"({len(ages)} polls); daemons' CPU median "
                      f"{statistics.median(x['cpu'] for x in runs[kind]):.2f} s per second")
        if "mirrored" in runs:
            m_tps = statistics.median(x["tps"] for x in runs["mirrored"])
            print(f"ratio mirrored/plain (median tps): {m_tps / p_tps:.2f}x (target >= 0.8x)")
        print(f"a clone of the target after the last round: recovered by itself "
              f"{check.recovered}, pg_amcheck clean")
    finally:
        pg.stop_all()
        for d in daemons:
            try:
                d.stop()
            except AssertionError:
                d.kill()
        for fs in filesystems:
            for entry in os.listdir(fs.mount):
                delete_subvolumes(os.path.join(fs.mount, entry))
            fs.close()
        for d in [top, *extra_dirs]:
            subprocess.run(["rm", "-rf", d], check=False)
