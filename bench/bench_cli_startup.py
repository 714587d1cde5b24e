"""Start-up of the command line: `--help` and `status --json` against the interpreter's floor.

Run on demand:  PYTHONPATH=src:. python -m pytest bench/bench_cli_startup.py -s
           or:  PYTHONPATH=src:. python bench/bench_cli_startup.py

Monitoring scripts run `cyclemirror status --json` every few seconds, so what
counts is the whole process, end to end, as a shell sees it: fork, exec, the
interpreter's start-up (site, .pth files), our imports, the parser, one
request to a running daemon, the JSON printed.  Each command is timed from
before `subprocess.run` to after the child exited.

Measured, for each interpreter:
  * floor   `python -c pass` with the same interpreter and environment (the
            peer: what no change of ours can go below), and `python -S -c pass`
  * help    `cyclemirror --help`
  * status  `cyclemirror --store DIR status --json` against a daemon started
            here on a temporary store holding one volume
Interpreters:
  * dev     this interpreter (``sys.executable``), running the console
            script's code (``from cyclemirror.cli import main``) with the
            package from each directory in CYCLEMIRROR_BENCH_SRC
            (os.pathsep-separated; default: the one this process imports) on
            PYTHONPATH, so two trees compare in one run, its .pyc files written by a warm-up run
            (PYTHONDONTWRITEBYTECODE is dropped for the children);
  * venv    DIR/bin/cyclemirror and DIR/bin/python for each DIR in
            CYCLEMIRROR_BENCH_VENVS (os.pathsep-separated), e.g. the `.venv`
            the README makes (`scripts/install-deps && .venv/bin/pip install .`),
            which is what users run; the package is whatever is installed there
            (printed).
Rounds (CYCLEMIRROR_BENCH_ROUNDS, default 20) interleave every command with
the order rotated each round, so a busy neighbour hits all alike.  Prints,
in ms, min and median and the median's excess over the floor, for the wall
time (fork to exit) and for the child's CPU time (user + system, which a
busy neighbour disturbs less), and the load average before and after; never
asserts a time (the targets on the shared 2-core machine: --help 50 ms,
status --json 80 ms, wall).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # tests.support, when run as a script
    sys.path.insert(0, REPO_ROOT)

import cyclemirror  # noqa: E402
from tests.support.daemons import Daemon, run_cli  # noqa: E402

ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "20"))
ENTRY = "import sys; from cyclemirror.cli import main; sys.exit(main())"


def _loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def _interpreters(store: str) -> list[tuple[str, dict, dict]]:
    """(label, {command: argv}, env) for each interpreter measured."""
    srcs = os.environ.get("CYCLEMIRROR_BENCH_SRC") or os.path.dirname(
        os.path.dirname(os.path.abspath(cyclemirror.__file__)))
    env = dict(os.environ)
    env.pop("CYCLEMIRROR_STORE", None)
    # As installed, the modules come from .pyc files: let the warm-up run write them.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    py = sys.executable
    found = []
    for src in filter(None, srcs.split(os.pathsep)):
        found.append((f"dev {src}", {
            "floor -S": [py, "-S", "-c", "pass"],
            "floor": [py, "-c", "pass"],
            "--help": [py, "-c", ENTRY, "--help"],
            "status --json": [py, "-c", ENTRY, "--store", store, "status", "--json"],
        }, dict(env, PYTHONPATH=src)))
    venv_env = dict(env)
    venv_env.pop("PYTHONPATH", None)  # a user's shell: the venv's own site-packages only
    for venv in filter(None, os.environ.get("CYCLEMIRROR_BENCH_VENVS", "").split(os.pathsep)):
        vpy, script = os.path.join(venv, "bin", "python"), os.path.join(venv, "bin", "cyclemirror")
        if not os.access(script, os.X_OK):
            raise SystemExit(f"{script} is missing: install the package into {venv} first "
                             f"('{venv}/bin/pip install .')")
        found.append((f"venv {venv}", {
            "floor -S": [vpy, "-S", "-c", "pass"],
            "floor": [vpy, "-c", "pass"],
            "--help": [script, "--help"],
            "status --json": [script, "--store", store, "status", "--json"],
        }, venv_env))
    return found


def _where(argv_python: str, env: dict) -> str:
    proc = subprocess.run([argv_python, "-c", "import cyclemirror.cli as c; print(c.__file__)"],
                          capture_output=True, text=True, env=env, timeout=60)
    return proc.stdout.strip() or proc.stderr.strip().splitlines()[-1]


def _run_once(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one child, run to its end."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, env=env, timeout=60)
    elapsed = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return elapsed, cpu


def measure(store: str) -> None:
    interpreters = _interpreters(store)
    jobs = [(label, name, argv, env) for label, commands, env in interpreters
            for name, argv in commands.items()]
    for label, commands, env in interpreters:
        python = commands["floor"][0]
        print(f"\n{label}: {python}\n  imports {_where(python, env)}")
    for _, _, argv, env in jobs:  # warm the page cache and the .pyc files
        _run_once(argv, env)
    wall: dict[tuple[str, str], list[float]] = {(j[0], j[1]): [] for j in jobs}
    cpu: dict[tuple[str, str], list[float]] = {(j[0], j[1]): [] for j in jobs}
    load_before = _loadavg()
    for r in range(ROUNDS):
        shift = r % len(jobs)
        for label, name, argv, env in jobs[shift:] + jobs[:shift]:
            w, c = _run_once(argv, env)
            wall[label, name].append(w)
            cpu[label, name].append(c)
    load_after = _loadavg()
    print(f"\n{ROUNDS} interleaved rounds; load average before {load_before}, "
          f"after {load_after}")
    print("wall: fork to exit; cpu: the child's user + system time (less hit by a busy "
          "neighbour); ms")
    print(f"{'interpreter':<32} {'command':<14} {'wall min':>8} {'median':>7} "
          f"{'- floor':>8} {'x floor':>7} {'cpu min':>8} {'median':>7} {'- floor':>8}")
    for label, commands, _ in interpreters:
        floor, cfloor = (statistics.median(t[label, "floor"]) for t in (wall, cpu))
        for name in commands:
            w, c = wall[label, name], cpu[label, name]
            med, cmed = statistics.median(w), statistics.median(c)
            print(f"{label[-32:]:<32} {name:<14} {min(w) * 1e3:8.1f} {med * 1e3:7.1f} "
                  f"{(med - floor) * 1e3:8.1f} {med / floor:7.2f} {min(c) * 1e3:8.1f} "
                  f"{cmed * 1e3:7.1f} {(cmed - cfloor) * 1e3:8.1f}")


def test_cli_startup_against_python_floor():
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as root:
        daemon = Daemon(root, "src", nbd=False, metrics=False).start()
        try:
            run_cli("volume", "create", "v1", "--size", "1M", store=daemon.store)
            measure(daemon.store)
        finally:
            daemon.stop()


if __name__ == "__main__":
    test_cli_startup_against_python_floor()
