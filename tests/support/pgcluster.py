"""A real PostgreSQL for the tests: Debian's binaries, a Unix socket, an unprivileged user.

``bindir()`` finds Debian's server binaries (``/usr/lib/postgresql/NN/bin``,
the newest NN that has them all: they are not on PATH), or
``CYCLEMIRROR_PG_BIN``.  ``skip_unless_postgres()`` skips a test, saying
what is missing, where they or the ``postgres`` user are not there.

PostgreSQL refuses to run as root, and the tests run as root: every server
process (``initdb``, ``postgres``) runs as the ``postgres`` user that
Debian's package makes (``subprocess``'s ``user=``/``group=``), on a data
directory chowned to it, listening only on a Unix socket in a directory of
the caller's (``listen_addresses=''``).  Clients (``psql``, ``pgbench``,
``pg_amcheck``) run as the test and connect as the database user
``postgres`` (``initdb --auth=trust``).

* ``PgServer``: start (waits until it accepts connections, which is after
  any crash recovery), ``psql``, ``stop`` (fast or immediate), ``kill9``
  (SIGKILL to the postmaster's whole process group: PostgreSQL crashing).
  Each server is its own process group; stopping waits until no process of
  the group is left, so the next start on that directory does not meet a
  backend of the old one.  ``stop_all()`` stops every server this process
  started (immediate, then SIGKILL), for fixtures' clean-up.
* ``CounterClient``: a thread that increments ``counter.n`` in committed
  transactions, one ``psql`` session at a time, and logs each value with the
  time it sent the transaction and the time the commit was acknowledged; it
  reconnects after the server was killed.  ``committed_before(t)`` is the
  largest value whose commit was acknowledged before ``t``, a lower bound on
  what a copy frozen at ``t`` must hold; ``sent_by(t)`` the largest value
  sent by ``t`` plus one (a transaction in flight when the server died is
  not in the log but may have committed), an upper bound on what a copy
  frozen by ``t`` can hold.
* ``pgbench_init``, ``pgbench_start`` (a background load), ``pgbench_tps``.
* ``check_copy``: start a second PostgreSQL on a copy of a data directory
  (another socket directory and port), let it recover by itself, run
  ``pg_amcheck --heapallindexed`` (the test database, with the shared
  catalogs, or every database), read the counter, stop it.
* ``workdir``: a directory the postgres user can reach (pytest's are 0700).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest

RUN_AS = "postgres"
SERVER_TOOLS = ("initdb", "postgres", "pg_isready", "psql", "pgbench", "pg_amcheck")
DB = "bench"
COUNTER_TABLE = "counter"


def bindir() -> str | None:
    """Where Debian's PostgreSQL server binaries are (newest version first), or None."""
    env = os.environ.get("CYCLEMIRROR_PG_BIN")
    candidates = [env] if env else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.split("/")[-2])] or [0],
        reverse=True)
    for d in candidates:
        if all(os.access(os.path.join(d, t), os.X_OK) for t in SERVER_TOOLS):
            return d
    return None


def missing() -> str | None:
    """Why PostgreSQL cannot run here, or None."""
    if bindir() is None:
        where = os.environ.get("CYCLEMIRROR_PG_BIN") or "/usr/lib/postgresql/*/bin"
        return (f"PostgreSQL's server binaries ({', '.join(SERVER_TOOLS)}) are not in {where} "
                "(scripts/install-deps installs Debian's postgresql package)")
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        return (f"there is no {RUN_AS!r} user to run PostgreSQL as (Debian's postgresql "
                "package makes it)")
    if os.geteuid() != 0:
        return "running PostgreSQL as the postgres user needs root"
    return None


def skip_unless_postgres() -> str:
    why = missing()
    if why:
        pytest.skip(why)
    return bindir()


def tool(name: str) -> str:
    d = bindir()
    if d is None:
        raise FileNotFoundError(missing())
    return os.path.join(d, name)


def workdir(prefix: str) -> str:
    """A new directory (mode 0755) that the postgres user can reach: under the temporary
    directory when every directory above it lets others through, else under /tmp
    (pytest's own temporary directories are mode 0700)."""
    base = tempfile.gettempdir()
    p = os.path.abspath(base)
    while p != "/":
        if not os.stat(p).st_mode & 0o001:
            base = "/tmp"
            break
        p = os.path.dirname(p)
    d = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(d, 0o755)
    return d


def give_to_postgres(path: str) -> None:
    """chown ``path`` to the postgres user (mode 0700: PostgreSQL insists on it for data)."""
    pw = pwd.getpwnam(RUN_AS)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o700)


def _as_postgres() -> dict:
    return {"user": RUN_AS, "group": pwd.getpwnam(RUN_AS).pw_gid, "extra_groups": []}


def initdb(datadir: str, log: str, *extra: str) -> None:
    """Make a cluster in ``datadir`` (empty, or missing): trust auth, superuser postgres;
    ``extra``: more initdb options (``--wal-segsize=1`` for small WAL files)."""
    os.makedirs(datadir, exist_ok=True)
    give_to_postgres(datadir)
    with open(log, "ab") as fh:
        r = subprocess.run([tool("initdb"), "-D", datadir, "-U", "postgres", "--auth=trust",
                            "-E", "UTF8", "--no-instructions", "--no-sync", *extra],
                           stdout=fh, stderr=subprocess.STDOUT, cwd="/", **_as_postgres())
    if r.returncode:
        raise RuntimeError(f"initdb of {datadir} failed (exit {r.returncode}): "
                           f"{tail(log)}")


def tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - n))
            return fh.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[0] != "Z" and int(rest[2]) == pgid:
            out.append(int(d))
    return out


_servers: list[PgServer] = []
_servers_lock = threading.Lock()


class PgServer:
    """One postmaster on ``datadir``, listening on ``sockdir``/.s.PGSQL.``port`` only."""

    def __init__(self, datadir: str, sockdir: str, port: int, log: str,
                 settings: dict | None = None):
        self.datadir, self.sockdir, self.port, self.log = datadir, sockdir, port, log
        self.settings = {"listen_addresses": "", "fsync": "on", "synchronous_commit": "on",
                         "full_page_writes": "on", "max_connections": "30",
                         "shared_buffers": "32MB", "recovery_init_sync_method": "syncfs",
                         **(settings or {})}
        self.proc: subprocess.Popen | None = None
        self.pgid = 0
        os.makedirs(sockdir, exist_ok=True)
        pw = pwd.getpwnam(RUN_AS)
        os.chown(sockdir, pw.pw_uid, pw.pw_gid)
        os.chmod(sockdir, 0o755)

    def __repr__(self) -> str:
        return f"PostgreSQL on {self.datadir} (socket {self.sockdir}, port {self.port})"

    def conn_args(self) -> list[str]:
        return ["-h", self.sockdir, "-p", str(self.port), "-U", "postgres"]

    def start(self, timeout: float = 60) -> None:
        args = [tool("postgres"), "-D", self.datadir, "-k", self.sockdir, "-p", str(self.port)]
        for k, v in self.settings.items():
            args += ["-c", f"{k}={v}"]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fh,
                                         stderr=subprocess.STDOUT, cwd="/",
                                         start_new_session=True, **_as_postgres())
        self.pgid = self.proc.pid
        with _servers_lock:
            _servers.append(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self!r} exited with {self.proc.returncode} while "
                                   f"starting; its log ends:\n{tail(self.log)}")
            r = subprocess.run([tool("pg_isready"), *self.conn_args(), "-d", "postgres", "-q"],
                               capture_output=True)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop("immediate")
                raise RuntimeError(f"{self!r} did not accept connections within {timeout}s; "
                                   f"its log ends:\n{tail(self.log)}")
            time.sleep(0.05)

    def psql(self, sql: str, db: str = DB, timeout: float = 60) -> str:
        r = subprocess.run([tool("psql"), *self.conn_args(), "-d", db, "-XqAt",
                            "-v", "ON_ERROR_STOP=1", "-c", sql],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"psql on {self!r}: {sql!r} failed: {r.stderr.strip()}")
        return r.stdout.strip()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while group_members(self.pgid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def kill9(self) -> None:
        """PostgreSQL crashing: SIGKILL to the postmaster and all its backends at once."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)
        if not self._wait_group_gone(30):
            raise RuntimeError(f"{self!r}: processes {group_members(self.pgid)} outlived "
                               "SIGKILL for 30 s")
        self._forget()

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Stop (``fast``: SIGINT; ``immediate``: SIGQUIT, recovery at the next start),
        then SIGKILL whatever of its process group is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if not self._wait_group_gone(5 if self.proc.poll() is not None else 0):
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self._wait_group_gone(30)
        self._forget()

    def _forget(self) -> None:
        with _servers_lock:
            if self in _servers:
                _servers.remove(self)
        self.proc = None


def stop_all() -> None:
    """Stop every server this process started and has not stopped (immediate, then SIGKILL)."""
    with _servers_lock:
        servers = list(_servers)
    for s in servers:
        try:
            s.stop("immediate", timeout=10)
        except Exception:  # noqa: BLE001 - clean-up goes on with the others
            s._signal_group(signal.SIGKILL)


# -- the counter ---------------------------------------------------------------------------

def create_counter(server: PgServer, db: str = DB) -> None:
    server.psql(f"CREATE TABLE {COUNTER_TABLE} (id int PRIMARY KEY, n bigint NOT NULL); "
                f"INSERT INTO {COUNTER_TABLE} VALUES (1, 0)", db)


def read_counter(server: PgServer, db: str = DB) -> int:
    out = server.psql(f"SELECT n FROM {COUNTER_TABLE} WHERE id = 1", db)
    if not out.isdigit():
        raise AssertionError(f"{server!r}: the counter row reads {out!r}")
    return int(out)


@dataclass(frozen=True)
class Commit:
    value: int
    sent: float    # time.time() before the transaction was written to psql
    acked: float   # time.time() after psql reported the COMMIT done


class CounterClient:
    """Increments the counter in committed transactions, logging each commit's times."""

    TXN = (f"BEGIN;\nUPDATE {COUNTER_TABLE} SET n = n + 1 WHERE id = 1 RETURNING n;\n"
           "COMMIT;\n\\echo committed\n")

    def __init__(self, server: PgServer, db: str = DB):
        self.server, self.db = server, db
        self.log: list[Commit] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="counter-client", daemon=True)

    def start(self) -> CounterClient:
        self._thread.start()
        return self

    def _session(self) -> None:
        self._proc = p = subprocess.Popen(
            [tool("psql"), *self.server.conn_args(), "-d", self.db, "-XqAt",
             "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1)
        try:
            while not self._stop.is_set():
                sent = time.time()
                p.stdin.write(self.TXN)
                p.stdin.flush()
                value = p.stdout.readline().strip()
                done = p.stdout.readline().strip()
                acked = time.time()
                if done != "committed" or not value.isdigit():
                    return
                with self._lock:
                    self.log.append(Commit(int(value), sent, acked))
        except (BrokenPipeError, ValueError, OSError):
            return
        finally:
            try:
                p.stdin.close()
            except OSError:
                pass
            p.kill()
            err = p.stderr.read().strip()
            p.wait()
            if err and not self._stop.is_set():
                self.errors = [*self.errors[-9:], err[-300:]]

    def _run(self) -> None:
        while not self._stop.is_set():
            self._session()
            if not self._stop.is_set():
                time.sleep(0.05)  # the server is down: try again until it is back

    def stop(self) -> None:
        self._stop.set()
        p = self._proc
        if p is not None and p.poll() is None:
            p.kill()
        self._thread.join(timeout=30)

    def commits(self) -> list[Commit]:
        with self._lock:
            return list(self.log)

    def check_never_went_back(self) -> None:
        """Nothing acknowledged was lost on the source, restarts included: the values this
        one client committed only go up."""
        values = [c.value for c in self.commits()]
        bad = [(a, b) for a, b in zip(values, values[1:], strict=False) if b <= a]
        assert not bad, f"the counter went back after an acknowledged commit: {bad[:5]}"

    def committed_before(self, t: float) -> int:
        """The largest value whose commit was acknowledged before ``t`` (0: none)."""
        best = 0
        for c in self.commits():
            if c.acked < t:
                best = max(best, c.value)
        return best

    def sent_by(self, t: float) -> int:
        """The largest value a transaction sent by ``t`` can have set: the last commit
        logged before ``t`` plus the one in flight then."""
        before = [c for c in self.commits() if c.sent <= t]
        return (max(c.value for c in before) + 1) if before else 1

    def wait_commits(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.commits())
        while len(self.commits()) < start + n:
            if time.monotonic() > deadline:
                raise AssertionError(f"the counter client committed {len(self.commits()) - start}"
                                     f" of {n} transactions in {timeout}s on {self.server!r}; "
                                     f"errors: {self.errors[-3:]}")
            time.sleep(0.01)


# -- pgbench -------------------------------------------------------------------------------

def pgbench_init(server: PgServer, scale: int = 1, db: str = DB) -> None:
    r = subprocess.run([tool("pgbench"), *server.conn_args(), "-i", "-q", "-s", str(scale),
                        db], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"pgbench -i on {server!r} failed: {r.stderr.strip()[-1000:]}")


def pgbench_start(server: PgServer, seconds: int, clients: int = 2,
                  db: str = DB) -> subprocess.Popen:
    """pgbench's TPC-B-like load in the background for ``seconds`` (it exits with an error
    when the server dies; start another)."""
    return subprocess.Popen([tool("pgbench"), *server.conn_args(), "-n", "-c", str(clients),
                             "-j", str(clients), "-T", str(seconds), db],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pgbench_tps(proc: subprocess.Popen, timeout: float | None = None) -> float:
    """Wait for a pgbench run and return its TPS (without connection time)."""
    out, err = proc.communicate(timeout=timeout)
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    if proc.returncode or not m:
        raise RuntimeError(f"pgbench failed (exit {proc.returncode}): {err.strip()[-1000:]}")
    return float(m.group(1))


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.communicate()


# -- a copy of the data directory, recovered by a second server -------------------------------

@dataclass
class CopyCheck:
    counter: int
    recovered: bool      # the server said it ran crash recovery
    amcheck: str         # pg_amcheck's output (empty when all is well)
    log: str


def check_copy(datadir: str, workdir: str, port: int, db: str = DB,
               databases: tuple[str, ...] = ("--database", DB)) -> CopyCheck:
    """Start a second PostgreSQL on ``datadir`` (a throwaway copy: it is written), let it
    recover by itself, run ``pg_amcheck --heapallindexed`` (on ``databases``, pg_amcheck's
    arguments: ``db`` by default, whose relations include the cluster's shared catalogs;
    ``("--all",)`` for every database, about three times as long) and read the counter.

    The copy holds the source's ``postmaster.pid`` (the source was running); on another
    host that PID is nobody's, here it is the live source's, so it is removed first, as a
    restore on this host would.  Raises AssertionError naming what failed, with the log."""
    pid_file = os.path.join(datadir, "postmaster.pid")
    if os.path.exists(pid_file):
        os.unlink(pid_file)
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    log = os.path.join(workdir, "copy.log")
    server = PgServer(datadir, os.path.join(workdir, "sock"), port, log)
    try:
        try:
            server.start()
        except RuntimeError as exc:
            raise AssertionError(f"PostgreSQL did not recover the copy {datadir}: {exc}") \
                from None
        r = subprocess.run([tool("pg_amcheck"), *server.conn_args(), "--heapallindexed",
                            *databases],
                           capture_output=True, text=True)
        report = (r.stdout + r.stderr).strip()
        if r.returncode:
            raise AssertionError(f"pg_amcheck found damage in the copy {datadir} "
                                 f"(exit {r.returncode}):\n{report[-3000:]}")
        counter = read_counter(server, db)
    finally:
        server.stop("immediate")
    text = tail(log, 20000)
    return CopyCheck(counter, "automatic recovery in progress" in text, report, text)


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def prepare(server: PgServer, scale: int = 1, db: str = DB) -> None:
    """amcheck in every database (template1 first, so ``db`` inherits it), ``db`` with
    pgbench's tables at ``scale`` and the counter row."""
    for d in ("template1", "postgres"):
        server.psql("CREATE EXTENSION IF NOT EXISTS amcheck", d)
    server.psql(f"CREATE DATABASE {db}", "postgres")
    pgbench_init(server, scale, db)
    create_counter(server, db)
    server.psql("CHECKPOINT", db)  # a copy's crash recovery starts here, not at initdb


def check_clone(clone: str, workdir: str, port: int, client: CounterClient, cycle: int,
                freeze_time: float, discard) -> tuple[CopyCheck, int]:
    """``check_copy`` of ``clone``, the copy of cycle ``cycle`` frozen at ``freeze_time``,
    then ``discard(clone)``: the copy must recover by itself and hold at least every value
    ``client`` saw acknowledged before that freeze.  (the check, that lower bound)"""
    try:
        res = check_copy(clone, workdir, port)
    finally:
        discard(clone)
    assert res.recovered, f"cycle {cycle}'s copy did not need recovery?\n{res.log}"
    lower = client.committed_before(freeze_time)
    assert res.counter >= lower, (
        f"the copy of cycle {cycle} (frozen at {freeze_time:.6f}) holds counter "
        f"{res.counter}, but {lower} was committed before that freeze")
    return res, lower
