"""Promote time of a consistency group against a single volume of the same size per member.

Run on demand:  PYTHONPATH=src python -m pytest bench/bench_promote_group.py -s

Two ``cyclemirror serve`` daemons (hosta, hostb) on loopback, driven through
the CLI.  Each round makes, on hosta, one volume and one group of two volumes,
every one CYCLEMIRROR_BENCH_PROMOTE_MB (default 4096) MiB (sparse: the first
cycle ships zero runs, plus 1 MiB of data written through NBD so the image is
not empty), mirrors them to hostb, stops the mirrors (break, rm) and promotes
on hostb: the single volume, then the group.  Printed: the promote's own time
(as it reports it) and the CLI's wall time, medians of CYCLEMIRROR_BENCH_ROUNDS
(default 3) rounds, and the ratio group / single (a promote renames files, so
a group of two should cost about twice one volume's file operations, and
neither should depend on the size).

Nothing asserts a time.  The machine is shared: quote medians, ratios and the
load average printed at the end.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.support.daemons import DaemonPool, make_key  # noqa: E402

PROMOTE_MB = int(os.environ.get("CYCLEMIRROR_BENCH_PROMOTE_MB", "4096"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))


def _uri(d, name):
    return f"nbd+unix:///{name}?socket={d.nbd_sock}"


def _promote(b, image):
    out = None
    while out is None or out.returncode == 10:  # the source's session is ending
        out = b.cli("mirror", "promote", image, "--json", check=False)
    out.check_returncode()
    return json.loads(out.stdout)


def _walled(fn):
    import time

    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def test_promote_time_of_a_group_against_a_volume():
    tmp = tempfile.mkdtemp(prefix="cm-bench-promote-group-", dir=os.environ.get("TMPDIR"))
    try:
        key = make_key(os.path.join(tmp, "mirror.key"))
        with DaemonPool(tmp) as pool:
            a = pool.start("a", key_file=key, listen=True, metrics=False,
                           extra=("--node-name", "hosta"))
            b = pool.start("b", key_file=key, listen=True, metrics=False,
                           extra=("--node-name", "hostb"))
            single, group, single_wall, group_wall = [], [], [], []
            for i in range(ROUNDS):
                names = [f"s{i}", f"g{i}a", f"g{i}b"]
                for name in names:
                    a.cli("volume", "create", name, "--size", f"{PROMOTE_MB}M")
                    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", "-c",
                                    "flush", _uri(a, name)], check=True, capture_output=True)
                a.cli("mirror", "start", names[0], "--to", b.listen, "--interval", "3600")
                for name in names[1:]:
                    a.cli("mirror", "start", name, "--to", b.listen, "--interval", "3600",
                          "--group", f"grp{i}")
                for name in names[:2]:
                    a.cli("mirror", "sync", name, "--timeout", "3600", timeout=3700)
                    a.cli("mirror", "break", name)
                mirror = next(r["group"] for r in b.status()["incoming"]
                              if r["volume"] == names[1])
                for name in names:
                    a.cli("mirror", "rm", name)
                out, wall = _walled(lambda n=names[0]: _promote(b, f"hosta/{n}"))
                single.append(out["seconds"])
                single_wall.append(wall)
                out, wall = _walled(lambda m=mirror: _promote(b, f"hosta/{m}"))
                assert out["volumes"] == names[1:]
                group.append(out["seconds"])
                group_wall.append(wall)
            ms = [statistics.median(x) * 1000 for x in (single, group, single_wall, group_wall)]
            print(f"\n  promote, {PROMOTE_MB} MiB per volume, median of {ROUNDS}: one volume "
                  f"{ms[0]:.1f} ms (CLI wall {ms[2]:.0f} ms); a group of two {ms[1]:.1f} ms "
                  f"(CLI wall {ms[3]:.0f} ms); group / volume {ms[1] / ms[0]:.2f}x")
            print(f"  runs: volume {', '.join(f'{t * 1000:.1f}' for t in single)} ms; group "
                  f"{', '.join(f'{t * 1000:.1f}' for t in group)} ms; load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
