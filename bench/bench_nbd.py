"""NBD server throughput with fio's nbd engine, against nbdkit's file plugin in the same run.

Run on demand:  PYTHONPATH=src python -m pytest bench/bench_nbd.py -s
(CYCLEMIRROR_BENCH_SECONDS=N sets each fio trial's length, default 4;
CYCLEMIRROR_BENCH_ROUNDS=N the number of interleaved rounds, default 3;
CYCLEMIRROR_BENCH_WORKLOADS=a,b runs only those workloads, e.g. 1m-seqwrite-qd4,
to spend a locked run's minutes on more rounds of one.)

Workloads (fio --ioengine=nbd over a Unix socket, one connection):
  * 4 KiB random writes, queue depth 32      (target: >= 0.5x nbdkit's IOPS)
  * 1 MiB sequential writes, queue depth 4   (target: >= 0.8x nbdkit's MiB/s)
  * 4 KiB random reads, queue depth 32
Servers, each on a 512 MiB image filled with data beforehand, page cache warm:
  * nbdkit   `nbdkit file` on the raw image (its default parallel thread model:
             up to 16 requests of one connection in flight at once)
  * nbdkit-t1  the same with `--threads=1`, i.e. one request at a time per
             connection like our loop: shown to separate the cost of serial
             processing from the cost of our code
  * raw      our NbdServer with a writable RawFileBackend on the same raw image
  * volume   our NbdServer exporting a store Volume imported from that image,
             while another thread freezes it and merges the previous overlay
             every second (the issue's condition for the targets)
  * vol-still  the same Volume without freezes: separates the cost of the
             store's write path from the cost of the freezes and merges
The servers run one after the other, interleaved round after round with the
order rotated each round, so a busy neighbour on this shared 2-core machine
(and the page cache's writeback of the previous trial) hits all of them alike;
the table prints medians and the ratios against nbdkit, never asserts a speed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import threading
import time

import pytest

from cyclemirror.nbd import NbdServer, RawFileBackend, VolumeBackend
from cyclemirror.store import Store

MiB = 1 << 20
SIZE = 512 * MiB
SECONDS = int(os.environ.get("CYCLEMIRROR_BENCH_SECONDS", "4"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
INTERVAL = 1.0  # seconds from one freeze to the next in the "volume" trials
SERVERS = ["nbdkit", "nbdkit-t1", "raw", "volume", "vol-still"]
WORKLOADS = {
    "4k-randwrite-qd32": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "1m-seqwrite-qd4": ["--rw=write", "--bs=1M", "--iodepth=4"],
    "4k-randread-qd32": ["--rw=randread", "--bs=4k", "--iodepth=32"],
}
if os.environ.get("CYCLEMIRROR_BENCH_WORKLOADS"):
    WORKLOADS = {w: WORKLOADS[w] for w in os.environ["CYCLEMIRROR_BENCH_WORKLOADS"].split(",")}


def fio(uri: str, args: list[str]) -> tuple[float, float]:
    """One fio trial; returns (IOPS, MiB/s) of its one job."""
    out = subprocess.run(
        ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--size={SIZE}",
         "--time_based", f"--runtime={SECONDS}", "--ramp_time=1", "--output-format=json",
         *args],
        capture_output=True, text=True, timeout=SECONDS * 10 + 60, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] else job["read"]
    return side["iops"], side["bw_bytes"] / MiB


class Freezer(threading.Thread):
    """Freeze the volume every second and merge the overlay the freeze closed off.

    The schedule is DESIGN.md's: the next freeze comes at max(previous freeze +
    1 s, merge done), i.e. one second from freeze to freeze (not one second of
    rest after each merge, which let slow merges thin out the freezes).
    """

    def __init__(self, vol):
        super().__init__(daemon=True)
        self.vol = vol
        self.stop = threading.Event()
        self.freezes = 0
        self.freeze_s: list[float] = []  # how long each freeze() and merge took
        self.merge_s: list[float] = []
        self.error: BaseException | None = None

    def run(self):
        try:
            due = time.monotonic() + INTERVAL
            while not self.stop.wait(max(0.0, due - time.monotonic())):
                due = time.monotonic() + INTERVAL
                t0 = time.monotonic()
                cycle = self.vol.freeze()
                t1 = time.monotonic()
                self.vol.merge_through(cycle.number - 1)
                self.freeze_s.append(t1 - t0)
                self.merge_s.append(time.monotonic() - t1)
                self.freezes += 1
        except BaseException as exc:  # reported in the table
            self.error = exc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    root = tmp_path_factory.mktemp("benchnbd")
    raw = root / "image.raw"
    chunk = os.urandom(MiB)
    with open(raw, "wb") as f:
        for _ in range(SIZE // MiB):
            f.write(chunk)
    store = Store.create(str(root / "store"))
    vol = store.import_volume("vol", str(raw))
    nbdkit_sock = str(root / "nbdkit.sock")
    nbdkit = subprocess.Popen(["nbdkit", "-f", "-U", nbdkit_sock, "file", str(raw)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    nbdkit1_sock = str(root / "nbdkit1.sock")
    nbdkit1 = subprocess.Popen(["nbdkit", "-f", "--threads=1", "-U", nbdkit1_sock, "file",
                                str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    backend = RawFileBackend(raw, readonly=False)
    raw_server = NbdServer(lambda n: backend if n == "raw" else None,
                           unix_path=str(root / "raw.sock")).start()
    vol_server = NbdServer(lambda n: VolumeBackend(vol) if n == "vol" else None,
                           unix_path=str(root / "vol.sock")).start()
    deadline = time.monotonic() + 10
    while not (os.path.exists(nbdkit_sock) and os.path.exists(nbdkit1_sock)):
        assert time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.05)
    yield {
        "nbdkit": f"nbd+unix:///?socket={nbdkit_sock}",
        "nbdkit-t1": f"nbd+unix:///?socket={nbdkit1_sock}",
        "raw": raw_server.uri("raw"),
        "volume": vol_server.uri("vol"),
        "vol-still": vol_server.uri("vol"),
        "vol": vol,
    }
    raw_server.stop()
    vol_server.stop()
    for proc in (nbdkit, nbdkit1):
        proc.terminate()
        proc.wait(10)
    backend.close()
    store.close()


def test_fio_against_nbdkit(env, benchmark):
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    freezes = []
    phases: dict[str, list[tuple[float, float]]] = {}  # workload -> (freeze s, merge s) each

    def one_round():
        turn = len(freezes) // len(WORKLOADS)  # rounds done so far
        order = SERVERS[turn % len(SERVERS):] + SERVERS[:turn % len(SERVERS)]
        for workload, args in WORKLOADS.items():
            for server in order:
                freezer = Freezer(env["vol"]) if server == "volume" else None
                if freezer:
                    freezer.start()
                try:
                    results.setdefault((workload, server), []).append(fio(env[server], args))
                finally:
                    if freezer:
                        freezer.stop.set()
                        freezer.join(60)
                        assert freezer.error is None, freezer.error
                        freezes.append(freezer.freezes)
                        phases.setdefault(workload, []).extend(
                            zip(freezer.freeze_s, freezer.merge_s, strict=True))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    print(f"\nfio --ioengine=nbd, {SECONDS} s per trial, {ROUNDS} interleaved rounds, "
          f"median of rounds; volume trials saw {min(freezes)}..{max(freezes)} freezes each")
    print(f"{'workload':20} {'server':9} {'IOPS':>10} {'MiB/s':>9} {'x nbdkit':>9}   all rounds (IOPS)")
    for workload in WORKLOADS:
        base_iops = statistics.median(i for i, _ in results[(workload, "nbdkit")])
        for server in SERVERS:
            trials = results[(workload, server)]
            iops = statistics.median(i for i, _ in trials)
            mibs = statistics.median(m for _, m in trials)
            print(f"{workload:20} {server:9} {iops:10.0f} {mibs:9.1f} {iops / base_iops:9.2f}   "
                  + " ".join(f"{i:.0f}" for i, _ in trials))
    print("volume trials, seconds per freeze() and per merge (median, max):")
    for workload, pairs in phases.items():
        fz, mg = [p[0] for p in pairs], [p[1] for p in pairs]
        print(f"  {workload:20} {len(pairs):3} freezes   freeze {statistics.median(fz):.3f} "
              f"{max(fz):.3f}   merge {statistics.median(mg):.3f} {max(mg):.3f}")
