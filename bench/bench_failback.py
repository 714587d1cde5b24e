"""Failback after a forced failover against a full copy of the volume, and promote time.

Run on demand:  PYTHONPATH=src python -m pytest bench/bench_failback.py -s

Two ``cyclemirror serve`` daemons (hosta, hostb) on loopback, driven through
the CLI as an administrator would, data written through NBD (qemu-io):

1. A volume of CYCLEMIRROR_BENCH_FAILBACK_MB (default 1024) MiB of mixed data
   (bench_mirror.make_mixed_file) on hosta, mirrored to hostb without
   compression (the written blocks are patterns lz4 would shrink to nothing,
   so wire bytes would say little): the first cycle
   is the **full copy** measured against (its wall time from ``mirror start``
   to ``mirror sync`` returning, and its wire bytes).
2. hosta writes 0.1 % of its 4 KiB blocks (random, flushed) and is killed;
   hostb is promoted (``--force``; the promote's own time is printed) and
   writes 1 % of the blocks.
3. hosta restarts and learns it was demoted; split brain is resolved by
   naming hosta (its 0.1 % are kept in a file there); hostb mirrors back:
   the **failback**, timed from ``mirror start`` to ``mirror sync`` returning,
   with its wire bytes against the bytes that differ between the two volumes
   (the union of both sides' written blocks).  The images are compared after.
4. **Promote of a 4 GiB image** (CYCLEMIRROR_BENCH_PROMOTE_MB, default 4096;
   sparse: the copy is zero runs) measured as the promote reports it and as
   the CLI's wall time, median of CYCLEMIRROR_BENCH_ROUNDS (default 3) runs.

The daemons and every CLI process run **as installed**, the way the README
has users run them: ``VENV/bin/cyclemirror`` of a virtual environment with
the package ``pip install``-ed (an entry point in a venv, which does not read
the base interpreter's site-packages ``.pth`` files).  VENV is
CYCLEMIRROR_BENCH_VENV if set (e.g. the ``.venv`` of ``scripts/install-deps``
after ``.venv/bin/pip install .``), else the venv this bench runs in if the
package is installed there (``tox -e bench``), else the checkout's ``.venv``
if it is installed there, else a venv the bench makes in its temp dir and
installs this checkout into (``python3 -m venv``; the wheel ``pip wheel .``
builds with this interpreter's Cython, then ``pip install`` of it there).  The output says which, and the interpreter
start-up floor (``python -c pass``) of the venv and of the dev interpreter.

Before each timed part the bench calls sync(2), so neither the full copy nor
the failback pays for writing back what the steps before it wrote (the
import's 4 GiB, the blocks written through NBD): their fsyncs would.

CYCLEMIRROR_BENCH_LOG_LEVEL=debug starts both daemons with ``--log-level debug``
and prints the failback's timeline: both daemons' log lines from the spawn of
``mirror start`` to the return of ``mirror sync``, in milliseconds since then.

Nothing asserts a time; the ratios are printed.  The machine is shared:
quote medians and say what else ran.
"""

import datetime
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mirror import make_mixed_file  # noqa: E402 - the same data as the other benches
from tests.support.daemons import DaemonPool, make_key, wait_for  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE_MB = int(os.environ.get("CYCLEMIRROR_BENCH_FAILBACK_MB", "1024"))
PROMOTE_MB = int(os.environ.get("CYCLEMIRROR_BENCH_PROMOTE_MB", "4096"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
# debug: both daemons log every step of the failback, printed as one timeline
LOG_LEVEL = os.environ.get("CYCLEMIRROR_BENCH_LOG_LEVEL", "info")
MiB = 1 << 20
BLOCK = 4096


def installed_cli(tmp) -> tuple[tuple, dict, str]:
    """(command, environment, where it came from) of the installed CLI (module doc)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CYCLEMIRROR_STORE", "PYTHONHOME")}
    venv = os.environ.get("CYCLEMIRROR_BENCH_VENV")
    how = "CYCLEMIRROR_BENCH_VENV"
    if not venv and sys.prefix != sys.base_prefix and os.path.exists(
            os.path.join(sys.prefix, "bin", "cyclemirror")):
        venv, how = sys.prefix, "the venv running this bench (tox -e bench)"
    if not venv and os.path.exists(os.path.join(REPO, ".venv", "bin", "cyclemirror")):
        venv, how = os.path.join(REPO, ".venv"), "the checkout's .venv"
    if not venv:
        venv, how = os.path.join(tmp, "venv"), "made in the temp dir from this checkout"
        # The wheel is built by this interpreter's setuptools and Cython (no isolated build
        # environment: that compiles every extension again, ten minutes on this VM).
        wheels = os.path.join(tmp, "wheels")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                        "--no-deps", "-w", wheels, REPO], check=True, timeout=3600)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=600)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q",
                        *[os.path.join(wheels, w) for w in os.listdir(wheels)]], check=True,
                       timeout=3600, env=env)
    exe = os.path.join(venv, "bin", "cyclemirror")
    if not os.access(exe, os.X_OK):
        raise AssertionError(f"{exe} is missing: install the package there first "
                             f"('{venv}/bin/pip install {REPO}') or unset CYCLEMIRROR_BENCH_VENV")
    where = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                            "import cyclemirror; print(cyclemirror.__file__)"], env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    return (exe,), env, f"{exe} ({how}; package {os.path.dirname(where)})"


def start_floor(python: str, env: dict, rounds: int = 5) -> float:
    """Median wall time of ``python -c pass``: what any CLI process costs before our code."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([python, "-c", "pass"], env=env, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def _uri(d, name):
    return f"nbd+unix:///{name}?socket={d.nbd_sock}"


def write_blocks(d, name, blocks, pattern):
    """Write each block (4 KiB of ``pattern``) through NBD, then flush: one qemu-io."""
    script = "".join(f"write -P {pattern} {b * BLOCK} {BLOCK}\n" for b in blocks) + "flush\n"
    subprocess.run(["qemu-io", "-f", "raw", _uri(d, name)], input=script.encode(),
                   check=True, capture_output=True, timeout=3600)


def digest(d, export):
    """sha256 of an export, streamed (a 4 GiB volume is not held in memory)."""
    h = hashlib.sha256()
    with subprocess.Popen(["nbdcopy", _uri(d, export), "-"], stdout=subprocess.PIPE) as proc:
        while chunk := proc.stdout.read(8 * MiB):
            h.update(chunk)
    if proc.returncode:
        raise AssertionError(f"nbdcopy of {export} exited {proc.returncode}")
    return h.hexdigest()


def timeline(logs: dict, since: float, until: float) -> list[str]:
    """The daemons' log lines between two wall-clock instants, merged, each with its
    milliseconds since ``since`` (the log's timestamps have milliseconds)."""
    rows = []
    for who, text in logs.items():
        for line in text.splitlines():
            stamp, _, rest = line.partition(" ")
            try:
                when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").timestamp()
            except ValueError:
                continue
            if since - 0.001 <= when <= until + 0.001:
                rows.append((when, f"{(when - since) * 1000:7.0f} ms {who}: {rest[:200]}"))
    return [text for _, text in sorted(rows)]


def role(d, volume):
    return next((r for r in d.status().get("roles", []) if r.get("volume") == volume), {})


def sync_rows(d, volume):
    return json.loads(d.cli("mirror", "sync", volume, "--json", "--timeout", "3600",
                            timeout=3700).stdout)


def test_failback_against_a_full_copy_and_promote_time():
    tmp = tempfile.mkdtemp(prefix="cm-bench-failback-", dir=os.environ.get("TMPDIR"))
    try:
        _run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(tmp):
    key = make_key(os.path.join(tmp, "key"))
    size = SIZE_MB * MiB
    nblocks = size // BLOCK
    command, env, where = installed_cli(tmp)
    floors = (start_floor(os.path.join(os.path.dirname(command[0]), "python"), env),
              start_floor(sys.executable, dict(os.environ)))
    load_before = loadavg()
    with DaemonPool(tmp) as pool:
        a = pool.start("a", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hosta", "--log-level", LOG_LEVEL),
                       command=command, env=env)
        b = pool.start("b", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hostb", "--log-level", LOG_LEVEL),
                       command=command, env=env)
        src = os.path.join(tmp, "mixed.img")
        make_mixed_file(src, size)
        a.cli("volume", "import", "v", "--from", src, timeout=3600)
        os.unlink(src)
        os.sync()  # the import's writes are on disk: the copy does not pay for them
        t0 = time.perf_counter()
        a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "3600",
              "--compress", "none")
        full_start = time.perf_counter() - t0
        full_rows = sync_rows(a, "v")
        full_seconds = time.perf_counter() - t0
        full_wire = full_rows[0]["shipped_bytes_total"]

        rng = random.Random(14)
        old_blocks = rng.sample(range(nblocks), max(1, nblocks // 1000))
        new_blocks = rng.sample(range(nblocks), max(1, nblocks // 100))
        write_blocks(a, "v", old_blocks, 3)
        a.kill()
        t0 = time.perf_counter()
        promoted = json.loads(b.cli("mirror", "promote", "hosta/v", "--force", "--json").stdout)
        promote_wall = time.perf_counter() - t0
        write_blocks(b, "v", new_blocks, 4)
        a.start()
        wait_for(lambda: role(a, "v").get("role") == "demoted", 120, "hosta demoted")
        b.cli("mirror", "resolve", "v", "--discard-changes-on", "hosta")
        os.sync()  # the same for the failback: the writes above are on disk
        wall0 = time.time()
        t0 = time.perf_counter()
        b.cli("mirror", "start", "v", "--to", a.listen, "--interval", "3600",
              "--compress", "none")
        back_start = time.perf_counter() - t0
        sync_spawn = time.time()
        back_rows = sync_rows(b, "v")
        failback_seconds = time.perf_counter() - t0
        wall1 = time.time()
        back_wire = back_rows[0]["shipped_bytes_total"]
        differing = len(set(old_blocks) | set(new_blocks)) * BLOCK
        written_new = len(set(new_blocks)) * BLOCK
        steps = [line for line in a.log().splitlines() if "failback of v" in line]
        cycles = [line for line in b.log().splitlines()
                  if f"mirror v -> {a.listen}: cycle" in line]
        same = digest(a, "mirror/hostb/v") == digest(b, "v")
        kept = role(a, "v").get("kept") or []

        print(f"\nfailback bench, {SIZE_MB} MiB volume, no compression, loopback, one host; "
              f"load average {load_before} before, {loadavg()} after")
        print(f"  daemons and CLI: {where}")
        print(f"  interpreter start-up floor (python -c pass, median of 5): venv "
              f"{floors[0] * 1000:.0f} ms, dev interpreter {sys.executable} "
              f"{floors[1] * 1000:.0f} ms")
        print(f"  full copy (first cycle):  {full_seconds:8.2f} s  {full_wire / MiB:10.1f} MiB "
              f"on the wire (the 'mirror start' process {full_start:.3f} s)")
        print(f"  failback (1% new, 0.1% old): {failback_seconds:8.2f} s  "
              f"{back_wire / MiB:10.2f} MiB on the wire (the 'mirror start' process "
              f"{back_start:.3f} s, then 'mirror sync' {failback_seconds - back_start:.3f} s)")
        print(f"  speed-up {full_seconds / failback_seconds:.1f}x; wire bytes / differing "
              f"bytes {back_wire / differing:.3f} ({differing} differing, {written_new} "
              f"written on the new primary, {kept[0]['bytes'] if kept else 0} kept on the "
              "old one)")
        print(f"  promote of the {SIZE_MB} MiB image: {promoted['seconds'] * 1000:.1f} ms "
              f"(CLI wall {promote_wall * 1000:.0f} ms); images equal after failback: {same}")
        print("  old primary: " + (steps[-1].split("no copy ")[-1] if steps else "?"))
        print("  new primary: " + "; ".join(c.split(": ", 1)[-1] for c in cycles))
        if LOG_LEVEL == "debug":
            print(f"  timeline of the failback ('mirror start' spawned at 0 ms, 'mirror sync' "
                  f"at {(sync_spawn - wall0) * 1000:.0f} ms, returned at "
                  f"{(wall1 - wall0) * 1000:.0f} ms):")
            for row in timeline({"hosta": a.log(), "hostb": b.log()}, wall0, wall1):
                print("    " + row)
        assert same

        # Promote time of a big (sparse) image, median of ROUNDS runs.
        times, walls = [], []
        for i in range(ROUNDS):
            name = f"p{i}"
            a.cli("volume", "create", name, "--size", f"{PROMOTE_MB}M")
            a.cli("mirror", "start", name, "--to", b.listen, "--interval", "3600")
            sync_rows(a, name)
            a.cli("mirror", "break", name)
            a.cli("mirror", "rm", name)
            t0 = time.perf_counter()
            out = None
            while out is None or out.returncode == 10:  # the source's session is ending
                out = b.cli("mirror", "promote", f"hosta/{name}", "--json", check=False)
            out.check_returncode()
            walls.append(time.perf_counter() - t0)
            times.append(json.loads(out.stdout)["seconds"])
        print(f"  promote of a {PROMOTE_MB} MiB image: median {statistics.median(times) * 1000:.1f}"
              f" ms (runs {', '.join(f'{t * 1000:.1f}' for t in times)} ms; CLI wall median "
              f"{statistics.median(walls) * 1000:.0f} ms)")
