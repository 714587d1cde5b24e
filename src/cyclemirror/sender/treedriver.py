"""TreeDriver: the repeating cycle of one tree object (``store.tree``) to its targets.

The volumes' driver (``sender.driver``) counts owed blocks; a tree's delta is
a list of operations between two snapshots (``store.treediff``), so a tree
has a driver of its own, with the same controls and the same ``status()``
shape, so the daemon (``daemon.mirrors``) runs both alike.

One thread runs:  wait -> freeze -> ship -> merge.

* Wait: the next freeze is at ``previous freeze + interval`` (the cycle
  itself is synchronous, so never before the copy is done); ``sync`` asks
  for a freeze at once; with an RPO objective the interval adapts as for
  volumes (``sender.rpo``).
* Freeze *k*: a read-only btrfs snapshot of the subvolume (``TreeObject.freeze``).
* Ship: each target gets the delta from the cycle it *holds* (what its
  ``tree_opened`` / ``applied`` said) to *k*: ``tree_base``, then the frames
  of ``wire.treeframes.encode_tree_delta``; targets holding the same cycle
  share one delta (computed once, encoded once per target).  A target that
  never held a cycle, or holds one of another history (its freeze time is not
  ours), gets a full cycle.
* One target at a time: each target ships in a sender thread of its own
  (connect, delta, frames, the wait for its ``applied``), and the loop does not
  wait for the senders.  The next freeze is due at ``previous freeze +
  interval`` once some target holds the newest cycle (so with one target, never
  before its copy is done); a target still busy with an older cycle (a slow
  link or apply, a stopped process) holds up nobody else, and when its cycle
  ends it is sent the newest one, one delta over the cycles it missed.  A sync
  that names only other targets does not wait for it.
* Merge: the snapshots below the oldest cycle any target holds or is being
  sent are deleted (``merge_through``, after each target's cycle); a target
  that never held a cycle does not hold them back (it needs a full cycle
  anyway), a broken, unreachable or slow one does: its cycle stays, so its
  next cycle is a delta.
* Demotion: a target that answers ``DemotedError`` (it promoted this tree's
  mirror) makes the tree *demoted* (``TreeObject.mark_demoted``, shown by
  ``status``): the whole mirror stops, no more freezes, and ``resume`` is
  refused, until the tree is failed back from the new primary (docs/trees.md).
* Failback: a promoted tree (``TreeObject.promoted_from``) says so to each
  target at connect (``tree_branch``, before ``tree_open``): the cycle it was
  promoted from, whether it wrote since, and the split brain's loser if a user
  named one (only while it still has the snapshot of that cycle: without it
  the target takes a full cycle).  The old source, which has that snapshot too, rolls
  back to it and answers that it holds it, so the first cycle is a delta from
  the promotion's base snapshot (``receiver.treefailback``).  That snapshot is
  kept while a target holds no cycle yet.
* Faults: a lost connection, a timeout, a target's temporary error: that
  target retries with backoff (a tree cycle is never resumed half way: it
  restarts whole, as a delta from what the target holds); a permanent one
  (bad key, protocol error, a refused delta) breaks that target until
  ``resume_target``.  A store failure (a snapshot that cannot be taken)
  breaks the whole mirror until ``resume``.

State: ``STORE/outgoing/NAME/tree-targets.json`` (atomically replaced), per
target the cycle it holds and its freeze time, so merges and ``status`` are
right after a restart before the targets reconnect; a target's own answer at
connect always wins over it.

Locking: ``_cond`` guards the control flags, the status fields and each
target's ``sender``; ``_state_lock`` (taken before ``_cond``) orders the writes
of the state file; ``_snap_lock`` (taken before ``_cond``) keeps a merge from
deleting snapshots while a delta is made from them or a connect settles which
cycle a target holds.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from cyclemirror._cext import frames
from cyclemirror.errors import (
    CycleMirrorError,
    DeadlineError,
    DemotedError,
    NotFoundError,
    ProtocolError,
    StoreError,
    UsageError,
    is_temporary,
)
from cyclemirror.sender import rpo, shipping, targetsync
from cyclemirror.sender.connection import TargetLink
from cyclemirror.sender.driver import MirrorOptions, TargetSpec
from cyclemirror.sender.ratelimit import RateLimiter
from cyclemirror.store import treediff
from cyclemirror.store.fileops import atomic_write_json, read_json
from cyclemirror.wire import treeframes

log = logging.getLogger(__name__)
STATE_FILE = "tree-targets.json"
STATE_FORMAT = 1
SEND_BATCH_BYTES = 256 << 10
ERROR_READ_SECONDS = 2.0  # after a failed send: how long to wait for the target's 'error'


class TreeTarget:
    """One target of a tree mirror: its link, the cycle it holds, its figures."""

    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self.label = spec.label
        self.link = None  # FrameLink, opened
        self.held = 0  # the newest cycle it holds (0: none, it needs a full cycle)
        self.held_freeze = 0.0
        self.phase = "idle"
        self.paused = False
        self.broken: BaseException | None = None
        self.last_error: str | None = None
        self.backoff = 0.0
        self.next_try = 0.0  # monotonic: no connect before this after a failure
        self.failed_cycle = 0  # the cycle its last failure was shipping
        self.stats: dict = {}
        self.progress: dict | None = None
        self.latency = rpo.LatencyModel()
        self.rpo_state = rpo.OK
        self.gone = False
        # Its sender thread while one ships a cycle to it (connect, delta, frames, the
        # wait for 'applied'), and the cycle it ships: that snapshot is not merged.
        self.sender: threading.Thread | None = None
        self.sending = 0

    def drop_link(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close()


class TreeDriver:
    """The cycle of one tree object to one or more targets (named ``remote_name`` there)."""

    def __init__(self, obj, targets, options: MirrorOptions | None = None, *, store,
                 remote_name: str | None = None):
        self.tree = obj
        self.volume = obj  # what the daemon logs a driver by (.name)
        self.remote_name = remote_name or obj.name
        self.store = store
        self.options = options or MirrorOptions()
        specs = list(targets)
        if not specs:
            raise UsageError(f"mirror of tree {obj.name!r}: no targets")
        if len({s.label for s in specs}) != len(specs):
            raise UsageError(f"mirror of tree {obj.name!r}: a target is listed twice")
        if self.options.pace:
            raise UsageError(f"mirror of tree {obj.name!r}: --pace holds a volume's writers; "
                             "a tree's writers write its files directly and cannot be paced")
        if self.options.rpo is not None and not 0 < self.options.rpo < 86400 * 365:
            raise UsageError(f"mirror of tree {obj.name!r}: an RPO objective must be a "
                             f"positive number of seconds, got {self.options.rpo!r}")
        codec = self.options.codec
        if codec == "auto":
            codec = "lz4"  # the adaptive packer packs volume extents; trees take lz4
        if codec not in shipping.CODECS:
            raise UsageError(f"codec {self.options.codec!r}: use none, lz4, zstd or auto")
        self.codec = codec
        self.rate = RateLimiter(self.options.bwlimit, self.options.shared_rate)
        self.targets = [TreeTarget(s) for s in specs]
        self.state_path = os.path.join(store.path, "outgoing", obj.name, STATE_FILE)
        self._cond = threading.Condition()
        self._state_lock = threading.Lock()  # orders the writes of the state file
        # Held while snapshots are read to make a delta, while a connect settles which
        # cycle a target holds, and while snapshots are merged: a merge never deletes a
        # snapshot a delta is being made from.
        self._snap_lock = threading.RLock()
        self._deltas: dict[tuple[int, int], treediff.TreeDelta] = {}  # (base, k): shared
        self._thread: threading.Thread | None = None
        self._stop = False
        self._break = False
        self._break_now = False
        self._sync_want = 0  # freeze as soon as the newest freeze (or the one under way) < this
        self._freezing = 0  # the cycle being frozen, or the newest frozen one
        self._adding: list[TreeTarget] = []
        self._removing: set[str] = set()
        self._main_done = False
        self.phase = "idle"
        self.cycle = obj.frozen_cycle
        self.last_freeze_time = obj.freeze_time(self.cycle) if self.cycle else 0.0
        self.last_error: str | None = None

    # -- persisted per-target state -------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            st = read_json(self.state_path, f"tree mirror {self.tree.name!r} state")
        except FileNotFoundError:
            return {}
        except CycleMirrorError as exc:
            log.warning("%s; every target says at connect what it holds", exc)
            return {}
        targets = st.get("targets") if st.get("format") == STATE_FORMAT else None
        if not isinstance(targets, dict):
            return {}
        return {k: v for k, v in targets.items() if isinstance(v, dict)
                and type(v.get("held")) is int and v["held"] >= 0
                and isinstance(v.get("freeze_time"), int | float)}

    def _save_state(self) -> None:
        # One writer at a time (senders of several targets save at once): a file written
        # from an older look at the targets must never replace a newer one.
        with self._state_lock:
            os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
            with self._cond:
                targets = {r.label: {"held": r.held, "freeze_time": r.held_freeze}
                           for r in self.targets + self._adding if not r.gone}
            atomic_write_json(self.state_path, {"format": STATE_FORMAT, "targets": targets})

    def _load_target(self, r: TreeTarget, saved: dict) -> None:
        e = saved.get(r.label)
        if e is not None and self._ours(e["held"], e["freeze_time"]):
            r.held, r.held_freeze = e["held"], float(e["freeze_time"])

    def _ours(self, cycle: int, freeze_time: float) -> bool:
        """Whether ``cycle`` frozen at ``freeze_time`` is a snapshot this tree still has."""
        if cycle < 1:
            return False
        try:
            self.tree.snapshot_path(cycle)
        except NotFoundError:
            return False
        return self.tree.freeze_time(cycle) == freeze_time

    # -- control ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise UsageError(f"mirror of tree {self.tree.name!r} is already running")
        demoted = self.demoted_error()
        if demoted is not None:
            raise demoted  # 'mirror start' and 'resume' refused; status shows it
        if self.options.shared_rate is not None:
            self.options.shared_rate.join()
        saved = self._load_state()
        for r in self.targets:
            self._load_target(r, saved)
        self._thread = threading.Thread(target=self._main, daemon=True,
                                        name=f"tree-mirror-{self.tree.name}")
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.break_cycles(now=True)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.options.shared_rate is not None:
            self.options.shared_rate.leave()

    def request_freeze(self) -> int:
        """Ask for a freeze now; returns the cycle it will be (a freeze under way when
        asked does not count: it may have missed what was written just before)."""
        with self._cond:
            want = max(self._freezing, self.tree.frozen_cycle) + 1
            self._sync_want = max(self._sync_want, want)
            self._cond.notify_all()
            return want

    def sync_targets(self, labels=None, timeout: float = 600.0) -> tuple[int, dict[str, str]]:
        """Freeze now and wait; return (cycle, {target not waited for: why}).

        The rule volumes follow too (``sender.targetsync``): named targets are waited for
        until the deadline; without names a target that is broken is left out, one
        that is down (it failed this cycle and retries) once another applied it, and
        one that is slow is waited for."""
        with self._cond:
            waited, skipped = self._waitable(labels)
        want = self.request_freeze()
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                st = targetsync.look(waited, want, labels is not None, lambda r: r.held,
                                     lambda r: r.held, lambda r: r.gone)
                if st.named_broken is not None:
                    r = st.named_broken
                    raise CycleMirrorError(f"the mirror of tree {self.tree.name!r} to "
                                           f"{r.label} stopped: {r.last_error or 'removed'}")
                skipped.update(st.left_out)
                waited = [r for r in waited if r.label not in skipped]
                if not waited:
                    raise CycleMirrorError(
                        f"every target of the mirror of tree {self.tree.name!r} broke during "
                        "the sync: " + "; ".join(f"{t}: {w}" for t, w in sorted(skipped.items())))
                if self._break and self.last_error and not st.applied:
                    raise CycleMirrorError(f"the mirror of tree {self.tree.name!r} stopped: "
                                           f"{self.last_error}")
                if st.done:
                    skipped.update(st.down)
                    return want, skipped
                left = deadline - time.monotonic()
                if left <= 0:
                    late = ", ".join(f"{r.label} ({r.last_error or 'shipping'})"
                                     for r in st.pending + [r for r in waited
                                                            if r.label in st.down])
                    raise DeadlineError(f"sync of tree {self.tree.name!r}: cycle {want} was "
                                        f"not applied on {late} within {timeout:g}s")
                self._cond.wait(min(left, 0.5))

    def _waitable(self, labels) -> tuple[list[TreeTarget], dict[str, str]]:
        """With _cond held: (targets to wait for, {target left out: why})."""
        every = self.targets + self._adding
        if labels is not None:
            out = []
            for label in labels:
                r = self._target(label)
                if r.paused or r.broken is not None:
                    raise UsageError(f"the mirror of tree {self.tree.name!r} to {label} is "
                                     f"broken ({r.last_error or 'break'}); resume it first")
                out.append(r)
            return out, {}
        wait, skipped = [], {}
        for r in every:
            if r.paused:
                skipped[r.label] = "broken (mirror break)"
            elif r.broken is not None:
                skipped[r.label] = f"broken: {r.last_error}"
            else:
                wait.append(r)
        if not wait:
            raise UsageError(f"every target of the mirror of tree {self.tree.name!r} is "
                             "broken; resume one first")
        return wait, skipped

    def break_cycles(self, now: bool = False) -> None:
        with self._cond:
            self._break = True
            self._break_now = now
            self._cond.notify_all()
        if now:
            for r in self.targets:
                r.drop_link()

    def demoted_error(self) -> DemotedError | None:
        """The error a demoted tree's mirror stops with (None: not demoted)."""
        d = self.tree.demoted
        if d is None:
            return None
        return DemotedError(
            f"tree {self.tree.name!r} on this node is demoted ({d['by']} said: "
            f"{d['message']}); it must not mirror over the new primary: stop its writers, "
            f"then fail back by mirroring the promoted tree from the new primary to this "
            f"node (docs/trees.md, \"Failback\")")

    def resume(self) -> None:
        demoted = self.demoted_error()
        if demoted is not None:
            raise demoted
        with self._cond:
            self._break = self._break_now = False
            self.last_error = None
            for r in self.targets:
                r.broken, r.paused, r.backoff, r.next_try = None, False, 0.0, 0.0
            self._sync_want = max(self._sync_want, self.tree.frozen_cycle + 1)
            self._cond.notify_all()

    def _target(self, label: str) -> TreeTarget:
        for r in self.targets + self._adding:
            if r.label == label:
                return r
        raise NotFoundError(f"mirror of tree {self.tree.name!r} has no target {label} (its "
                            f"targets: {', '.join(r.label for r in self.targets)})")

    def break_target(self, label: str, now: bool = False) -> None:
        with self._cond:
            r = self._target(label)
            r.paused = True
            if all(t.paused for t in self.targets):
                self._break = True
                self._break_now = self._break_now or now
            self._cond.notify_all()
        if now:
            r.drop_link()

    def resume_target(self, label: str) -> None:
        demoted = self.demoted_error()
        if demoted is not None:
            raise demoted
        with self._cond:
            r = self._target(label)
            r.paused, r.broken, r.backoff, r.next_try = False, None, 0.0, 0.0
            self._break = self._break_now = False
            self._sync_want = max(self._sync_want, self.tree.frozen_cycle + 1)
            self._cond.notify_all()

    def add_target(self, spec: TargetSpec) -> None:
        with self._cond:
            if any(r.label == spec.label for r in self.targets + self._adding):
                raise UsageError(f"mirror of tree {self.tree.name!r}: target {spec.label} "
                                 "is already a target")
            r = TreeTarget(spec)
            if self._thread is None:
                self.targets = self.targets + [r]
                return
            self._adding.append(r)
            self._sync_want = max(self._sync_want, self.tree.frozen_cycle + 1)
            self._cond.notify_all()

    def remove_target(self, label: str, timeout: float = 30.0) -> None:
        with self._cond:
            r = self._target(label)
            if not (r.paused or r.broken is not None):
                raise UsageError(f"the mirror of tree {self.tree.name!r} to {label} is "
                                 "running; break it first")
            if len(self.targets) == 1 and r in self.targets:
                raise UsageError(f"{label} is the only target of the mirror of tree "
                                 f"{self.tree.name!r}; stop the driver instead")
            self._removing.add(label)
            self._cond.notify_all()
            deadline = time.monotonic() + timeout
            while label in self._removing and not self._main_done and self._thread:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineError(f"mirror of tree {self.tree.name!r}: the cycle loop "
                                        f"did not let go of {label} within {timeout}s; run "
                                        "the command again when its cycle ends")
                self._cond.wait(min(left, 0.5))
            if self._thread is None or self._main_done:
                self._removing.discard(label)
                r.gone = True
                self.targets = [t for t in self.targets if t is not r]
        self._save_state()

    def _take_target_changes(self) -> None:
        changed = False
        with self._cond:
            for r in [r for r in self.targets + self._adding if r.label in self._removing]:
                r.gone = True
                r.drop_link()
                self.targets = [t for t in self.targets if t is not r]
                changed = True
            self._removing.clear()
            adding, self._adding = self._adding, []
            if adding:
                saved = self._load_state()
                for r in adding:
                    self._load_target(r, saved)
                self.targets = self.targets + adding
                changed = True
            if changed:
                self._cond.notify_all()
        if changed:
            self._save_state()

    # -- status -----------------------------------------------------------------------------
    def status(self) -> dict:
        now = time.time()
        with self._cond:
            checks = {r.label: self._assess(r, now) for r in self.targets}
            phase = self.phase
            if phase == "idle" and any(r.sender is not None for r in self.targets):
                phase = "copying"
            return {
                "volume": self.tree.name, "kind": "tree", "cycle": self.cycle,
                "phase": phase, "last_error": self.last_error, "group": None,
                "members": [self.tree.name], "rpo_objective": self.options.rpo,
                "interval": self._interval(now), "pacing": None, "compress_auto": None,
                "targets": {
                    r.label: {
                        "phase": "broken" if r.broken is not None or r.paused else r.phase,
                        "paused": r.paused,
                        "applied_cycle": r.held, "committed_cycle": r.held,
                        "rpo_age": (now - r.held_freeze) if r.held else None,
                        "rpo": None if checks[r.label] is None else {
                            "objective": self.options.rpo, "state": checks[r.label].state,
                            "predicted": checks[r.label].predicted,
                            "reason": checks[r.label].reason},
                        "last_error": r.last_error,
                        **r.stats,
                        "progress": dict(r.progress) if r.progress else None,
                    } for r in self.targets
                },
            }

    def _assess(self, r: TreeTarget, now: float):
        if self.options.rpo is None:
            return None
        if r.broken is not None or r.paused:
            a = rpo.Assessment(rpo.VIOLATED, float("inf"),
                               f"mirror to {r.label} is broken: {r.last_error or 'break'}")
        else:
            age = (now - r.held_freeze) if r.held else None
            a = rpo.assess(self.options.rpo, age, 0, r.latency, r.rpo_state)
        r.rpo_state = a.state
        return a

    def _interval(self, now: float) -> float:
        """With _cond held: seconds from one freeze to the next."""
        if self.options.rpo is None:
            return self.options.interval
        live = [r for r in self.targets if r.broken is None and not r.paused] or self.targets
        states = [self._assess(r, now).state for r in live]
        slowest = max(live, key=lambda r: r.latency.latency(0))
        cap = self.options.interval if self.options.interval > 0 else None
        return rpo.auto_interval(self.options.rpo, slowest.latency, 0, states, cap)

    # -- the loop ---------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._cycles()
        finally:
            with self._cond:
                self._main_done = True
                self._cond.notify_all()
                senders = [r.sender for r in self.targets if r.sender is not None]
            for r in self.targets:
                r.drop_link()  # a sender still shipping fails at once
            for t in senders:
                t.join(10.0)

    def _live(self) -> list[TreeTarget]:
        return [r for r in self.targets if r.broken is None and not r.paused]

    def _cycles(self) -> None:
        while True:
            self._take_target_changes()
            with self._cond:
                if self._stop:
                    return
                if not self._break and self.targets and \
                        all(r.broken is not None or r.paused for r in self.targets):
                    self._break = True  # nothing left to ship to: until a resume
                    self.last_error = "; ".join(f"{r.label}: {r.last_error}"
                                                for r in self.targets if r.broken is not None
                                                ) or self.last_error
                # A target that is not shipping (its sender ends its cycle first, unless
                # broken with --now) lets go of its link: the target may then remove the
                # mirror without --force.
                idle = [r for r in self.targets if r.link is not None and r.sender is None
                        and (r.paused or self._break)]
            for r in idle:
                r.drop_link()
            demoted = self.demoted_error()
            with self._cond:
                if demoted is not None:
                    self._break, self.last_error = True, f"DemotedError: {demoted}"
                    for r in self.targets:
                        r.phase = "broken"
                if self._break:
                    self.phase = "broken"
                    self._cond.notify_all()
                    self._cond.wait(1.0)
                    continue
            try:
                k = self._next_cycle()
                if k is None:
                    continue
                self._dispatch(k)
            except BaseException as exc:  # noqa: BLE001 - reported in status, never lost
                self._crashed(exc)
                continue
            with self._cond:
                if self.phase != "broken":
                    self.phase = "idle"
                self._cond.notify_all()

    def _next_cycle(self) -> int | None:
        """Wait for what to do next: a new freeze (returns its cycle, frozen), the newest
        freeze for targets that lack it and may be sent it now, or None to re-check flags.

        Each target ships in a sender thread of its own, so a target that is slow (a
        slow link or apply, a stopped process) holds up nobody else: the next freeze is
        due at ``previous freeze + interval`` once a target holds the newest cycle (for
        a single target: once its copy is done), and a target still shipping an older
        cycle gets the newest one, as one delta, when its cycle ends."""
        with self._cond:
            while True:
                if self._stop or self._break or self._adding or self._removing:
                    return None
                live = self._live()
                if not live:
                    return None  # every target broken or in a break: _cycles says so
                top = self.tree.frozen_cycle
                now = time.time()
                due = self.last_freeze_time + self._interval(now) - now
                # Every target that could take a cycle lacks the newest one (shipping it,
                # all down, or retrying): another snapshot would only be kept for nobody.
                backlog = all(r.held < top for r in live)
                # A promoted tree's newest cycle may be its promotion's base: what it
                # wrote since is not frozen yet, and a failback must know of it.
                p = self.tree.promoted_from
                base_only = p is not None and top == p["cycle"]
                if self._sync_want > top or top == 0 or base_only or \
                        (due <= 0 and not backlog):
                    self._freezing = top + 1
                    break
                mono = time.monotonic()
                retry = [r for r in live if r.sender is None and r.held < top]
                if any(r.next_try <= mono for r in retry):
                    return top
                wake = min([due if not backlog else 1.0] + [r.next_try - mono for r in retry])
                self._cond.wait(max(0.01, min(wake, 1.0)))
            self.phase = "freezing"
        k = self.tree.freeze()
        with self._cond:
            self.cycle = k
            self.last_freeze_time = self.tree.freeze_time(k)
            self._cond.notify_all()
        return k

    def _dispatch(self, k: int) -> None:
        """Start a sender for cycle ``k`` for every live target that lacks it, is not
        shipping, and may be tried now; returns at once (the senders report back)."""
        mono = time.monotonic()
        with self._cond:
            for r in self._live():
                if r.sender is None and r.held < k and r.next_try <= mono:
                    r.sending = k
                    r.sender = threading.Thread(target=self._sender, args=(r, k), daemon=True,
                                                name=f"tree-send-{r.label}")
                    r.sender.start()

    def _sender(self, r: TreeTarget, k: int) -> None:
        """One target's cycle ``k``: connect if needed, its delta, the frames, 'applied'."""
        try:
            if r.link is None:
                with self._cond:
                    r.phase = "reconnecting"
                self._connect(r, k)
            if r.held < k:  # it may hold k already (said at its open)
                self._send(r, k, self._delta_for(r, k))
        except BaseException as exc:  # noqa: BLE001 - that target's failure
            self._failed(r, exc, k)
        finally:
            with self._cond:
                r.sender, r.sending = None, 0
                self._cond.notify_all()
        try:
            self._merge()
        except BaseException as exc:  # noqa: BLE001 - reported in status, never lost
            self._crashed(exc)

    def _crashed(self, exc: BaseException) -> None:
        """A failure outside any one target (a freeze, a merge): stop until resumed."""
        log.error("mirror of tree %s stopped: %s: %s", self.tree.name, type(exc).__name__, exc)
        with self._cond:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.phase = "broken"
            self._break = True
            self._cond.notify_all()

    def _delta_for(self, r: TreeTarget, k: int) -> treediff.TreeDelta:
        """The delta from the cycle ``r`` holds to ``k``, shared by the targets that
        hold the same cycle (made once, while no merge deletes its snapshots)."""
        with self._snap_lock:
            with self._cond:
                base = r.held
            key = (base, k)
            d = self._deltas.get(key)
            if d is None:
                d = self._delta(base, k)
                self._deltas = {kb: v for kb, v in self._deltas.items() if kb[1] >= k}
                self._deltas[key] = d
            return d

    def _delta(self, base: int, k: int) -> treediff.TreeDelta:
        with self._snap_lock:
            if base == k - 1 or (base == 0 and k == 1):
                d = self.tree.delta(k)  # keeps the walk of snapshot k for the next one
            else:
                old = self.tree.snapshot_path(base) if base else None
                d = treediff.tree_delta(old, self.tree.snapshot_path(k))
        if d.skipped:
            log.info("mirror of tree %s, cycle %d: %d socket(s) not mirrored (a socket "
                     "cannot be made meaningfully elsewhere): %s", self.tree.name, k,
                     len(d.skipped), ", ".join(d.skipped[:5])
                     + (", ..." if len(d.skipped) > 5 else ""))
        return d

    def _connect(self, r: TreeTarget, k: int) -> None:
        tl = TargetLink((r.spec.host, r.spec.port), r.spec.key, tls=r.spec.tls,
                        insecure=r.spec.insecure)
        link = tl.dial()
        try:
            branch = self._branch(k)
            if branch is not None:
                link.send_message("tree_branch", **branch)
            link.send_message("tree_open", node_id=self.store.node_id,
                              node_name=getattr(self.store, "node_name", None),
                              mirror=self.remote_name)
            opened = link.recv_message({"tree_opened"})
        except BaseException as exc:
            link.close()
            if "unknown control message type 'tree_open'" in str(exc):
                raise ProtocolError(
                    f"target {r.label} runs a cyclemirror that does not know tree mirrors "
                    f"({exc}); upgrade it, then 'cyclemirror mirror resume "
                    f"{self.tree.name} --to {r.label}'") from None
            raise
        applied, ft = opened["applied_cycle"], float(opened["freeze_time"])
        with self._snap_lock:  # no merge between the check and r.held naming that cycle
            self._opened(r, link, k, applied, ft)
        self._save_state()

    def _opened(self, r: TreeTarget, link, k: int, applied: int, ft: float) -> None:
        if applied and not self._ours(applied, ft):
            if applied >= k:
                link.close()
                raise ProtocolError(
                    f"target {r.label} holds cycle {applied} of tree mirror "
                    f"{self.remote_name!r} from another history of this tree (frozen at "
                    f"{ft}, not a snapshot of ours): it cannot take our cycle {k}; remove "
                    f"the mirror there ('cyclemirror mirror rm' on the target) or mirror "
                    "under another name (--as)")
            log.info("mirror of tree %s -> %s: the target holds cycle %d, which is not a "
                     "snapshot of ours (merged or of another history): a full cycle",
                     self.tree.name, r.label, applied)
            applied, ft = 0, 0.0
        with self._cond:
            r.link = link
            r.held, r.held_freeze = applied, ft

    def _branch(self, k: int) -> dict | None:
        """The ``tree_branch`` message of a promoted tree (None for any other): the old
        source rolls back to the promoted cycle and a failback ships only the delta."""
        p = self.tree.promoted_from
        if p is None or not self._ours(p["cycle"], p["freeze_time"]):
            return None  # no base kept (or merged away): the target takes a full cycle
        written = 0 if k == p["cycle"] else len(self._delta(p["cycle"], k).ops)
        return {"source_node": p["source_node"], "mirror": p["mirror"], "cycle": p["cycle"],
                "freeze_time": p["freeze_time"], "written_ops": written,
                "discard_on": self.tree.discard_on or ""}

    def _send(self, r: TreeTarget, k: int, delta: treediff.TreeDelta) -> None:
        base = r.held
        full = base == 0
        link = r.link
        snap = self.tree.snapshot_path(k)
        freeze_time = self.tree.freeze_time(k)
        total = sum(ln for op in delta.ops for _off, ln in op.data)
        started = time.time()
        prog = {"cycle": k, "full": full, "total_bytes": total, "done_bytes": 0,
                "bytes_raw": 0, "bytes_wire": 0, "chunks_sent": 0, "skipped_bytes": 0,
                "resumed_from": 0, "started": started}
        with self._cond:
            r.phase, r.progress = "copying", prog

        def open_new(rel: str) -> int:
            return os.open(os.path.join(snap, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

        packer = frames.FramePacker(shipping.CODECS[self.codec], self.options.level,
                                    min(self.options.chunk_size, treeframes.DEFAULT_CHUNK))
        sent0 = link.bytes_sent
        try:
            link.sock.settimeout(self.options.stall_timeout)
            link.send_message("tree_base", cycle=k, base=base,
                              base_freeze_time=r.held_freeze if base else 0.0)
            batch, size = [], 0
            for f in treeframes.encode_tree_delta(_counting(delta.ops, prog), open_new, k,
                                                  freeze_time, full, packer):
                batch.append(f)
                size += len(f)
                prog["chunks_sent"] += 1
                if size >= SEND_BATCH_BYTES:
                    self.rate.consume(size)
                    link.send_frames(batch, f"tree cycle {k}")
                    prog["bytes_wire"] = link.bytes_sent - sent0
                    batch, size = [], 0
                    if self._break_now or self._stop:
                        raise CycleMirrorError("the mirror was broken with --now")
            if batch:
                self.rate.consume(size)
                link.send_frames(batch, f"tree cycle {k}")
            prog["bytes_wire"] = link.bytes_sent - sent0
            prog["done_bytes"] = prog["bytes_raw"] = total
            with self._cond:
                r.phase = "applying"
            link.sock.settimeout(self.options.apply_timeout)
            msg = link.recv_message({"applied"})
        except CycleMirrorError as exc:
            raise self._their_error(link, exc) from None
        except OSError as exc:
            raise self._their_error(link, exc) from None
        if msg["cycle"] != k:
            raise ProtocolError(f"target {r.label} says it applied cycle {msg['cycle']} of "
                                f"tree {self.remote_name!r}, we sent cycle {k}")
        duration = time.time() - started
        wire = link.bytes_sent - sent0
        stats = {"last_cycle": k, "bytes_wire": wire, "bytes_raw": total,
                 "duration": duration, "throughput": wire / duration if duration > 0 else None,
                 "compression_ratio": (total / wire) if wire and total else None,
                 "full": full, "chunks": prog["chunks_sent"], "resumed_from": 0,
                 "base_cycle": base, "ops": len(delta.ops), "phases": None}
        with self._cond:
            r.held, r.held_freeze = k, freeze_time
            r.stats, r.progress, r.phase = stats, None, "idle"
            r.last_error, r.backoff, r.next_try = None, 0.0, 0.0
            r.latency.observe(total, time.time() - freeze_time)
            self._cond.notify_all()
        self._save_state()
        log.debug("mirror of tree %s -> %s: cycle %d applied (%s from %d, %d ops)",
                  self.tree.name, r.label, k, "full" if full else "delta", base,
                  len(delta.ops))
        if self.options.on_applied is not None:
            try:
                self.options.on_applied(k, r.label, stats)
            except Exception:  # noqa: BLE001 - a hook never stops a mirror
                log.exception("on_applied hook failed")

    @staticmethod
    def _their_error(link, exc: BaseException) -> BaseException:
        """A send that failed: the target may have said why before it closed."""
        from cyclemirror.wire.link import RemoteError

        if isinstance(exc, RemoteError):
            return exc
        try:
            link.sock.settimeout(ERROR_READ_SECONDS)
            link.recv_message(set())
        except RemoteError as told:
            return told
        except BaseException:  # noqa: BLE001 - nothing more to learn
            pass
        return exc

    def _failed(self, r: TreeTarget, exc: BaseException, k: int = 0) -> None:
        if getattr(exc, "code", None) == "DemotedError" or isinstance(exc, DemotedError):
            try:
                if self.tree.mark_demoted(r.label, str(exc)):
                    log.error("tree %s is DEMOTED: %s says: %s", self.tree.name, r.label, exc)
            except (CycleMirrorError, OSError):
                log.exception("tree %s: recording its demotion failed", self.tree.name)
            with self._cond:
                self._break = True  # every target: the tree stops cycling
                self._cond.notify_all()
        r.drop_link()
        r.failed_cycle = max(r.failed_cycle, k)
        temporary = is_temporary(exc)
        text = f"{type(exc).__name__}: {exc}"
        with self._cond:
            r.progress = None
            r.last_error = text
            if temporary and not (self._break_now or self._stop):
                r.backoff = min(self.options.retry_max,
                                max(self.options.retry_initial, r.backoff * 2))
                r.next_try = time.monotonic() + r.backoff
                r.phase = "reconnecting"
            elif not (self._break_now or self._stop):
                r.broken = exc
                r.phase = "broken"
            else:  # cut off by 'mirror break --now' or a stop: not the target's fault
                r.phase = "idle"
            self._cond.notify_all()
        log.warning("mirror of tree %s -> %s: %s%s", self.tree.name, r.label, text,
                    f" (retry in {r.backoff:.1f}s)" if r.broken is None else " (broken until "
                    "'cyclemirror mirror resume')")

    def _merge(self) -> None:
        """Delete the snapshots below the oldest cycle a target holds or is being sent
        (called by each sender when its cycle ends)."""
        with self._snap_lock:
            with self._cond:
                every = [r for r in self.targets if not r.gone]
                held = [r.held for r in every if r.held > 0]
                held += [r.sending for r in every if r.sending > 0]
                if not held:
                    return
                keep = min(held)
                if keep < 2 or keep > self.tree.frozen_cycle:
                    return
            p = self.tree.promoted_from
            if p is not None and any(r.held == 0 for r in every):
                keep = min(keep, p["cycle"])  # the base of a failback not made yet
            if keep >= 2:
                try:
                    self.tree.merge_through(keep - 1)
                except (StoreError, OSError) as exc:
                    log.warning("mirror of tree %s: deleting snapshots up to cycle %d "
                                "failed: %s (tried again after the next cycle)",
                                self.tree.name, keep - 1, exc)


def _counting(ops, prog: dict):
    """The ops, counting into ``prog`` the data bytes of each op whose frames are made
    (when the encoder asks for the next op, the previous one's frames are out)."""
    pending = 0
    for op in ops:
        prog["done_bytes"] += pending
        prog["bytes_raw"] = prog["done_bytes"]
        pending = sum(ln for _off, ln in op.data)
        yield op


def forget_targets(store, name: str, labels: list[str]) -> None:
    """Drop what tree ``name``'s state records about targets removed from its mirror
    (the driver stopped): added again later, a target says at connect what it holds."""
    path = os.path.join(store.path, "outgoing", name, STATE_FILE)
    try:
        st = read_json(path, f"tree mirror {name!r} state")
    except FileNotFoundError:
        return
    except CycleMirrorError:
        st = {}
    targets = st.get("targets") if isinstance(st.get("targets"), dict) else {}
    for label in labels:
        targets.pop(label, None)
    atomic_write_json(path, {"format": STATE_FORMAT, "targets": targets})
