"""The mirror under steady writes: RPO age over time, and write throughput with the mirror running.

Run on demand (needs fio and nbdkit; matplotlib for the PNGs: pip install -e '.[bench]'):

    PYTHONPATH=src python -m pytest bench/bench_rpo.py -s
    PYTHONPATH=src python bench/bench_rpo.py            # the same, through pytest.main

A source and a target daemon run on this host as real ``cyclemirror serve``
processes (the source serves its volumes over NBD on a Unix socket, the target
listens on loopback).  Each variant mirrors its own 1 GiB volume:

  * ``interval``  ``mirror start VOL --to TARGET --interval 0.5``
  * ``rpo``       ``mirror start VOL --to TARGET --rpo 2``; skipped (and said so)
                  while ``mirror start --help`` offers no ``--rpo``
  * ``pace``      ``mirror start VOL --to TARGET --rpo 2 --pace`` (write pacing);
                  skipped while ``mirror start --help`` offers no ``--pace``

fio (``--ioengine=nbd``, one connection) writes through the source's export, and
a thread samples the source daemon's ``status`` every 0.1 s over the control
socket (in-process, one connection: sampling costs the daemon one status call).
Each sample keeps the time and, for each target, ``rpo_age``, ``phase``,
``cycle``, ``applied_cycle`` and the whole ``last_cycle`` dict.

1. Fixed rates (``test_rpo_at_fixed_rates``): 4 KiB random writes (queue depth
   32) at 25, 50 and 100 MiB/s and 1 MiB sequential writes (queue depth 4) at
   200 MiB/s, CYCLEMIRROR_BENCH_SECONDS each (default 60).  Per run: fio's
   achieved write rate and p99 completion latency, RPO age p50/p99/max, the
   p99 over the second half alone (the steady state, without a start's
   transient), the least-squares slope of RPO age against time over the second half of the run
   ("bounded" when below 0.05 s/s), cycles applied, how long the catch-up
   took once the writer stopped (below), the time share of each phase the
   status showed, and the mean of the last cycle's figures (size, duration, and
   every entry of a ``phases`` dict of name -> seconds if the status has one)
   over the cycles the run applied.
2. Rate search (``test_highest_random_write_rate_within_objective``): 4 KiB
   random writes at 10, 25, 50, 75, 100, 150 MiB/s for
   CYCLEMIRROR_BENCH_STEP_SECONDS each (default 20), stopping after the first
   rate whose RPO p99 is 2 s or more; prints the highest rate that stayed under.
3. Throughput (``test_write_throughput_with_mirror_against_nbdkit``): fio 1 MiB
   sequential writes (queue depth 4) and 4 KiB random writes (queue depth 32),
   unthrottled, CYCLEMIRROR_BENCH_TPUT_SECONDS each (default 10), through our
   export of the ``interval`` volume (and of the ``pace`` volume) while it mirrors,
   against ``nbdkit file``
   on a raw file of the same size; both filled beforehand (untimed),
   CYCLEMIRROR_BENCH_ROUNDS interleaved rounds (default 3) with the order
   alternating, ``os.sync()`` before each trial and the mirror caught up
   (``mirror sync``, untimed) before each; medians and ratios against nbdkit.

Before and after each run the mirror catches up: ``mirror sync`` again and
again until two in a row return within 3 s each (the first ships what the
writer left; the source merges that big cycle's overlay only after the next
cycle, and the next freeze was seen to wait that long: status 'idle'), so each
run starts from a mirror that owes nothing (a neighbour's writeback, e.g. the
nbdkit trial before, can stall a freeze too), and the catch-up column says how
long it took after the run, in how many syncs. Each part prints its table,
draws the RPO age over time of each of its runs into a PNG (one subplot per
run, a line at the 2 s objective, the write rate in the title) and keeps every
sample as JSON, all in CYCLEMIRROR_BENCH_OUT (default: a new directory under
bench/out/, which git ignores); the paths are printed. Nothing asserts a
speed.

Choosing what runs: CYCLEMIRROR_BENCH_RUNS=4k-25,4k-50,4k-100,1m-200 (any
subset), CYCLEMIRROR_BENCH_VARIANTS=interval,rpo,pace, CYCLEMIRROR_BENCH_STEP_RATES
=10,25,... (MiB/s), or pytest's -k to pick parts.  This machine is shared: the
load average at the start of each part is printed beside its table.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # tests.support, when run as a script
    sys.path.insert(0, REPO_ROOT)

from cyclemirror.daemon.control import ControlClient  # noqa: E402
from tests.support.daemons import Daemon, run_cli  # noqa: E402

MiB = 1 << 20
VOLUME_SIZE = 1 << 30
SECONDS = float(os.environ.get("CYCLEMIRROR_BENCH_SECONDS", "60"))
STEP_SECONDS = float(os.environ.get("CYCLEMIRROR_BENCH_STEP_SECONDS", "20"))
TPUT_SECONDS = float(os.environ.get("CYCLEMIRROR_BENCH_TPUT_SECONDS", "10"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
SAMPLE_EVERY = 0.1
OBJECTIVE = 2.0  # seconds: the --rpo of the rpo variant, and the bar of the rate search
BOUNDED_SLOPE = 0.05  # s/s: RPO age growing slower than this over the second half is "bounded"
INTERVAL = 0.5
CATCH_UP_TIMEOUT = 900
SETTLED_SYNC = 3.0  # seconds: a 'mirror sync' this quick means the mirror owes nothing
MAX_SYNCS = 12

FOUR_K = ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--norandommap"]
ONE_M = ["--rw=write", "--bs=1M", "--iodepth=4"]
RUNS = {  # name -> (what, MiB/s, fio arguments)
    "4k-25": ("4 KiB random", 25, FOUR_K),
    "4k-50": ("4 KiB random", 50, FOUR_K),
    "4k-100": ("4 KiB random", 100, FOUR_K),
    "1m-200": ("1 MiB sequential", 200, ONE_M),
}
if os.environ.get("CYCLEMIRROR_BENCH_RUNS"):
    RUNS = {r: RUNS[r] for r in os.environ["CYCLEMIRROR_BENCH_RUNS"].split(",")}
STEP_RATES = [int(r) for r in
              os.environ.get("CYCLEMIRROR_BENCH_STEP_RATES", "10,25,50,75,100,150").split(",")]
VARIANTS = os.environ.get("CYCLEMIRROR_BENCH_VARIANTS", "interval,rpo,pace").split(",")
HOW = {"interval": ["--interval", str(INTERVAL)], "rpo": ["--rpo", str(OBJECTIVE)],
       "pace": ["--rpo", str(OBJECTIVE), "--pace"]}
THROUGHPUT = {"1m-seqwrite-qd4": ONE_M, "4k-randwrite-qd32": FOUR_K}
# A part runs for many minutes (runs, then catch-ups); fio and mirror sync have their own bounds.
pytestmark = pytest.mark.timeout(0)


# -- the daemons and their volumes -------------------------------------------------------------

class Bench:
    """A source and a target daemon under one directory, and one mirrored volume per variant."""

    def __init__(self, root: str):
        self.root = root
        self.out = os.environ.get("CYCLEMIRROR_BENCH_OUT") or os.path.join(
            REPO_ROOT, "bench", "out", time.strftime("rpo-%Y%m%d-%H%M%S"))
        os.makedirs(self.out, exist_ok=True)
        self.key = os.path.join(root, "key")
        run_cli("keygen", "--out", self.key)
        self.target = Daemon(root, "target", key_file=self.key, listen=True, nbd=False,
                             metrics=False).start()
        self.source = Daemon(root, "source", key_file=self.key, metrics=False).start()
        helptext = run_cli("mirror", "start", "--help").stdout
        self.has = {"interval": True, "rpo": "--rpo" in helptext, "pace": "--pace" in helptext}
        self.volumes: dict[str, str] = {}

    def volume(self, variant: str) -> str:
        """The variant's volume, created and mirrored (first cycle applied) on first use."""
        if variant not in self.volumes:
            name = f"vol-{variant}"
            self.source.cli("volume", "create", name, "--size", str(VOLUME_SIZE))
            self.source.cli("mirror", "start", name, "--to", self.target.listen, *HOW[variant])
            self.catch_up(name)
            self.volumes[variant] = name
        return self.volumes[variant]

    def uri(self, volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={self.source.nbd_sock}"

    def catch_up(self, volume: str) -> tuple[float, int]:
        """Seconds and number of ``mirror sync`` until two in a row are prompt.

        One sync ships what the writer left; the source merges that big
        cycle's overlay only once the next cycle is applied, and the freeze
        after that was seen to wait for many seconds: a run started then would
        pay for its predecessor.  So sync until two syncs in a row each return within
        SETTLED_SYNC (the second one's freeze came after that merge), at most
        MAX_SYNCS times.
        """
        t0 = time.monotonic()
        syncs = prompt = 0
        while syncs < MAX_SYNCS and prompt < 2:
            t = time.monotonic()
            self.source.cli("mirror", "sync", volume, "--timeout", str(CATCH_UP_TIMEOUT),
                            timeout=CATCH_UP_TIMEOUT + 60)
            syncs += 1
            prompt = prompt + 1 if time.monotonic() - t <= SETTLED_SYNC else 0
        return time.monotonic() - t0, syncs

    def close(self):
        for d in (self.source, self.target):
            try:
                d.stop(timeout=120)
            except AssertionError:
                d.kill()


@pytest.fixture(scope="module")
def bench():
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {tool})")
    with tempfile.TemporaryDirectory(prefix="benchrpo", dir=os.environ.get(
            "CYCLEMIRROR_BENCH_DIR")) as root:
        b = Bench(root)
        try:
            yield b
        finally:
            b.close()
            print(f"\nbench_rpo: PNGs and samples are in {b.out}")


def variant_or_skip(bench: Bench, variant: str) -> str:
    if variant not in VARIANTS:
        pytest.skip(f"variant {variant} not in CYCLEMIRROR_BENCH_VARIANTS")
    if not bench.has[variant]:
        pytest.skip(f"'cyclemirror mirror start --help' offers no {HOW[variant][-1]} yet: the "
                    f"{variant} variant runs once the option exists")
    return bench.volume(variant)


# -- sampling the daemon's status ---------------------------------------------------------------

class Sampler(threading.Thread):
    """Every SAMPLE_EVERY seconds, the status of one volume's mirror rows, keyed by target."""

    def __init__(self, store: str, volume: str):
        super().__init__(daemon=True)
        self.store, self.volume = store, volume
        self.samples: list[dict] = []
        self.t0 = time.monotonic()
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        try:
            with ControlClient(self.store, timeout=30) as client:
                due = time.monotonic()
                while not self.halt.is_set():
                    doc = client.call("status")
                    t = time.monotonic() - self.t0
                    self.samples.append({"t": t, "targets": {
                        row["target"]: {k: row.get(k) for k in (
                            "rpo_age", "phase", "cycle", "applied_cycle", "last_cycle", "phases")}
                        for row in doc["mirrors"] if row["volume"] == self.volume}})
                    due += SAMPLE_EVERY
                    self.halt.wait(max(0.0, due - time.monotonic()))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> list[dict]:
        self.halt.set()
        self.join(30)
        if self.error is not None:
            raise self.error
        return self.samples


# -- fio ----------------------------------------------------------------------------------------

def fio(uri: str, args: list[str], seconds: float, rate_mibs: float | None = None) -> dict:
    """One time-based fio job over the whole volume; its ``write`` side of the JSON report."""
    cmd = ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", f"--size={VOLUME_SIZE}",
           "--time_based", f"--runtime={seconds:g}", "--output-format=json", *args]
    if rate_mibs is not None:
        cmd.append(f"--rate={int(rate_mibs * MiB)}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 5 + 120,
                         check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["write"]


def clat_p99_ms(write: dict) -> float | None:
    pct = (write.get("clat_ns") or {}).get("percentile") or {}
    value = pct.get("99.000000")
    return value / 1e6 if value is not None else None


# -- one measured run ---------------------------------------------------------------------------

@dataclass
class Run:
    """One fio job and the status samples taken from its start until the mirror caught up."""

    label: str
    variant: str
    rate: float | None  # asked MiB/s, None = unthrottled
    seconds: float
    write: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    writer_end: float = 0.0  # sample time at which fio returned
    catch_up: float | None = None  # seconds of 'mirror sync' after that, until one was prompt
    syncs: int = 0  # how many syncs that took

    @property
    def achieved(self) -> float:
        return self.write["bw_bytes"] / MiB

    def rows(self, writing: bool | None = True) -> list[tuple[float, dict]]:
        """(t, first target's row) while fio wrote (True), after (False), or all (None)."""
        out = []
        for s in self.samples:
            row = next(iter(s["targets"].values()), None)
            if row is not None and (writing is None or (s["t"] <= self.writer_end) == writing):
                out.append((s["t"], row))
        return out

    def series(self, writing: bool | None = True) -> list[tuple[float, float]]:
        """(t, rpo_age) of the first target, where it has applied a cycle."""
        return [(t, row["rpo_age"]) for t, row in self.rows(writing) if row["rpo_age"] is not None]

    def figures(self) -> dict:
        """RPO age quantiles, second-half slope and cycles applied, while fio wrote."""
        pts = self.series()
        ages = sorted(a for _, a in pts)
        fig = {"n": len(pts), "p50": None, "p99": None, "max": None, "slope": None,
               "bounded": None, "cycles": 0, "p99_late": None}
        if ages:
            fig.update(p50=quantile(ages, 0.5), p99=quantile(ages, 0.99), max=ages[-1])
        second = [(t, a) for t, a in pts if t >= self.writer_end / 2]
        if second:  # the steady state, without the start's transient
            fig["p99_late"] = quantile(sorted(a for _, a in second), 0.99)
        if len(second) >= 3:
            fig["slope"] = slope(second)
            fig["bounded"] = fig["slope"] < BOUNDED_SLOPE
        applied = [row["applied_cycle"] or 0 for _, row in self.rows()]
        if applied:
            fig["cycles"] = applied[-1] - applied[0]
        return fig

    def phase_share(self, writing: bool = True) -> dict[str, float]:
        """Seconds the status showed each phase (share of samples x time span)."""
        rows = self.rows(writing)
        counts: dict[str, int] = {}
        for _, row in rows:
            counts[row["phase"]] = counts.get(row["phase"], 0) + 1
        span = rows[-1][0] - rows[0][0] if len(rows) > 1 else 0.0
        total = sum(counts.values()) or 1
        return {p: span * c / total for p, c in sorted(counts.items(), key=lambda kv: -kv[1])}

    def last_cycles(self, writing: bool = True) -> list[dict]:
        """The ``last_cycle`` dicts of the cycles applied during (or after) the writes."""
        rows = self.rows(None)
        before = (rows[0][1].get("last_cycle") or {}).get("cycle") if rows else None
        seen: dict[int, dict] = {}
        for t, row in rows:
            last = row.get("last_cycle") or {}
            number = last.get("cycle")
            if not isinstance(number, int) or number == before or number in seen:
                continue
            merged = dict(last)
            if isinstance(row.get("phases"), dict) and "phases" not in merged:
                merged["phases"] = row["phases"]
            merged["_seen_at"] = t
            seen[number] = merged
        return [c for _, c in sorted(seen.items())
                if (c["_seen_at"] <= self.writer_end) == writing]


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values."""
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def measure(bench: Bench, volume: str, run: Run, args: list[str]) -> Run:
    """fio at run.rate through the volume's export, then catch up; sampling throughout.

    The mirror is settled first (untimed): a neighbour's writeback (the nbdkit
    trial before, os.sync()) can stall a freeze for many seconds, and a run
    must not start with an RPO it did not cause.
    """
    bench.catch_up(volume)
    sampler = Sampler(bench.source.store, volume)
    sampler.start()
    try:
        run.write = fio(bench.uri(volume), args, run.seconds, run.rate)
        run.writer_end = time.monotonic() - sampler.t0
        run.catch_up, run.syncs = bench.catch_up(volume)
        time.sleep(1.0)  # a few samples of the caught-up mirror close the timeline
    finally:
        run.samples = sampler.stop()
    return run


# -- printing and drawing -----------------------------------------------------------------------

def fmt(value, spec=".2f", none="-"):
    return none if value is None else format(value, spec)


def print_runs(title: str, runs: list[Run]) -> None:
    print(f"\n== {title} ==  (load average {fmt(os.getloadavg()[0], '.1f')} "
          f"{fmt(os.getloadavg()[1], '.1f')} {fmt(os.getloadavg()[2], '.1f')})")
    print(f"{'run':22} {'variant':8} {'asked':>6} {'fio':>7} {'clat99':>7} {'rpo p50':>8} "
          f"{'p99':>7} {'max':>7} {'p99 2nd':>7} {'slope':>7} {'bounded':>8} {'cycles':>6} "
          f"{'catch-up':>11}")
    print(f"{'':22} {'':8} {'MiB/s':>6} {'MiB/s':>7} {'ms':>7} {'s':>8} {'s':>7} {'s':>7} "
          f"{'half s':>7} {'s/s':>7} {'':>8} {'':>6} {'s (syncs)':>11}")
    for r in runs:
        f = r.figures()
        bounded = "-" if f["bounded"] is None else ("yes" if f["bounded"] else "NO")
        print(f"{r.label:22} {r.variant:8} {fmt(r.rate, '.0f', 'max'):>6} {r.achieved:7.1f} "
              f"{fmt(clat_p99_ms(r.write), '.1f'):>7} {fmt(f['p50']):>8} {fmt(f['p99']):>7} "
              f"{fmt(f['max']):>7} {fmt(f['p99_late']):>7} {fmt(f['slope'], '.3f'):>7} "
              f"{bounded:>8} {f['cycles']:6d} "
              f"{fmt(r.catch_up, '.1f') + f' ({r.syncs})':>11}")
    print(f"per run, while fio wrote and then during the catch-up: seconds in each phase the "
          f"status showed (sampled every {SAMPLE_EVERY:g} s; 'idle' includes any wait before "
          "a freeze), and the mean of the applied cycles' last_cycle figures")
    for r in runs:
        for writing, what in ((True, "writing"), (False, "catch-up")):
            share = "  ".join(f"{p} {s:.1f}" for p, s in r.phase_share(writing).items())
            head = r.label if writing else ""
            print(f"  {head:22} {what:9} phases: {share or '-'}")
            print_cycles(r.last_cycles(writing), " " * 34)


def print_cycles(cycles: list[dict], indent: str) -> None:
    if not cycles:
        print(f"{indent}no cycle applied")
        return
    raw = [c.get("raw_bytes") or 0 for c in cycles]
    wire = [c.get("bytes") or 0 for c in cycles]
    dur = [c.get("duration") or 0.0 for c in cycles]
    print(f"{indent}{len(cycles)} cycles: raw mean {statistics.mean(raw) / MiB:.1f} MiB "
          f"(max {max(raw) / MiB:.1f}), wire mean {statistics.mean(wire) / MiB:.1f} MiB, "
          f"duration mean {statistics.mean(dur):.2f} s (max {max(dur):.2f})")
    with_phases = [c["phases"] for c in cycles if isinstance(c.get("phases"), dict)]
    if not with_phases:
        print(f"{indent}per-phase timings: none in the status (no 'phases' in last_cycle)")
        return
    means: dict[str, float] = {}
    for name in dict.fromkeys(n for ph in with_phases for n in ph):
        values = [float(ph[name]) for ph in with_phases
                  if isinstance(ph.get(name), int | float) and not isinstance(ph[name], bool)]
        if values:
            means[name] = statistics.mean(values)
    print(f"{indent}per-phase mean s over {len(with_phases)} cycles: "
          + "  ".join(f"{n} {v:.3f}" for n, v in means.items()))


def save(bench: Bench, name: str, title: str, runs: list[Run]) -> None:
    """Samples as JSON, and the RPO age timelines as one PNG (if matplotlib is there)."""
    with open(os.path.join(bench.out, f"{name}.json"), "w") as fh:
        json.dump([{"label": r.label, "variant": r.variant, "rate": r.rate, "seconds": r.seconds,
                    "achieved_mibs": r.achieved, "writer_end": r.writer_end,
                    "catch_up": r.catch_up, "syncs": r.syncs,
                    "figures": r.figures(),
                    "samples": r.samples} for r in runs], fh)
    try:
        import matplotlib
    except ImportError:
        print(f"  matplotlib is not installed (pip install -e '.[bench]'): no PNG; samples in "
              f"{bench.out}/{name}.json")
        return
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    colours = {"freezing": "tab:red", "copying": "tab:blue", "applying": "tab:orange",
               "reconnecting": "tab:purple", "broken": "black"}
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.7 * len(runs)), squeeze=False)
    for ax, r in zip(axes[:, 0], runs, strict=True):
        f = r.figures()
        # Background: the phase the status showed (idle left white), one band per sample.
        rows = r.rows(None)
        shown = set()
        for (t, row), (t_next, _) in zip(rows, rows[1:], strict=False):
            colour = colours.get(row["phase"])
            if colour:
                ax.axvspan(t, t_next, color=colour, alpha=0.15, lw=0,
                           label=row["phase"] if row["phase"] not in shown else None)
                shown.add(row["phase"])
        for writing, style in ((True, "-"), (False, ":")):
            pts = r.series(writing)
            if pts:
                ax.plot([t for t, _ in pts], [a for _, a in pts], style, color="tab:blue",
                        lw=1.2, label="RPO age" if writing else "RPO age, catching up")
        ax.axhline(OBJECTIVE, color="red", ls="--", lw=1, label=f"objective {OBJECTIVE:g} s")
        ax.axvline(r.writer_end, color="black", lw=1)
        ax.axvline(r.writer_end / 2, color="grey", ls=":", lw=1)
        asked = "unthrottled" if r.rate is None else f"{r.rate:g} MiB/s asked"
        ax.set_title(f"{r.label} [{r.variant}]: {asked}, {r.achieved:.1f} MiB/s written; "
                     f"RPO p99 {fmt(f['p99'])} s, slope {fmt(f['slope'], '.3f')} s/s, "
                     f"catch-up {fmt(r.catch_up, '.1f')} s ({r.syncs} syncs)", fontsize=9)
        ax.set_ylabel("RPO age (s)")
        ax.set_xlim(0, rows[-1][0] if rows else r.seconds)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("seconds since the writer started (dotted: start of the second half; "
                           "solid: the writer stopped, 'mirror sync' began; shading: phase)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = os.path.join(bench.out, f"{name}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"  RPO age over time: {path}")


# -- the three parts ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(HOW))
def test_rpo_at_fixed_rates(bench, variant):
    volume = variant_or_skip(bench, variant)
    runs = []
    for name, (what, rate, args) in RUNS.items():
        runs.append(measure(bench, volume, Run(f"{name} {what}", variant, rate, SECONDS), args))
    how = " ".join(HOW[variant])
    title = (f"RPO age at fixed write rates, {SECONDS:g} s each, 1 GiB volume, mirror {how} "
             "to a target on this host")
    print_runs(title, runs)
    save(bench, f"fixed-rates-{variant}", title, runs)


@pytest.mark.parametrize("variant", list(HOW))
def test_highest_random_write_rate_within_objective(bench, variant):
    volume = variant_or_skip(bench, variant)
    runs, best = [], None
    for rate in STEP_RATES:
        run = measure(bench, volume, Run(f"step 4k {rate}", variant, rate, STEP_SECONDS), FOUR_K)
        runs.append(run)
        p99 = run.figures()["p99"]
        if p99 is None or p99 >= OBJECTIVE:
            break
        best = rate
    title = (f"rate search: 4 KiB random writes, {STEP_SECONDS:g} s per rate, stop at the "
             f"first RPO p99 >= {OBJECTIVE:g} s ({variant})")
    print_runs(title, runs)
    print(f"highest 4 KiB random write rate with RPO p99 < {OBJECTIVE:g} s [{variant}]: "
          + (f"{best} MiB/s" if best is not None else f"none of {STEP_RATES} MiB/s"))
    save(bench, f"rate-search-{variant}", title, runs)


def test_write_throughput_with_mirror_against_nbdkit(bench):
    ours = {"cyclemirror": bench.volume("interval")}
    if "pace" in VARIANTS and bench.has["pace"]:
        ours["cyclemirror+pace"] = bench.volume("pace")
    raw = os.path.join(bench.root, "nbdkit.raw")
    with open(raw, "wb") as fh:
        fh.truncate(VOLUME_SIZE)
    sock = os.path.join(bench.root, "nbdkit.sock")
    nbdkit = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", raw],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
        uris = {"nbdkit": f"nbd+unix:///?socket={sock}",
                **{server: bench.uri(vol) for server, vol in ours.items()}}
        # Fill both (untimed) so neither trial pays for first allocation the other does not.
        fill = ["--rw=write", "--bs=1M", "--iodepth=4"]
        for uri in uris.values():
            subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}",
                            f"--size={VOLUME_SIZE}", "--output-format=json", *fill],
                           capture_output=True, check=True, timeout=600)
        for vol in ours.values():
            bench.catch_up(vol)
        results: dict[tuple[str, str], list[Run]] = {}
        order = [*ours, "nbdkit"]
        for rnd in range(ROUNDS):
            for workload, args in THROUGHPUT.items():
                for server in order if rnd % 2 == 0 else order[::-1]:
                    os.sync()
                    run = Run(f"{workload} r{rnd + 1}", server, None, TPUT_SECONDS)
                    if server in ours:
                        measure(bench, ours[server], run, args)
                    else:
                        run.write = fio(uris[server], args, TPUT_SECONDS)
                    results.setdefault((workload, server), []).append(run)
    finally:
        nbdkit.terminate()
        nbdkit.wait(10)
    print(f"\n== write throughput, unthrottled, {TPUT_SECONDS:g} s per trial, {ROUNDS} "
          f"interleaved rounds, median: our export with the mirror running ("
          + "; ".join(f"{server}: {' '.join(HOW['pace' if 'pace' in server else 'interval'])}"
                      for server in ours)
          + f"; target on this host) against nbdkit file ==  (load average "
          f"{os.getloadavg()[0]:.1f})")
    print(f"{'workload':20} {'server':16} {'MiB/s':>8} {'IOPS':>8} {'x nbdkit':>9}   "
          "all rounds MiB/s   [ours: RPO p99 / max s, slope s/s, catch-up s (syncs), per round]")
    for workload in THROUGHPUT:
        base = statistics.median(r.achieved for r in results[(workload, "nbdkit")])
        for server in (*ours, "nbdkit"):
            runs = results[(workload, server)]
            mibs = statistics.median(r.achieved for r in runs)
            iops = statistics.median(r.write["iops"] for r in runs)
            extra = ""
            if server in ours:
                extra = "   [" + "; ".join(
                    f"{fmt(f['p99'], '.1f')}/{fmt(f['max'], '.1f')}, {fmt(f['slope'], '.2f')}, "
                    f"{fmt(r.catch_up, '.1f')} ({r.syncs})" for r in runs for f in [r.figures()]) + "]"
            print(f"{workload:20} {server:16} {mibs:8.1f} {iops:8.0f} {mibs / base:9.2f}   "
                  + " ".join(f"{r.achieved:.1f}" for r in runs) + extra)
    trials = [r for (w, s), rs in results.items() if s in ours for r in rs]
    print_runs("the same trials through our export: RPO and phases", trials)
    save(bench, "throughput", "RPO age during unthrottled fio trials through our export", trials)


if __name__ == "__main__":
    sys.exit(pytest.main([os.path.abspath(__file__), "-s", "-q", "-p", "no:cacheprovider",
                          *sys.argv[1:]]))
