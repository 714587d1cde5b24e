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

Then CYCLEMIRROR_BENCH_ROUNDS (default 3) rounds, each two pgbench runs of
CYCLEMIRROR_BENCH_PG_SECONDS (default 20) with CYCLEMIRROR_BENCH_PG_CLIENTS
(default 2) clients, in alternating order, after a CHECKPOINT each:

* **mirrored**: ``mirror resume pg`` and ``mirror sync pg`` (the changes of the
  plain run shipped first, not counted), then pgbench while the daemon runs a
  cycle every second;
* **plain**: ``mirror break pg`` (both daemons keep running, idle), then
  pgbench alone.

While a mirrored run goes, the bench asks the source daemon for its status
over the control socket every CYCLEMIRROR_BENCH_PG_POLL seconds (default 0.5):
the cycles applied on the target during the run (cycles per second) and the
RPO age (now minus the freeze time of the newest applied cycle) at each poll.

It prints each run's TPS, the medians and their ratio mirrored / plain (the
issue's target: at least 0.8x), the cycles per second and RPO ages of the
mirrored runs, the daemons' CPU seconds per mirrored second, and the load
average before and after.  After the last round a clone of the target's tree is
recovered by a second PostgreSQL and pg_amcheck'ed, so the copies measured were
good ones.  Nothing asserts a time.
"""

import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cyclemirror.daemon.control_client import ControlClient  # noqa: E402
from tests.support import pgcluster as pg  # noqa: E402
from tests.support.daemons import Daemon, free_port, make_key  # noqa: E402
from tests.support.loopfs import loopfs_or_skip  # noqa: E402
from tests.support.trees import delete_subvolumes, subvolume  # noqa: E402

SECONDS = int(os.environ.get("CYCLEMIRROR_BENCH_PG_SECONDS", "20"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
SCALE = int(os.environ.get("CYCLEMIRROR_BENCH_PG_SCALE", "10"))
CLIENTS = int(os.environ.get("CYCLEMIRROR_BENCH_PG_CLIENTS", "2"))
POLL = float(os.environ.get("CYCLEMIRROR_BENCH_PG_POLL", "0.5"))
NAME = "pg"


def mirror_row(d: Daemon) -> dict:
    with ControlClient(d.store, timeout=30) as client:
        rows = [r for r in client.call("status")["mirrors"] if r["volume"] == NAME]
    assert len(rows) == 1, rows
    return rows[0]


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (its threads included), from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Poller:
    """The source's status every POLL seconds in a thread: (time, applied cycle, RPO age)."""

    def __init__(self, src: Daemon):
        self.src = src
        self.samples: list[tuple[float, int, float | None]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                row = mirror_row(self.src)
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


def pgbench_run(server) -> float:
    server.psql("CHECKPOINT")
    return pg.pgbench_tps(pg.pgbench_start(server, SECONDS, CLIENTS), timeout=SECONDS + 120)


def test_pgbench_tps_with_the_daemons_mirroring_every_second():
    pg.skip_unless_postgres()
    top = pg.workdir("bench-tree-pgd-")
    filesystems, daemons = [], []
    try:
        mounts = []
        for side in ("source", "target"):
            os.mkdir(os.path.join(top, side))
            fs = loopfs_or_skip("btrfs", os.path.join(top, side), 8 << 30)
            filesystems.append(fs)
            mounts.append(fs.mount)
        src_mount, tgt_mount = mounts
        pgdata = subvolume(src_mount, "pgdata")
        pg.initdb(pgdata, os.path.join(top, "initdb.log"))
        server = pg.PgServer(pgdata, os.path.join(top, "sock"), 5435,
                             os.path.join(top, "source.log"))
        server.start()
        pg.prepare(server, SCALE)
        key = make_key(os.path.join(top, "key"))
        src = Daemon(src_mount, "src", key_file=key, nbd=False, metrics=False)
        tgt = Daemon(tgt_mount, "tgt", key_file=key, nbd=False, metrics=False,
                     extra=("--listen", f"127.0.0.1:{free_port()}"))
        for d in (src, tgt):
            daemons.append(d)
            d.start()
        src.cli("tree", "add", NAME, pgdata)
        t = time.monotonic()
        src.cli("mirror", "start", NAME, "--to", tgt.listen, "--interval", "1")
        src.cli("mirror", "sync", NAME, "--timeout", "600")
        first_s = time.monotonic() - t
        fulls = mirror_row(src)["applied_cycle"]
        src.cli("mirror", "break", NAME)
        load_before = os.getloadavg()
        mirrored, plain, rates, ages, cpu = [], [], [], [], []
        for r in range(ROUNDS):
            for kind in (("mirrored", "plain") if r % 2 == 0 else ("plain", "mirrored")):
                if kind == "plain":
                    plain.append(pgbench_run(server))
                    print(f"round {r + 1} plain: {plain[-1]:.1f} tps; load "
                          f"{os.getloadavg()[0]:.2f}", flush=True)
                    continue
                src.cli("mirror", "resume", NAME)
                src.cli("mirror", "sync", NAME, "--timeout", "600")  # the plain run's changes
                poller = Poller(src).start()
                cpu0 = cpu_seconds(src.proc.pid) + cpu_seconds(tgt.proc.pid)
                t0 = time.monotonic()
                try:
                    mirrored.append(pgbench_run(server))
                finally:
                    took = time.monotonic() - t0
                    cpu1 = cpu_seconds(src.proc.pid) + cpu_seconds(tgt.proc.pid)
                    poller.stop()
                src.cli("mirror", "break", NAME)
                s = poller.samples
                rate = (s[-1][1] - s[0][1]) / (s[-1][0] - s[0][0])
                run_ages = [a for _, _, a in s if a is not None]
                rates.append(rate)
                ages += run_ages
                cpu.append((cpu1 - cpu0) / took)
                print(f"round {r + 1} mirrored: {mirrored[-1]:.1f} tps, {rate:.2f} cycles/s "
                      f"applied, RPO age median {statistics.median(run_ages):.2f} s max "
                      f"{max(run_ages):.2f} s, daemons' CPU {cpu[-1]:.2f} s/s; load "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
        load_after = os.getloadavg()
        # the copies were good: a clone of the target's current tree recovers and checks
        src.cli("mirror", "resume", NAME)
        src.cli("mirror", "sync", NAME, "--timeout", "600")
        src.cli("mirror", "break", NAME)
        clone = os.path.join(tgt_mount, "clone")
        subprocess.run(["btrfs", "subvolume", "snapshot",
                        os.path.join(tgt.store, "mirrors", src.node_id, "trees", NAME), clone],
                       check=True, capture_output=True)
        check = pg.check_copy(clone, os.path.join(top, "check"), 5436)
        server.stop("fast")
        m_tps, p_tps = statistics.median(mirrored), statistics.median(plain)
        print(f"\npgbench scale {SCALE}, {CLIENTS} clients, {SECONDS} s runs, {ROUNDS} rounds "
              f"(interleaved), through 'cyclemirror serve' daemons (mirror --interval 1); "
              f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
        print(f"mirror start + sync (cycle 1 full, then {fulls - 1} delta(s)): {first_s:.2f} s")
        print("mirrored tps: " + ", ".join(f"{x:.1f}" for x in mirrored)
              + f"; median {m_tps:.1f}")
        print("plain tps:    " + ", ".join(f"{x:.1f}" for x in plain) + f"; median {p_tps:.1f}")
        print(f"while mirrored: cycles/s applied median {statistics.median(rates):.2f} "
              f"(each run: {', '.join(f'{x:.2f}' for x in rates)}); RPO age median "
              f"{statistics.median(ages):.2f} s, max {max(ages):.2f} s ({len(ages)} polls); "
              f"daemons' CPU median {statistics.median(cpu):.2f} s per second")
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
        subprocess.run(["rm", "-rf", top], check=False)
