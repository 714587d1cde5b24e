"""pgbench TPS with a tree cycle every second against pgbench without mirroring.

Run on demand (root: it makes btrfs images on loop devices and runs
Debian's PostgreSQL as the postgres user):
    PYTHONPATH=src:. python -m pytest bench/bench_tree_postgres.py -s

Debian's PostgreSQL (tests/support/pgcluster.py: a Unix socket, default
initdb settings, fsync on) runs on a data directory that is a btrfs
subvolume on one loop device, made a tree object; its mirror is a plain tree
on a second btrfs loop file system.  pgbench is initialised at
CYCLEMIRROR_BENCH_PG_SCALE (default 10, about 150 MiB) and cycle 1 shipped.

Then CYCLEMIRROR_BENCH_ROUNDS (default 3) rounds, each two pgbench runs of
CYCLEMIRROR_BENCH_PG_SECONDS (default 20) with CYCLEMIRROR_BENCH_PG_CLIENTS
(default 2) clients, in alternating order, after a CHECKPOINT each:

* **mirrored**: after a cycle that ships what changed since the last mirrored
  run, a thread runs a cycle every second (the next starts one
  second after the previous started, or when it ends if it took longer):
  freeze (a read-only snapshot), the delta, its frames through a socketpair
  into the target's apply, the merge (``tests.support.trees.library_cycle``,
  the path the test ``tests/test_tree_postgres.py`` checks);
* **plain**: pgbench alone.

It prints each run's TPS, the medians and their ratio mirrored / plain (the
issue's target: at least 0.8), the cycles' median duration and bytes, and
the load average.  After the last round a clone of the target is recovered
by a second PostgreSQL and pg_amcheck'ed, so the copies measured were good
ones.  What is not in it: the daemons, TLS, compression, a network (the
daemon does not run tree cycles yet; the target is a second file system on
the same host and disk).  Nothing asserts a time.
"""

import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cyclemirror.store import tree  # noqa: E402
from tests.support import pgcluster as pg  # noqa: E402
from tests.support.loopfs import loopfs_or_skip  # noqa: E402
from tests.support.trees import delete_subvolumes, library_cycle, subvolume  # noqa: E402

SECONDS = int(os.environ.get("CYCLEMIRROR_BENCH_PG_SECONDS", "20"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
SCALE = int(os.environ.get("CYCLEMIRROR_BENCH_PG_SCALE", "10"))
CLIENTS = int(os.environ.get("CYCLEMIRROR_BENCH_PG_CLIENTS", "2"))
NAME = "pg"


class Cycler:
    """A cycle every second in a thread, until stopped; keeps each cycle's duration and
    bytes (an error ends the thread and is raised by ``stop``)."""

    def __init__(self, obj, target_root: str):
        self.obj, self.root = obj, target_root
        self.cycles: list[tuple[float, int, float]] = []  # duration, bytes, freeze
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cycler", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                f = library_cycle(self.obj, self.root, NAME)
                self.cycles.append((time.monotonic() - start, f.wire_bytes,
                                    f.after - f.before))
                self._stop.wait(max(0.0, start + 1.0 - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread
            self.error = exc

    def start(self) -> "Cycler":
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


def test_pgbench_tps_with_a_tree_cycle_every_second():
    pg.skip_unless_postgres()
    top = pg.workdir("bench-tree-pg-")
    filesystems = []
    try:
        for side in ("source", "target"):
            os.mkdir(os.path.join(top, side))
            filesystems.append(loopfs_or_skip("btrfs", os.path.join(top, side), 8 << 30))
        src_fs, tgt_fs = filesystems
        pgdata = subvolume(src_fs.mount, "pgdata")
        pg.initdb(pgdata, os.path.join(top, "initdb.log"))
        server = pg.PgServer(pgdata, os.path.join(top, "sock"), 5433,
                             os.path.join(top, "source.log"))
        server.start()
        pg.prepare(server, SCALE)
        store = os.path.join(top, "store")
        tree.add_tree(store, "benchnode", NAME, pgdata)
        obj = tree.TreeObject(store, NAME)
        target_root = os.path.join(tgt_fs.mount, "mirror")
        os.mkdir(target_root)
        t = time.monotonic()
        first = library_cycle(obj, target_root, NAME)
        first_s = time.monotonic() - t
        load_before = os.getloadavg()
        mirrored, plain, cycles = [], [], []
        for r in range(ROUNDS):
            for kind in (("mirrored", "plain") if r % 2 == 0 else ("plain", "mirrored")):
                if kind == "plain":
                    plain.append(pgbench_run(server))
                else:
                    # catch up first: the changes of the plain run are not this run's
                    server.psql("CHECKPOINT")
                    library_cycle(obj, target_root, NAME)
                    cycler = Cycler(obj, target_root).start()
                    try:
                        mirrored.append(pgbench_run(server))
                    finally:
                        cycler.stop()
                    cycles += cycler.cycles
                print(f"round {r + 1} {kind}: {(mirrored if kind == 'mirrored' else plain)[-1]:.1f}"
                      " tps", flush=True)
        load_after = os.getloadavg()
        clone = os.path.join(tgt_fs.mount, "clone")
        subprocess.run(["btrfs", "subvolume", "snapshot", os.path.join(target_root, NAME),
                        clone], check=True, capture_output=True)
        check = pg.check_copy(clone, os.path.join(top, "check"), 5434)
        server.stop("fast")
        m_tps, p_tps = statistics.median(mirrored), statistics.median(plain)
        print(f"\npgbench scale {SCALE}, {CLIENTS} clients, {SECONDS} s runs, {ROUNDS} rounds "
              f"(interleaved); load average {load_before[0]:.2f} before, "
              f"{load_after[0]:.2f} after")
        print(f"cycle 1 (full): {first_s:.2f} s, {first.wire_bytes} bytes")
        print("mirrored tps: " + ", ".join(f"{x:.1f}" for x in mirrored)
              + f"; median {m_tps:.1f}")
        print("plain tps:    " + ", ".join(f"{x:.1f}" for x in plain) + f"; median {p_tps:.1f}")
        print(f"cycles while mirrored: {len(cycles)}, median "
              f"{statistics.median(c[0] for c in cycles):.3f} s and "
              f"{int(statistics.median(c[1] for c in cycles))} bytes (freeze "
              f"{statistics.median(c[2] for c in cycles):.3f} s); max "
              f"{max(c[0] for c in cycles):.3f} s, {max(c[1] for c in cycles)} bytes, "
              f"freeze {max(c[2] for c in cycles):.3f} s")
        print(f"ratio mirrored/plain (median tps): {m_tps / p_tps:.2f}x (target >= 0.8x)")
        print(f"a clone of the target after the last round: recovered by itself "
              f"{check.recovered}, pg_amcheck clean")
    finally:
        pg.stop_all()
        for fs in filesystems:
            for entry in os.listdir(fs.mount):
                delete_subvolumes(os.path.join(fs.mount, entry))
            fs.close()
        subprocess.run(["rm", "-rf", top], check=False)
