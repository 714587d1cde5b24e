"""A tree object's delta cycle, in one process, against rsync of the same change.

Run on demand (root: it makes a btrfs image on a loop device):
    PYTHONPATH=src:. python -m pytest bench/bench_tree.py -s

A btrfs file system on a loop device holds a subvolume of
CYCLEMIRROR_BENCH_TREE_FILES (default 20000) files of 1 to 64 KiB in
directories of 100, made a tree object.  Cycle 1 is shipped to a target
directory on the same btrfs, and ``rsync -a`` makes its own copy.

Each round rewrites 4 KiB at a random place in CYCLEMIRROR_BENCH_CHANGE
(default 0.01) of the files, then measures

* **ours**: freeze (a read-only snapshot), the delta between the two
  snapshots (the inodes btrfs says changed, FIEMAP of the changed files), its frames,
  and the target's apply from those bytes (a writable snapshot as the stage,
  the ops, syncfs, the exchange): wall time of each phase, and the frame bytes;
* **walked**: the same delta by walking the new snapshot whole (how it was
  made before ``treediff`` asked btrfs what changed), timed apart from ours'
  total and checked to give the same ops;
* **rsync**: ``rsync -a --delete --no-whole-file --stats`` of the source into
  its copy: wall time, and the bytes its sender and receiver exchanged;

and checks both copies equal the source at that instant (after every round,
or with CYCLEMIRROR_BENCH_VERIFY=last only after the last one: reading every
file of both copies is minutes a round at 100,000 files; a change missed in
an earlier round still shows, as changes accumulate).  At 100,000 files run
it with ``-p no:timeout`` (setting up takes longer than pytest's 600 s).  What is *not* in
ours: the daemon, the socket, TLS and compression (this is the tree code
alone; ``bench_tree_daemon.py`` measures the daemons' cycle against rsync
to an rsync daemon, what users feel), and rsync reads the live tree, not a
frozen one.  Each round prints where the cycle's time went (``Phases``:
functions wrapped in this process only) and the time the target took to
make the next cycle's stage ahead (``TreeMirror.prepare_next``, as the
daemon does once it has answered ``applied``), which is not in "total".  CYCLEMIRROR_BENCH_ROUNDS (default 3) rounds; the
table prints medians, the ratio rsync / ours and the load average.  Nothing
asserts a time.
"""

import io
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cyclemirror.receiver.treeops import TreeMirror  # noqa: E402
from cyclemirror.store import tree, treediff  # noqa: E402
from cyclemirror.wire import treeframes  # noqa: E402
from tests.support.loopfs import loopfs_or_skip  # noqa: E402
from tests.support.trees import assert_same_tree, subvolume  # noqa: E402

FILES = int(os.environ.get("CYCLEMIRROR_BENCH_TREE_FILES", "20000"))
CHANGE = float(os.environ.get("CYCLEMIRROR_BENCH_CHANGE", "0.01"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
VERIFY = os.environ.get("CYCLEMIRROR_BENCH_VERIFY", "each")  # or "last": after the last round


class Phases:
    """Wall time spent inside chosen functions during one cycle (wrapped in this process
    only, for the breakdown the table prints; the library is not changed by it)."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **kw):
            depth = self._depth.get(name, 0)
            self._depth[name] = depth + 1
            t0 = time.monotonic()
            try:
                return fn(*a, **kw)
            finally:
                self._depth[name] = depth
                if depth == 0:  # recursion counts once
                    self.t[name] = self.t.get(name, 0.0) + time.monotonic() - t0

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        out, self.t = self.t, {}
        return out


PHASES = Phases()


def _wrap_phases() -> None:
    from cyclemirror.receiver import treeops
    from cyclemirror.store import btrfsioctl

    PHASES.wrap(btrfsioctl, "changed_inodes", "src.search")
    PHASES.wrap(treediff, "changed_content", "src.compare")
    PHASES.wrap(treediff, "_data_ranges", "src.compare")
    PHASES.wrap(treeops.TreeMirror, "_make_stage", "tgt.stage")
    PHASES.wrap(treeops._Apply, "finish", "tgt.finish")  # noqa: SLF001
    PHASES.wrap(treeops, "syncfs", "tgt.syncfs")
    PHASES.wrap(treeops.TreeMirror, "_save", "tgt.record")
    PHASES.wrap(treeops, "renameat2", "tgt.exchange")
    PHASES.wrap(treeops.TreeMirror, "_remove", "tgt.rm_old")
    for name in ("prepare_next",):
        if hasattr(treeops.TreeMirror, name):
            PHASES.wrap(treeops.TreeMirror, name, "tgt.prepare_next")


def make_tree(src: str, rnd: random.Random) -> list[str]:
    paths = []
    for d in range(-(-FILES // 100)):
        os.mkdir(os.path.join(src, f"d{d:04}"))
        for f in range(min(100, FILES - d * 100)):
            p = os.path.join(src, f"d{d:04}", f"f{f:03}")
            with open(p, "wb") as fh:
                fh.write(rnd.randbytes(rnd.choice([1, 4, 8, 16, 64]) << 10))
            paths.append(p)
    return paths


def one_cycle(obj, mirror) -> dict:
    if obj._walk:  # noqa: SLF001 (what the next delta starts from, for the comparison)
        _kept[obj._walk[0]] = obj._walk[1]
    PHASES.take()
    t0 = time.monotonic()
    k = obj.freeze()
    t1 = time.monotonic()
    new = obj.snapshot_path(k)
    delta = obj.delta(k)
    t2 = time.monotonic()

    def open_new(rel):
        return os.open(os.path.join(new, rel), os.O_RDONLY | os.O_NOFOLLOW)

    data = b"".join(treeframes.encode_tree_delta(delta.ops, open_new, k, obj.freeze_time(k),
                                                 k == 1))
    t3 = time.monotonic()
    reader = treeframes.TreeFrameReader(treeframes.read_exact_from(io.BytesIO(data)))
    mirror.apply(reader.events())
    t4 = time.monotonic()
    phases = PHASES.take()
    walked = 0.0
    if k > 1:  # the same delta by walking the new snapshot whole, as before the search
        t5 = time.monotonic()
        full = treediff.tree_delta(obj.snapshot_path(k - 1), obj.snapshot_path(k),
                                   obj_walk(obj, k - 1), search=False)
        walked = time.monotonic() - t5
        assert full.ops == delta.ops
        obj.merge_through(k - 1)
    # The next cycle's stage, made after the switch as the daemon does once it has
    # answered 'applied' (off the cycle's path there: the source is waiting for its next
    # freeze); timed apart, never in "total".
    t6 = time.monotonic()
    ahead = mirror.prepare_next() if hasattr(mirror, "prepare_next") else False
    ahead_s = time.monotonic() - t6
    return {"freeze": t1 - t0, "delta": t2 - t1, "frames": t3 - t2, "apply": t4 - t3,
            "total": t4 - t0, "bytes": len(data), "ops": len(delta.ops), "cycle": k,
            "walked": walked, "how": delta.new_walk.how, "phases": phases,
            "ahead": ahead_s if ahead else 0.0, "stage": getattr(mirror, "last_stage", "")}


def obj_walk(obj, k: int):
    """The walk of snapshot k the object kept before this cycle's delta replaced it."""
    return _kept.get(k)


_kept: dict = {}


def rsync(src: str, dst: str) -> tuple[float, int]:
    t = time.monotonic()
    out = subprocess.run(["rsync", "-a", "--delete", "--no-whole-file", "--stats",
                          src + "/", dst + "/"], check=True, capture_output=True,
                         text=True).stdout
    took = time.monotonic() - t
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
    recv = int(re.search(r"Total bytes received: ([\d,]+)", out).group(1).replace(",", ""))
    return took, sent + recv


def test_tree_cycle_against_rsync():
    if subprocess.run(["which", "rsync"], capture_output=True).returncode:
        pytest.skip("rsync is not installed")
    work = tempfile.mkdtemp(prefix="bench-tree-")
    fs = loopfs_or_skip("btrfs", work, max(1 << 30, FILES * 40_000 * 3))
    try:
        rnd = random.Random(1)
        src = subvolume(fs.mount, "src")
        paths = make_tree(src, rnd)
        store = os.path.join(work, "store")
        tree.add_tree(store, "benchnode", "t", src)
        obj = tree.TreeObject(store, "t")
        root = os.path.join(fs.mount, "target")
        os.mkdir(root)
        mirror = TreeMirror(root, "t")
        _wrap_phases()
        first = one_cycle(obj, mirror)
        rcopy = os.path.join(fs.mount, "rsync-copy")
        rsync(src, rcopy)
        ours, theirs = [], []
        for _ in range(ROUNDS):
            changed = rnd.sample(paths, max(1, int(len(paths) * CHANGE)))
            for p in changed:
                fd = os.open(p, os.O_WRONLY)
                try:
                    size = os.fstat(fd).st_size
                    os.pwrite(fd, rnd.randbytes(4096), rnd.randrange(0, max(1, size - 4096)))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            ours.append(one_cycle(obj, mirror))
            theirs.append(rsync(src, rcopy))
            print(f"\nround {len(ours)}: ours {ours[-1]['total']:.3f} s (freeze "
                  f"{ours[-1]['freeze']:.3f}, delta {ours[-1]['delta']:.3f}, frames "
                  f"{ours[-1]['frames']:.3f}, apply {ours[-1]['apply']:.3f}; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sorted(ours[-1]["phases"].items()))
                  + f"; stage {ours[-1]['stage'] or 'snapshot'}), next stage made ahead "
                  f"{ours[-1]['ahead']:.3f} s, rsync {theirs[-1][0]:.3f} s, "
                  f"load {os.getloadavg()[0]:.2f}",
                  flush=True)
            if VERIFY == "each" or len(ours) == ROUNDS:
                assert_same_tree(obj.snapshot_path(ours[-1]["cycle"]), mirror.path)
                assert subprocess.run(["diff", "-r", "-q", src, rcopy]).returncode == 0
        med = {k: statistics.median(r[k] for r in ours) for k in ours[0]
               if k not in ("how", "phases", "stage")}
        r_time = statistics.median(t for t, _ in theirs)
        r_bytes = statistics.median(b for _, b in theirs)
        print(f"\ntree of {FILES} files, {CHANGE:.1%} changed per round (4 KiB each), "
              f"{ROUNDS} rounds; load average {os.getloadavg()[0]:.2f}")
        print(f"cycle 1 (full): {first['total']:.2f} s, {first['bytes']} frame bytes")
        print("ours (median): " + ", ".join(f"{k} {med[k]:.3f} s" for k in
                                            ("freeze", "delta", "frames", "apply", "total"))
              + f", {int(med['ops'])} ops, {int(med['bytes'])} frame bytes")
        print(f"delta made by: {sorted({r['how'] for r in ours})}; the same delta walking the "
              f"new snapshot whole (median): {med['walked']:.3f} s")
        print(f"rsync (median): {r_time:.3f} s, {int(r_bytes)} bytes exchanged")
        print(f"ratio rsync/ours: time {r_time / med['total']:.2f}x, "
              f"bytes {r_bytes / med['bytes']:.2f}x")
        mirror.close()
    finally:
        from tests.support.trees import delete_subvolumes

        for d in ("src", "target", "rsync-copy"):
            delete_subvolumes(os.path.join(fs.mount, d))
        store_snaps = os.path.join(fs.mount, ".cyclemirror-benchnode-t")
        delete_subvolumes(store_snaps)
        fs.close()
        subprocess.run(["rm", "-rf", work], check=False)
