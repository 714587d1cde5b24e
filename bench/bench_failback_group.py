"""Failback of a consistency group after a forced failover, against a full copy of the group.

Run on demand:  PYTHONPATH=src:. python -m pytest bench/bench_failback_group.py -s

The group variant of bench_failback.py, with the same daemons, data and
client tools:

1. Two volumes ``db`` and ``log`` of CYCLEMIRROR_BENCH_FAILBACK_MB / 2 MiB each
   (default 1024 in all) of mixed data on hosta, mirrored to hostb as group
   ``app`` without compression: the first group cycle is the **full copy**
   measured against (wall time from the first ``mirror start`` to ``mirror
   sync`` returning, and its wire bytes).
2. hosta writes 0.1 % of each member's 4 KiB blocks and is killed; hostb
   promotes the group (``--force``) and writes 1 % of each member's blocks.
3. hosta restarts and learns its members were demoted; split brain is
   resolved on hostb by naming hosta (for the whole group); hostb mirrors
   both members back as group ``app``: the **failback**, timed from the first
   ``mirror start`` to ``mirror sync`` returning, its wire bytes against the
   bytes that differ (the union of both sides' written blocks, per member).
   The images are compared after.

CYCLEMIRROR_BENCH_ROUNDS (default 3) rounds, each on fresh daemons; medians
and each round are printed with the load average.  Nothing asserts a time.
The daemons and the CLI run as installed, from a venv, and each timed part
starts after sync(2), as in bench_failback.py (its module doc: which venv,
CYCLEMIRROR_BENCH_VENV).
"""

import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_failback import (  # noqa: E402
    BLOCK,
    MiB,
    digest,
    installed_cli,
    role,
    sync_rows,
    write_blocks,
)
from bench_mirror import make_mixed_file  # noqa: E402 - the same data as the other benches
from tests.support.daemons import DaemonPool, make_key, wait_for  # noqa: E402

SIZE_MB = int(os.environ.get("CYCLEMIRROR_BENCH_FAILBACK_MB", "1024"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
MEMBERS = ("db", "log")


def test_group_failback_against_a_full_copy():
    results = []
    where = tempfile.mkdtemp(prefix="cm-bench-gfailback-cli-", dir=os.environ.get("TMPDIR"))
    try:
        cli = installed_cli(where)
        print(f"\n  daemons and CLI: {cli[2]}")
        for i in range(ROUNDS):
            tmp = tempfile.mkdtemp(prefix="cm-bench-gfailback-", dir=os.environ.get("TMPDIR"))
            try:
                results.append(_round(tmp, seed=14 + i, cli=cli))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _print_round(i, results[-1])
    finally:
        shutil.rmtree(where, ignore_errors=True)
    _print_medians(results)


def _print_round(i: int, r: dict) -> None:
    print(f"\n  round {i + 1}: full copy {r['full_s']:.2f} s ({r['full_wire'] / MiB:.1f} MiB), "
          f"failback {r['back_s']:.2f} s ({r['back_wire'] / MiB:.2f} MiB), "
          f"{r['full_s'] / r['back_s']:.1f}x; wire / differing "
          f"{r['back_wire'] / r['differing']:.3f}; load {r['load']}")


def _print_medians(results: list[dict]) -> None:
    med = {k: statistics.median(r[k] for r in results)
           for k in ("full_s", "back_s", "full_wire", "back_wire", "differing")}
    speedups = [r["full_s"] / r["back_s"] for r in results]
    print(f"\ngroup failback bench, 2 x {SIZE_MB // 2} MiB, no compression, loopback, "
          f"{ROUNDS} rounds (medians):")
    print(f"  full copy of the group: {med['full_s']:8.2f} s  {med['full_wire'] / MiB:10.1f} MiB")
    print(f"  group failback:         {med['back_s']:8.2f} s  {med['back_wire'] / MiB:10.2f} MiB")
    print(f"  speed-up median {statistics.median(speedups):.1f}x "
          f"(rounds {', '.join(f'{s:.1f}' for s in speedups)}); wire / differing "
          f"{med['back_wire'] / med['differing']:.3f}; load averages "
          f"{'; '.join(r['load'] for r in results)}")


def _round(tmp: str, seed: int, cli: tuple) -> dict:
    key = make_key(os.path.join(tmp, "key"))
    size = SIZE_MB // 2 * MiB
    nblocks = size // BLOCK
    command, env, _where = cli
    with DaemonPool(tmp) as pool:
        a = pool.start("a", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hosta"), command=command, env=env)
        b = pool.start("b", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hostb"), command=command, env=env)
        for n, name in enumerate(MEMBERS):
            src = os.path.join(tmp, f"{name}.img")
            make_mixed_file(src, size, seed=1 + n)
            a.cli("volume", "import", name, "--from", src, timeout=3600)
            os.unlink(src)
        os.sync()  # the imports' writes are on disk: the copy does not pay for them
        t0 = time.perf_counter()
        for name in MEMBERS:
            a.cli("mirror", "start", name, "--to", b.listen, "--group", "app", "--interval",
                  "3600", "--compress", "none")
        full_rows = sync_rows(a, "db")
        full_s = time.perf_counter() - t0
        mirror = wait_for(lambda: b.status()["incoming"], 60, "the group on b")[0]["group"]

        rng = random.Random(seed)
        old = {m: rng.sample(range(nblocks), max(1, nblocks // 1000)) for m in MEMBERS}
        new = {m: rng.sample(range(nblocks), max(1, nblocks // 100)) for m in MEMBERS}
        for name in MEMBERS:
            write_blocks(a, name, old[name], 3)
        a.kill()
        b.cli("mirror", "promote", f"hosta/{mirror}", "--force")
        for name in MEMBERS:
            write_blocks(b, name, new[name], 4)
        a.start()
        wait_for(lambda: {role(a, m).get("role") for m in MEMBERS} == {"demoted"}, 120,
                 "hosta's members demoted")
        b.cli("mirror", "resolve", "db", "--discard-changes-on", "hosta")
        os.sync()
        t0 = time.perf_counter()
        for name in MEMBERS:
            b.cli("mirror", "start", name, "--to", a.listen, "--group", "app", "--interval",
                  "3600", "--compress", "none")
        back_rows = sync_rows(b, "db")
        back_s = time.perf_counter() - t0
        differing = sum(len(set(old[m]) | set(new[m])) for m in MEMBERS) * BLOCK
        for name in MEMBERS:
            assert digest(a, f"mirror/hostb/{name}") == digest(b, name), name
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        return {"full_s": full_s, "full_wire": full_rows[0]["shipped_bytes_total"],
                "back_s": back_s, "back_wire": back_rows[0]["shipped_bytes_total"],
                "differing": differing, "load": load,
                "kept": [k["bytes"] for m in MEMBERS for k in role(a, m).get("kept") or []],
                "json": json.dumps(back_rows[0]["last_cycle"])}
