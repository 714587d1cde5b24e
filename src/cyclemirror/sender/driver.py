"""MirrorDriver: the repeating cycle of one volume (or consistency group) to one or more targets.

What is mirrored is a *subject* (``sender.group``): one volume, or a group of
volumes frozen at one instant and applied all-or-none; everything below is
written once for both, with owed sets over the subject's blocks.

One thread per driver runs:  wait -> freeze -> ship -> await commit, and
a second one merges and frees what the first is done with.

* Wait: the next freeze is at ``max(previous freeze + interval, copy done)``;
  ``sync()`` freezes at once.  The copy is done when every target holds the
  cycle durably: *committed* (protocol 2), after which the target applies it
  while the next cycle already ships, or applied (protocol 1).  ``applied``
  messages arrive on the link's reader thread whenever the apply ends.
* Owed blocks: per target, an ExtentBitmap of the blocks changed since the
  freeze that target last applied (None = it needs a full copy).  At each
  freeze the frozen cycle's dirty set is folded into every target's owed set
  and persisted (``persist``) before anything is shipped; a target that
  applies the cycle gets an empty set.  A slow or disconnected target simply
  keeps accumulating, and catches up later with one delta read from a newer
  frozen image -- never a full copy.  That is also why the overlay of cycle
  *c* is merged after cycle *c* even if a target lagged: what it needs is in
  its owed set, not in the overlay.
* Merge: overlay *c-1* is merged by a merger thread once a target holds
  cycle *c*, so the merge is off the next cycle's path.  The same thread
  closes each cycle's frozen reader: that close may free a merged overlay's
  file, which took seconds for a big scattered overlay on ext4, and must not
  hold up the next freeze.
* Phases: each cycle's time per phase (wait, freeze, pack, send, commit,
  apply, merge) is in the target's ``phases`` figures and the debug log.
* Ship: targets whose owed sets are equal share one producer that reads,
  compresses and checksums each chunk once (``shipping.cycle_frames``) and
  feeds a bounded queue per target; each target has its own sender thread and
  link, so one slow target cannot hold the others (a queue that stays full for
  ``stall_timeout``, the link timeout, drops that target from the cycle, and so
  does a commit that has not come that long after another target's: a stopped
  target's kernel still takes the bytes, so only the missing commit shows it).
* Faults: temporary errors (lost connection, timeouts) are retried with
  exponential backoff; the retry resumes the cycle after the target's last
  acknowledged chunk.  Permanent ones (bad key, size mismatch, protocol
  error) put that target into ``broken`` with the error until ``resume()``.
  Where change tracking cannot be trusted (our state lost, the target's
  applied cycle moved back, another target answers), block hashes are
  compared and only differing blocks ship.

* One target at a time: ``break_target``/``resume_target`` stop and restart
  shipping to one target (its owed set keeps growing meanwhile),
  ``add_target``/``remove_target`` change the targets between two cycles of
  the running loop, and ``sync_targets`` waits for named targets or for every
  one not broken, leaving out one that is down.  Targets that need a new
  connection are dialled in threads of their own; a cycle waits at most
  ``dial_grace`` for them, so a host that never answers holds up only itself.

* Progress: while a cycle ships, each target's ``CycleProgress`` holds
  counters that only its sender thread writes (plain int attributes, no
  lock); ``status()`` reads them as they are, so a poll never waits on a
  sender, and each figure is monotonic within one attempt.  Applied, they
  move to the last-cycle figures and the progress is cleared.

Locking: ``_cond`` guards the control flags (break/sync/stop/merge) and the
status fields; shipping and merging happen outside it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from cyclemirror._cext import frames
from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import (
    ConnectionLostError,
    CycleMirrorError,
    DeadlineError,
    NotFoundError,
    StoreError,
    UsageError,
    is_temporary,
)
from cyclemirror.sender import plan, rpo, shipping, targetsync
from cyclemirror.sender.autocodec import AdaptivePacker, LinkMeter
from cyclemirror.sender.connection import TargetLink
from cyclemirror.sender.group import SingleVolume
from cyclemirror.sender.pacing import WritePacer
from cyclemirror.sender.persist import DriverState
from cyclemirror.sender.prepack import Prepack
from cyclemirror.sender.ratelimit import RateLimiter, SharedRate
from cyclemirror.store.fileobject import resized_bitmap
from cyclemirror.wire import messages, sockio
from cyclemirror.wire.handshake import TlsConfig
from cyclemirror.wire.link import RemoteError

log = logging.getLogger(__name__)
SEND_BATCH_BYTES = 256 << 10  # coalesce frames below this into one send


@dataclass(frozen=True)
class TargetSpec:
    host: str
    port: int
    key: bytes | None = None
    tls: TlsConfig | None = None
    insecure: bool = False

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class MirrorOptions:
    interval: float = 0.0  # seconds between freezes; 0 = back-to-back (with rpo: a cap, 0 none)
    rpo: float | None = None  # the RPO objective in seconds; None: no objective
    pace: bool = False  # hold writers to what the mirror can ship (needs rpo; sender/pacing.py)
    codec: str = "lz4"  # none | lz4 | zstd | auto (sender/autocodec.py)
    level: int = 0
    chunk_size: int = 1 << 20
    bwlimit: int = 0  # bytes/s for this mirror, 0 = unlimited
    shared_rate: SharedRate | None = None  # the daemon-wide cap
    retry_initial: float = 0.2
    retry_max: float = 30.0
    apply_timeout: float = 3600.0
    # A target that takes no data, or has not committed a cycle this long after another
    # target did, is dropped from the cycle (it catches up later): the link timeout.
    stall_timeout: float = field(default_factory=sockio.link_timeout)
    dial_grace: float = 3.0  # how long a cycle waits for targets being dialled
    queue_frames: int = 32  # lists of frames (each ~SEND_BATCH_BYTES, or one big frame) per target
    on_frozen: object = None  # callable(frozen, reader): the daemon's/tests' hook
    on_applied: object = None  # callable(cycle, label, stats)
    # Roles (docs/failover.md): lineage() -> the 'lineage' message fields (or None),
    # asked at each connect (it may raise, e.g. DemotedError: the volume must not
    # mirror); on_demoted(label, message): a target said this volume was demoted.
    lineage: object = None
    on_demoted: object = None
    extra: dict = field(default_factory=dict)


class CycleProgress:
    """The running cycle to one target, as its sender thread counts it.

    One writer (the sender thread) updates the int attributes in place; readers
    take them without a lock (an attribute read is atomic under the GIL), so a
    snapshot may mix two moments, but each counter only grows.

    total_bytes: the bytes of the volume(s) this cycle covers -- the owed
    blocks times the block size, or the whole size for a full copy -- known
    up front.  done_bytes: the part of it dealt with so far (data chunks and
    zero runs handed to the link, plus chunks skipped on a resume because the
    target holds them); it ends equal to total_bytes.  bytes_raw: uncompressed
    DATA bytes handed to the link in this attempt (zero runs excluded; the
    same figure as the applied cycle's ``bytes_raw``).  bytes_wire: bytes sent
    on this link since the attempt began (frames and messages).  skipped_bytes:
    the part of done_bytes a resume skipped (it cost no time: rates leave it out).
    chunks_sent: chunks of the cycle's stream dealt with so far, skipped ones
    included, ending at the cycle's chunk count.
    """

    __slots__ = ("cycle", "full", "total_bytes", "done_bytes", "bytes_raw", "bytes_wire",
                 "chunks_sent", "skipped_bytes", "resumed_from", "started")

    def __init__(self, cycle: int, full: bool, total_bytes: int, resumed_from: int):
        self.cycle = cycle
        self.full = full
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.bytes_raw = 0
        self.bytes_wire = 0
        self.chunks_sent = 0
        self.skipped_bytes = 0
        self.resumed_from = resumed_from
        self.started = time.time()

    def as_dict(self) -> dict:
        return {"cycle": self.cycle, "full": self.full, "total_bytes": self.total_bytes,
                "done_bytes": self.done_bytes, "bytes_raw": self.bytes_raw,
                "bytes_wire": self.bytes_wire, "chunks_sent": self.chunks_sent,
                "skipped_bytes": self.skipped_bytes,
                "resumed_from": self.resumed_from, "started": self.started}


class OutgoingTarget:
    """One target of the driver: its link, owed set and figures.

    held_cycle: the newest cycle the target holds durably (committed or applied);
    the owed set counts from its freeze.  applied_cycle / freeze_time: the newest
    cycle it applied (its image shows it), which the RPO age counts from.
    """

    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self.label = spec.label
        self.link: TargetLink | None = None
        self.owed: ExtentBitmap | None = None
        self.phase = "idle"
        self.broken: BaseException | None = None
        self.last_error: str | None = None
        self.held_cycle = 0
        self.applied_cycle = 0
        self.freeze_time = 0.0
        self.stats: dict = {}  # figures of the newest cycle it holds
        self.cycle_stats: dict[int, dict] = {}  # figures of cycles shipped, until applied
        self.committed_at: dict[int, float] = {}  # monotonic time each cycle was committed
        self.progress: CycleProgress | None = None  # the running cycle, while it ships
        self.backoff = 0.0
        self.resume_from = 0
        self.ok = False
        self.latency = rpo.LatencyModel()  # freeze -> applied, learnt per target
        self.rpo_state = rpo.OK  # the last assessment against the objective (hysteresis)
        # Broken by the user (break of this target alone): it ships nothing, its owed
        # set keeps growing, and resume_target() sends it one delta.
        self.paused = False
        self.failed_cycle = 0  # the cycle being shipped when its last attempt failed
        self.dialled = False  # link is new (dialled this attempt): _prepare reads 'opened'
        self.dial_thread: threading.Thread | None = None  # a dial under way
        self.late = False  # left out of a cycle while dialling: ask for one when connected
        self.gone = False  # removed from the driver (a late dial closes its link)

    def drop_link(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None


class MirrorDriver:
    """The cycle of one subject: a Volume (named ``remote_name`` on the targets) or a
    ``sender.group.VolumeGroup`` (a consistency group; see sender/group.py)."""

    def __init__(self, volume, targets, key: bytes | None = None,
                 options: MirrorOptions | None = None, *, store, remote_name: str | None = None):
        if isinstance(volume, SingleVolume):
            if remote_name is not None:
                raise UsageError("remote_name is for a single volume; a group names its members")
            self.subject = volume
        else:
            self.subject = SingleVolume(volume, remote_name)
        volume = self.subject.volume
        if isinstance(targets, tuple):
            targets = [TargetSpec(targets[0], int(targets[1]), key)]
        specs = [t if isinstance(t, TargetSpec) else TargetSpec(t[0], int(t[1]), key)
                 for t in targets]
        if not specs:
            raise UsageError(f"mirror of {volume.name!r}: no targets")
        if len({s.label for s in specs}) != len(specs):
            raise UsageError(f"mirror of {volume.name!r}: a target is listed twice")
        self.volume = volume
        self.store = store
        self.options = options or MirrorOptions()
        if self.options.codec not in shipping.CODECS and self.options.codec != "auto":
            raise UsageError(f"codec {self.options.codec!r}: use none, lz4, zstd or auto")
        if self.options.rpo is not None and not 0 < self.options.rpo < 86400 * 365:
            raise UsageError(f"mirror of {volume.name!r}: an RPO objective must be a positive "
                             f"number of seconds, got {self.options.rpo!r}")
        if self.options.pace and self.options.rpo is None:
            raise UsageError(f"mirror of {volume.name!r}: --pace needs --rpo (pacing holds "
                             "writers to the rate that keeps the RPO objective)")
        self.pacer = WritePacer(self._pace_limit) if self.options.pace else None
        if self.options.codec == "auto":
            self.packer = AdaptivePacker(self.options.chunk_size, shipping.PACK_THREADS)
        else:
            self.packer = frames.FramePacker(shipping.CODECS[self.options.codec],
                                             self.options.level, self.options.chunk_size)
        self.rate = RateLimiter(self.options.bwlimit, self.options.shared_rate)
        self.targets = [OutgoingTarget(s) for s in specs]
        self.state = DriverState(os.path.join(store.path, "outgoing",
                                              self.subject.state_dir_name),
                                 self.subject.nblocks, resizable=self.subject.resizable)
        # A group whose members changed: owed sets laid out anew (sender/group.py).
        self._joining = self.subject.adopt_layout(self.state)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._break = False
        self._crash: str | None = None  # why the cycles stopped on their own (_crashed)
        self._break_now = False
        self._sync_want = 0  # freeze as soon as open_overlay < this
        self._merge_want = 0  # the merger folds overlays <= this into base
        self._to_close: list = []  # frozen readers the merger thread closes
        self._main_done = False
        self.phase = "idle"
        self.cycle = 0
        self.last_freeze_time = 0.0
        self.last_error: str | None = None
        self._copy_done = 0.0
        self._times: dict[str, float] = {}  # phase durations of the cycle being shipped
        # The background fsync adds "sync" to its cycle's _times while senders copy it.
        self._times_lock = threading.Lock()
        self._hooks_running = 0  # on_applied hooks under way (_on_applied), under _cond
        self.last_merge_seconds: float | None = None
        self._merge_seconds_unreported: float | None = None  # merges since the last cycle
        self._repairs: dict[str, ExtentBitmap] = {}  # verify hook: label -> blocks to repair
        self._merge_holds = 0  # verify hook: verifies running; the merger waits for them
        self._adding: list[OutgoingTarget] = []  # add_target(): joins between cycles
        self._removing: set[str] = set()  # remove_target(): leaves between cycles

    # -- control ----------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise UsageError(f"mirror of {self.volume.name!r} is already running")
        if self.options.shared_rate is not None:
            self.options.shared_rate.join()
        self._thread = threading.Thread(target=self._main, daemon=True,
                                        name=f"mirror-{self.volume.name}")
        self._merger = threading.Thread(target=self._merge_loop, daemon=True,
                                        name=f"mirror-merge-{self.volume.name}")
        self._thread.start()
        self._merger.start()
        if self.pacer is not None:
            for v in self.subject.volumes:
                v.write_pacer = self.pacer

    def sync(self, timeout: float = 600.0, labels=None) -> int:
        """Freeze now; return the cycle once the targets waited for have applied it
        (``labels``: those targets; default every target that is not broken, see
        ``wait_targets``)."""
        return self.wait_applied(self.request_freeze(quiet_ok=True), timeout, labels)

    def sync_targets(self, labels=None, timeout: float = 600.0) -> tuple[int, dict[str, str]]:
        """Freeze now and wait; return (cycle, {target not waited for: why})."""
        with self._cond:
            self._waitable(labels)  # a named target that cannot apply fails before the freeze
        want = self.request_freeze(quiet_ok=True)
        return want, self.wait_targets(want, timeout, labels)

    def wait_applied(self, want: int, timeout: float = 600.0, labels=None) -> int:
        """Return ``want`` once the targets waited for have applied that cycle (or a newer one).

        With ``request_freeze()`` before ``start()``, the first cycle of a new driver
        is exactly the one asked for (a freeze asked for after start may come after
        one the driver made on its own, and then it is the second)."""
        self.wait_targets(want, timeout, labels)
        return want

    def _waitable(self, labels) -> tuple[list[OutgoingTarget], dict[str, str]]:
        """With _cond held: (targets to wait for, {target not waited for: why}).

        Named targets are all waited for, and one that is broken fails the call.
        Without names: every target that is not broken (by a break, or a permanent
        error); when every one is broken, the cause fails the call."""
        skipped: dict[str, str] = {}
        every = self.targets + self._adding  # a target being added is waited for too
        if labels is not None:
            known = {r.label: r for r in every}
            missing = [label for label in labels if label not in known]
            if missing:
                raise NotFoundError(
                    f"mirror of {self.volume.name!r} has no target {', '.join(missing)} "
                    f"(its targets: {', '.join(sorted(known))})")
            chosen = [known[label] for label in labels]
            for r in chosen:
                if r.broken is not None:
                    raise r.broken
                if r.paused:
                    raise UsageError(f"the mirror of {self.volume.name!r} to {r.label} is "
                                     "broken; resume it first")
            return chosen, skipped
        chosen = []
        for r in every:
            if r.paused:
                skipped[r.label] = "broken (mirror break)"
            elif r.broken is not None:
                skipped[r.label] = f"broken: {r.last_error}"
            else:
                chosen.append(r)
        if not chosen:
            failed = [r.broken for r in self.targets if r.broken is not None]
            if failed:
                raise failed[0]  # the cause (a bad key, a size mismatch), not a symptom
            raise UsageError(f"every target of the mirror of {self.volume.name!r} is broken; "
                             "resume one first")
        return chosen, skipped

    def wait_targets(self, want: int, timeout: float = 600.0, labels=None) -> dict[str, str]:
        """Wait until the targets waited for have applied cycle ``want``; return the
        ones not waited for, each with why.

        Named targets (``labels``) are waited for until the deadline, whatever
        happens to the others.  Without names a target that is down (its attempt
        at this cycle or a later one failed and it is retrying) or that breaks
        meanwhile is not waited for once another target applied the cycle; while
        none has, the wait goes on (retries may bring one back).  The rule is
        ``sender.targetsync``'s, which the tree driver follows too."""
        deadline = time.monotonic() + timeout
        with self._cond:
            waited, skipped = self._waitable(labels)
            while True:
                st = targetsync.look(waited, want, labels is not None,
                                     lambda r: r.applied_cycle, lambda r: r.held_cycle)
                if st.named_broken is not None:
                    raise st.named_broken.broken
                if st.pending and self._crash is not None:
                    # The cycles stopped (the store or a hook failed): cycle ``want`` will
                    # not reach these targets until a resume, so do not wait it out.
                    raise UsageError(f"mirror of {self.volume.name!r} stopped before cycle "
                                     f"{want} reached {st.pending[0].label}: {self._crash}; "
                                     "fix that and resume it")
                skipped.update(st.left_out)
                waited = [r for r in waited if r.label not in skipped]
                if not waited:
                    failed = [r.broken for r in self.targets if r.broken is not None]
                    if failed:
                        raise failed[0]
                    raise UsageError(f"every target of the mirror of {self.volume.name!r} "
                                     "broke during the sync; resume one first")
                if st.done and not self._hooks_running:
                    skipped.update(st.down)
                    return skipped
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineError(
                        f"sync of {self.volume.name!r}: cycle {want} not applied on "
                        + (", ".join(labels) if labels is not None else "every target")
                        + f" within {timeout}s ({self._targets_brief()})")
                self._cond.wait(min(left, 0.5))

    def request_freeze(self, quiet_ok: bool = False) -> int:
        """Ask for a freeze now, without waiting; return the cycle that will follow it.

        Every write completed before this call lands in that cycle or an older one.
        ``quiet_ok`` (a sync): if nothing was written since the last freeze and that
        freeze's cycle is still on its way, it already holds every completed write; it
        is returned and no freeze is asked for (a sync right after a mirror start then
        waits for the first cycle instead of an extra empty one).  Not for repairs,
        which need a new cycle to carry them.
        """
        with self._cond:
            if self._break:
                failed = [r.broken for r in self.targets if r.broken is not None]
                if failed:
                    raise failed[0]  # the cause (a bad key, a size mismatch), not a symptom
                why = f" ({self.last_error})" if self.last_error else ""
                raise UsageError(f"mirror of {self.volume.name!r} is broken{why}; "
                                 "resume it first")
            # A number, not a flag: a freeze the loop already decided on but has not
            # made yet also satisfies the request, so no extra cycle follows.
            want = self.volume.open_overlay + 1
            # Only while that cycle is still on its way to a target (a sync that found
            # every target holding it freezes anew: an empty cycle that proves the
            # targets are there), and never for a target whose last attempt failed: the
            # driver ships to it only in a new cycle (nor after a failure of the driver
            # itself: the cycle it recovers is shipped without the freeze hooks).
            live = [r for r in self.targets if r.broken is None and not r.paused]
            if quiet_ok and want > 1 and self.last_error is None and \
                    any(r.applied_cycle < want - 1 for r in live) and \
                    all(r.last_error is None for r in live) and \
                    all(v.open_overlay == want - 1 and not v.pending_blocks(exact=True)
                        for v in self.subject.volumes):
                return want - 1
            self._sync_want = max(self._sync_want, want)
            self._cond.notify_all()
            return want

    def break_cycles(self, now: bool = False) -> None:
        """Stop repeating: after the in-flight cycle, or at once (target keeps the previous)."""
        with self._cond:
            self._break = True
            self._break_now = now
            self._cond.notify_all()
        if now:
            for r in self.targets:
                r.drop_link()

    def resume(self) -> None:
        """Repeat again, starting with a cycle now: the targets get what changed since
        their last applied freeze without waiting out the interval."""
        with self._cond:
            self._break = self._break_now = False
            self._crash = None
            for r in self.targets:
                r.broken = None
                r.paused = False
                r.backoff = 0.0
            self._sync_want = max(self._sync_want, self.volume.open_overlay + 1)
            self._cond.notify_all()

    # -- one target at a time (the others keep cycling) --------------------
    def _target(self, label: str) -> OutgoingTarget:
        for r in self.targets + self._adding:
            if r.label == label:
                return r
        raise NotFoundError(f"mirror of {self.volume.name!r} has no target {label} (its "
                            f"targets: {', '.join(r.label for r in self.targets)})")

    def break_target(self, label: str, now: bool = False) -> None:
        """Stop shipping to one target: after the running cycle (that target keeps it),
        or at once with ``now`` (it keeps the previous one).  Its owed set keeps
        growing, so ``resume_target`` sends it one delta.  Breaking the last target
        that was not broken is a break of the whole mirror."""
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
        """Ship to a target broken alone again, starting with a cycle now (a delta of
        everything changed since its applied cycle); the others are left as they are."""
        with self._cond:
            r = self._target(label)
            r.paused, r.broken, r.backoff = False, None, 0.0
            self._break = self._break_now = False
            self._crash = None
            self._sync_want = max(self._sync_want, self.volume.open_overlay + 1)
            self._cond.notify_all()

    def add_target(self, spec: TargetSpec) -> None:
        """Add a target while the others keep cycling: it joins at the next cycle,
        which is asked for now (its first one is a full copy, or a hash comparison
        if it holds an image already); the others get their usual delta."""
        with self._cond:
            if any(r.label == spec.label for r in self.targets + self._adding):
                raise UsageError(f"mirror of {self.volume.name!r}: target {spec.label} is "
                                 "already a target")
            r = OutgoingTarget(spec)
            if self._thread is None:
                self.targets = self.targets + [r]  # _recover() reads its state
                return
            self._adding.append(r)
            self._sync_want = max(self._sync_want, self.volume.open_overlay + 1)
            self._cond.notify_all()

    def remove_target(self, label: str, timeout: float = 30.0) -> None:
        """Drop a target (broken first) and forget what we tracked about it; returns once
        the cycle loop has let go of it.  Added again later, it counts as never known
        (compared by block hashes if it has an image)."""
        with self._cond:
            r = self._target(label)
            if not (r.paused or r.broken is not None):
                raise UsageError(f"the mirror of {self.volume.name!r} to {label} is running; "
                                 "break it first")
            if len(self.targets) == 1 and r in self.targets:
                raise UsageError(f"{label} is the only target of the mirror of "
                                 f"{self.volume.name!r}; stop the driver instead")
            if self._thread is None:
                self._drop_target(r)
                return
            self._removing.add(label)
            self._cond.notify_all()
            deadline = time.monotonic() + timeout
            while label in self._removing and not self._main_done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineError(f"mirror of {self.volume.name!r}: the cycle loop did "
                                        f"not let go of {label} within {timeout}s (a long "
                                        "cycle to the others); it does so when that cycle "
                                        "ends: run the command again then")
                self._cond.wait(min(left, 0.5))

    def _drop_target(self, r: OutgoingTarget) -> None:
        """With _cond held, the cycle loop between cycles (or not started)."""
        r.gone = True
        r.drop_link()
        self.targets = [t for t in self.targets if t is not r]
        self._adding = [t for t in self._adding if t is not r]
        self._repairs.pop(r.label, None)
        self.state.targets.pop(r.label, None)
        self.state.save_repair(r.label, None)
        self.state.save()

    def _take_target_changes(self) -> None:
        """The cycle loop, between cycles: targets added or removed meanwhile."""
        with self._cond:
            removing = [r for r in self.targets + self._adding if r.label in self._removing]
            for r in removing:
                self._drop_target(r)
            self._removing.clear()
            adding, self._adding = self._adding, []
            for r in adding:
                self._load_target(r)
            if adding:
                self.state.save()
                self.targets = self.targets + adding
            if removing or adding:
                self._cond.notify_all()
        for r in adding:
            log.info("mirror %s: target %s added (%s)", self.volume.name, r.label,
                     "a full copy first" if r.owed is None else "a delta or hash comparison")

    def _load_target(self, r: OutgoingTarget) -> None:
        """What the state records about ``r`` (at recovery, or when it is added)."""
        st = self.state
        e = st.entry(r.label)
        r.held_cycle, r.freeze_time = e.held_cycle, e.freeze_time
        r.applied_cycle = e.held_cycle  # committed cycles are applied by the target's recovery
        r.owed = st.load_owed(r.label)
        if not st.trusted:
            e.untrusted = True
        self._load_repairs(r.label)  # verify hook

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self.pacer is not None:
            for v in self.subject.volumes:
                if v.write_pacer is self.pacer:
                    v.write_pacer = None
        self.break_cycles(now=True)
        if self._thread is not None:
            self._thread.join(timeout)
            self._merger.join(timeout)  # a merge in progress finishes first
        if self.options.shared_rate is not None:
            self.options.shared_rate.leave()

    def status(self) -> dict:
        if self.pacer is not None:
            self.pacer.refresh()  # the limit now, also when nobody has written since
        now = time.time()
        with self._cond:
            checks = {r.label: self._assess(r, now) for r in self.targets}
            return {
                "volume": self.volume.name, "cycle": self.cycle, "phase": self.phase,
                "last_error": self.last_error, "group": self.subject.group,
                "members": [v.name for v in self.subject.volumes],
                "rpo_objective": self.options.rpo,
                "interval": self._interval(now),
                "pacing": self.pacer.status() if self.pacer is not None else None,
                "compress_auto": (self.packer.status()
                                  if isinstance(self.packer, AdaptivePacker) else None),
                "targets": {
                    r.label: {
                        "phase": "broken" if r.broken or self._crash is not None or (
                            r.paused and (r.link is None or r.phase == "idle")) else r.phase,
                        "paused": r.paused,
                        "applied_cycle": r.applied_cycle,
                        "committed_cycle": r.held_cycle,
                        "rpo_age": (now - r.freeze_time) if r.applied_cycle else None,
                        "rpo": None if checks[r.label] is None else {
                            "objective": self.options.rpo, "state": checks[r.label].state,
                            "predicted": checks[r.label].predicted,
                            "reason": checks[r.label].reason},
                        "last_error": r.last_error,
                        **r.stats,
                        "progress": _progress_snapshot(r.progress),
                    } for r in self.targets
                },
            }

    # -- the RPO objective (sender/rpo.py decides; these feed it) --------
    def _owed_bytes(self, r: OutgoingTarget) -> int:
        """What the target's next apply has to carry: its owed blocks while a cycle is
        on its way, else what the open overlay holds so far (the next freeze's delta)."""
        if r.owed is None:
            return sum(v.size for v in self.subject.volumes)
        if r.held_cycle < self.cycle:
            return _cycle_bytes(self.subject, r.owed)
        return sum(v.pending_blocks() * v.block_size for v in self.subject.volumes)

    def _assess(self, r: OutgoingTarget, now: float) -> rpo.Assessment | None:
        """With _cond held: the target against the objective; remembers the state."""
        if self.options.rpo is None:
            return None
        if r.broken is not None:
            a = rpo.Assessment(rpo.VIOLATED, float("inf"),
                               f"mirror to {r.label} is broken: {r.last_error}")
        else:
            age = (now - r.freeze_time) if r.applied_cycle else None
            a = rpo.assess(self.options.rpo, age, self._owed_bytes(r), r.latency, r.rpo_state)
        r.rpo_state = a.state
        return a

    def _pace_limit(self) -> float | None:
        """The write rate to hold writers to (sender/pacing.py asks): the lowest
        ``rpo.pace_limit`` of the targets that are connected and cycling.  A target that
        is broken, paused or unreachable is not waited for: slowing the application
        cannot bring it back, and its objective is reported violated anyway."""
        now = time.time()
        with self._cond:
            if self._stop:
                return None
            limits = []
            for r in self.targets:
                if r.broken is not None or r.paused or r.link is None:
                    continue
                age = (now - r.freeze_time) if r.applied_cycle else None
                try:
                    owed = self._owed_bytes(r)
                    if r.owed is not None and r.held_cycle < self.cycle:
                        # A write now lands in the open overlay: it is applied only
                        # after the cycle on its way, so the age peaks after both.
                        owed += sum(v.pending_blocks() * v.block_size
                                    for v in self.subject.volumes)
                except CycleMirrorError:  # the volume is closing: nothing left to pace
                    return None
                model, prog = r.latency, r.progress
                if prog is not None:
                    model = rpo.provisional(model, prog.done_bytes - prog.skipped_bytes,
                                            now - prog.started)
                limit = rpo.pace_limit(self.options.rpo, age, owed, model)
                if limit is not None:
                    limits.append(limit)
            return min(limits, default=None)

    def _interval(self, now: float) -> float:
        """With _cond held: seconds from the last freeze to the next one."""
        if self.options.rpo is None:
            return self.options.interval
        if self.pacer is not None and self.pacer.limit is not None:
            return 0.0  # writers are held for the mirror: it must not wait as well
        live = [r for r in self.targets if r.broken is None] or self.targets
        states = [self._assess(r, now).state for r in live]
        slowest = max(live, key=lambda r: r.latency.latency(self._owed_bytes(r)))
        cap = self.options.interval if self.options.interval > 0 else None
        return rpo.auto_interval(self.options.rpo, slowest.latency, self._owed_bytes(slowest),
                                 states, cap)

    def _targets_brief(self) -> str:
        return ", ".join(f"{r.label} applied {r.applied_cycle}"
                         + (" (broken)" if r.paused or r.broken is not None
                            else f" (last error: {r.last_error})" if r.backoff > 0 else "")
                         for r in self.targets)

    def _set_phase(self, phase: str) -> None:
        with self._cond:
            self.phase = phase
            self._cond.notify_all()

    # -- the loop ---------------------------------------------------------
    def _main(self) -> None:
        try:
            self._cycles()
        finally:
            with self._cond:
                self._main_done = True  # no reader will be queued for closing any more
                self._cond.notify_all()

    def _cycles(self) -> None:
        first = None
        try:
            first = self._recover()
        except BaseException as exc:  # noqa: BLE001 - reported in status, never lost
            self._crashed(exc)
        while True:
            self._take_target_changes()
            with self._cond:
                if self._stop:
                    return
                # A broken target's link is closed between cycles: its target may then
                # remove the mirror ('mirror rm SOURCE/VOLUME' there) without --force.
                idle = [r for r in self.targets if r.link is not None
                        and (r.paused or self._break)]
            for r in idle:
                r.drop_link()
            with self._cond:
                if self._break:
                    self.phase = "broken"
                    self._cond.notify_all()
                    self._cond.wait(1.0)
                    continue
            try:
                if first is None:
                    t0 = time.monotonic()
                    if not self._wait_for_freeze_time():
                        continue
                    t1 = time.monotonic()
                    self._set_phase("freezing")
                    # The frozen overlay's fsync runs beside the copy; every sender waits
                    # for it before its 'end', so no target commits data not yet durable.
                    frozen = self.subject.freeze(sync=False)
                    self._times = {"wait": t1 - t0, "freeze": time.monotonic() - t1}
                    log.debug("mirror %s: froze cycle %d in %.3fs", self.volume.name,
                              frozen.number, self._times["freeze"])
                    self._account_freeze(frozen)
                    self._start_sync(frozen)
                else:
                    frozen, first = first, None
                    self._times = {}
                self._ship_cycle(frozen)
            except BaseException as exc:  # noqa: BLE001 - a store or hook failure
                self._crashed(exc)
                continue
            with self._cond:
                if all(r.broken is not None or r.paused for r in self.targets):
                    # Nothing left to ship to: stop until resume() (after a fix).
                    self._break = True
                    self.last_error = "; ".join(f"{r.label}: {r.last_error}"
                                                for r in self.targets if r.broken is not None
                                                ) or self.last_error

    def _start_sync(self, frozen) -> None:
        """fsync the frozen overlay in the background (frozen.sync() waits for it)."""
        times = self._times  # this cycle's: the next freeze binds a new dict

        def run() -> None:
            t0 = time.monotonic()
            try:
                frozen.sync()
            except BaseException:  # noqa: BLE001 - a sender's own sync() call raises it
                return
            with self._times_lock:
                times["sync"] = time.monotonic() - t0

        threading.Thread(target=run, daemon=True,
                         name=f"mirror-sync-{self.volume.name}").start()

    def _crashed(self, exc: BaseException) -> None:
        """A failure outside any one target (the store, a hook): stop until resume()."""
        log.error("mirror of %s stopped: %s: %s", self.volume.name, type(exc).__name__, exc)
        with self._cond:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._crash = self.last_error
            self.phase = "broken"
            self._break = True
            self._cond.notify_all()  # a sync waiting for a cycle learns it will not come

    def _wait_for_freeze_time(self) -> bool:
        """Sleep until the next freeze is due (or a sync asks now); False to re-check flags.

        With an RPO objective the interval is worked out again at every wake-up: a
        target that falls behind meanwhile brings the freeze forward."""
        step = 1.0 if self.options.rpo is None else 0.1
        with self._cond:
            while not (self._sync_want > self.volume.open_overlay or self._stop
                       or self._break or self._adding or self._removing):
                now = time.time()
                due = max(self.last_freeze_time + self._interval(now), self._copy_done)
                left = due - now
                if left <= 0:
                    break
                self._cond.wait(min(left, step))
            # Targets to add or remove are taken first (the loop comes back here).
            return not (self._stop or self._break or self._adding or self._removing)

    # -- recovery and bookkeeping ----------------------------------------
    def _recover(self):
        """Reconcile persisted state with the store; return a frozen cycle to ship first."""
        st = self.state
        for r in self.targets:
            self._load_target(r)
        before = self.subject.open_overlay
        moved = self.subject.align()
        if moved:
            # Members of a group stood at different overlays (one was mirrored on its
            # own): their extra freezes have no group cycle, so compare hashes.  Not
            # needed when only members that just joined moved, while the others stand
            # where the state accounted for them: a newcomer owes all its blocks anyway.
            if not (set(moved) <= set(self._joining) and st.last_freeze == before):
                for r in self.targets:
                    st.entry(r.label).untrusted = True
            st.last_freeze = self.subject.open_overlay
            st.save()
            self.cycle = st.last_freeze
            return None
        top = self.subject.open_overlay
        for k in range(st.last_freeze + 1, top + 1):
            try:
                frozen = self.subject.frozen(k)
            except NotFoundError:
                # That freeze's dirty set is gone: fall back to comparing hashes.
                for r in self.targets:
                    st.entry(r.label).untrusted = True
                continue
            self._fold(frozen.dirty)
        for r in self.targets:  # a file object's newest size, also where a dirty set was lost
            if r.owed is not None and r.owed.nbits != self.subject.nblocks:
                r.owed = resized_bitmap(r.owed, self.subject.nblocks)
        if top > st.last_freeze:
            for r in self.targets:
                st.save_owed(r.label, r.owed)
            st.last_freeze = top
            st.save()
        self.cycle = top
        if top >= 1 and top in self.subject.frozen_cycles() and any(
            r.held_cycle < top for r in self.targets
        ):
            frozen = self.subject.frozen(top)
            self.last_freeze_time = frozen.freeze_time
            return frozen
        return None

    def _fold(self, dirty: ExtentBitmap | None) -> None:
        """Fold a freeze's dirty set into every owed set.  A file object's dirty set has
        its cycle's size: an owed set follows it (a shrink drops the blocks past the
        end, a growth adds clear bits; the dirty set of the cycle that grew holds the
        whole new tail, so whatever a target held there is overwritten)."""
        for r in self.targets:
            if dirty is None:
                r.owed = None
            elif r.owed is not None:
                if r.owed.nbits != dirty.nbits:
                    r.owed = resized_bitmap(r.owed, dirty.nbits)
                r.owed.union_update(dirty)
        if dirty is not None:
            self.state.nblocks = dirty.nbits

    # -- repairs (verify hook, docs/verify.md) ---------------------------------------------
    # A verify's differing blocks wait in a repair set per target (persisted) until the
    # next freeze folds them into that target's owed set, which is saved before anything
    # ships.  They never go into the owed set directly: a cycle in flight empties the
    # owed set once applied, and would drop blocks added while it shipped.
    def owe_blocks(self, label: str, blocks: ExtentBitmap) -> int | None:
        """Ship ``blocks`` (over the subject's blocks) to target ``label`` in the next cycle.

        Returns the cycle that will carry them, or None while the mirror is broken
        (they are kept, and ship in the first cycle after a resume).
        """
        if not isinstance(blocks, ExtentBitmap) or blocks.nbits != self.subject.nblocks:
            raise UsageError(f"owe_blocks: a bitmap of {self.subject.nblocks} blocks is needed")
        if label not in {r.label for r in self.targets}:
            raise NotFoundError(f"mirror of {self.volume.name!r} has no target {label}")
        with self._cond:
            pending = self._repairs.get(label)
            if pending is None:
                pending = blocks.copy()
            else:
                pending.union_update(blocks)
            self.state.save_repair(label, pending)
            self._repairs[label] = pending
            if self._break:
                return None
        return self.request_freeze()

    def hold_merges(self) -> None:
        """A verify starts: no merge starts until ``release_merges`` (one per hold).

        A verify reads frozen cycles from the oldest one it holds open up to the newest;
        the store refuses new readers of cycles <= j as soon as a merge of overlay j is
        asked for (even while that merge waits for the verify's readers), so the merger
        must not ask while a verify runs.  Overlays pile up meanwhile, not cycles.
        """
        with self._cond:
            self._merge_holds += 1

    def release_merges(self) -> None:
        with self._cond:
            self._merge_holds = max(0, self._merge_holds - 1)
            self._cond.notify_all()

    def repair_pending(self, label: str) -> int:
        """Blocks waiting for a freeze to be folded into ``label``'s owed set."""
        with self._cond:
            pending = self._repairs.get(label)
            return 0 if pending is None else pending.count()

    def _load_repairs(self, label: str) -> None:
        pending = self.state.load_repair(label)
        if pending is not None and pending.nbits == self.subject.nblocks:
            with self._cond:
                self._repairs[label] = pending
                self._sync_want = max(self._sync_want, self.subject.open_overlay + 1)

    def _fold_repairs(self) -> dict[str, ExtentBitmap]:
        with self._cond:
            taken = {label: bm.copy() for label, bm in self._repairs.items()}
        for r in self.targets:
            if r.label in taken and r.owed is not None:
                r.owed.union_update(resized_bitmap(taken[r.label], r.owed.nbits))
        return taken

    def _repairs_folded(self, taken: dict[str, ExtentBitmap]) -> None:
        """The owed sets holding ``taken`` are saved: drop those blocks from the repair sets."""
        with self._cond:
            for label, done in taken.items():
                pending = self._repairs.get(label)
                if pending is None:
                    continue
                pending.difference_update(done)
                if pending.is_empty():
                    del self._repairs[label]
                    self.state.save_repair(label, None)
                else:
                    self.state.save_repair(label, pending)

    def _account_freeze(self, frozen) -> None:
        self._fold(frozen.dirty)
        repairs = self._fold_repairs()  # verify hook
        for r in self.targets:
            self.state.save_owed(r.label, r.owed)
        self.state.last_freeze = frozen.number
        self.state.save()
        self._repairs_folded(repairs)  # verify hook
        with self._cond:
            self.cycle = frozen.number
            self.last_freeze_time = frozen.freeze_time

    # -- one cycle --------------------------------------------------------
    def _ship_cycle(self, frozen) -> None:
        c = frozen.number
        reader = frozen.reader()
        reader.__enter__()
        try:
            if self.options.on_frozen is not None:
                self.options.on_frozen(frozen, reader)
            self._set_phase("copying")
            while True:
                todo = [r for r in self.targets
                        if r.broken is None and not r.paused and r.held_cycle < c]
                for r in todo:
                    r.ok = False
                if not todo:
                    break
                self._attempt(frozen, reader, todo)
                failed = [r for r in todo if not r.ok and r.broken is None]
                any_ok = any(r.ok or r.held_cycle >= c for r in self.targets)
                with self._cond:
                    if self._break_now or self._stop or not failed or any_ok:
                        break
                    delay = max(r.backoff for r in failed)
                    self.phase = "reconnecting"
                    self._cond.wait(delay)
                    if self._break_now or self._stop:
                        break
            with self._cond:
                for r in self.targets:
                    if r.broken is not None or r.paused or r.held_cycle >= c:
                        continue
                    if r.dial_thread is not None:
                        r.late = True  # the cycle went on without it: it asks for one
                    elif r.dialled:  # connected just too late for this cycle
                        self._sync_want = max(self._sync_want, self.volume.open_overlay + 1)
        finally:
            # The merger thread closes it: the close may free a merged overlay (slow).
            with self._cond:
                self._to_close.append(reader)
                self._cond.notify_all()
        self._copy_done = time.time()
        if c >= 2 and any(r.held_cycle >= c for r in self.targets):
            # Lagging targets catch up from their owed sets, not from this overlay.
            # The merge runs in the merger thread, off the next cycle's path: it
            # changes only images of cycles <= c-1, which nobody reads any more.
            with self._cond:
                self._merge_want = max(self._merge_want, c - 1)
                self._cond.notify_all()
        self._set_phase("idle")

    def _merge_loop(self) -> None:
        """Close finished readers, then fold shipped overlays into base, oldest first."""
        done = 0
        while True:
            with self._cond:
                while ((self._merge_want <= done or self._merge_holds)  # verify hook
                       and not self._to_close and not (self._stop and self._main_done)):
                    self._cond.wait(1.0)
                closing, self._to_close = self._to_close, []
                # Stop only once the cycle thread is gone: it may still queue a reader.
                stopping = self._stop and self._main_done
                # verify hook: while a verify holds merges, only readers are closed
                want = done if self._merge_holds else self._merge_want
            for reader in closing:
                try:
                    reader.close()
                except BaseException as exc:  # noqa: BLE001 - the store's failure, reported
                    self._crashed(exc)
            if want <= done:
                if stopping:
                    return  # stopping, and nothing left to merge
                continue
            try:
                t0 = time.monotonic()
                self.subject.merge_through(want)
                done = want
                with self._cond:
                    self.last_merge_seconds = time.monotonic() - t0
                    self._merge_seconds_unreported = (self._merge_seconds_unreported or 0.0
                                                      ) + self.last_merge_seconds
                log.debug("mirror %s: merged through overlay %d in %.3fs", self.volume.name,
                          want, self.last_merge_seconds)
            except BaseException as exc:  # noqa: BLE001 - the store's failure, reported
                self._crashed(exc)
                with self._cond:
                    while self._break and not self._stop:
                        self._cond.wait(1.0)  # retried after resume()
                    if self._stop:
                        return

    def _attempt(self, frozen, reader, targets: list[OutgoingTarget]) -> None:
        if self._break_now:
            return
        for r in targets:
            r.phase = "copying"  # a live link goes straight on
        # Targets that need a new connection are dialled in threads of their own: one
        # that does not answer (a dead host waits out the connect timeout) must not
        # hold the others.  Those not connected within dial_grace join a later cycle.
        dialling = [r for r in targets if self._needs_dial(r)]
        for r in dialling:
            self._start_dial(r)
        prepack = self._prepack(frozen, reader, targets, dialling)
        try:
            self._wait_dials(dialling, self.options.dial_grace)
            self._attempt_dialled(frozen, reader, targets, dialling, prepack)
        finally:
            if prepack is not None:
                prepack.discard()

    def _prepack(self, frozen, reader, targets: list[OutgoingTarget],
                 dialling: list[OutgoingTarget]) -> Prepack | None:
        """Pack a delta's frames while its one target is dialled (``sender.prepack``)."""
        if len(targets) != 1 or dialling != targets or targets[0].owed is None:
            return None
        owed = targets[0].owed
        if not owed.count():
            return None
        # Packed for a target of the current protocol (SCATTER frames); used only if
        # the dialled target speaks it and the plan keeps this owed set.
        return Prepack(iter(self.subject.cycle_frames(reader, owed, frozen.number, self.packer,
                                                      scatter=True)), owed, scatter=True)

    def _attempt_dialled(self, frozen, reader, targets: list[OutgoingTarget],
                         dialling: list[OutgoingTarget], prepack: Prepack | None) -> None:
        c = frozen.number
        ready = []
        for r in targets:
            if r in dialling and not r.dialled:
                # Still dialling (see _ship_cycle), or its dial failed and said why
                # (_failed): not part of this attempt.
                continue
            try:
                if self._prepare(r, frozen, reader):
                    ready.append(r)
                else:
                    r.ok = True  # the target already holds this cycle
            except BaseException as exc:  # noqa: BLE001
                self._failed(r, exc)
        groups: list[list[OutgoingTarget]] = []
        for r in ready:
            for g in groups:
                if _same_owed(g[0].owed, r.owed) and _scatter(g[0]) == _scatter(r):
                    g.append(r)
                    break
            else:
                groups.append([r])
        threads = [threading.Thread(target=self._ship_group, args=(g, frozen, reader, prepack),
                                    daemon=True) for g in groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._wait_commits(c, frozen, [r for r in ready if not r.ok and r.link is not None])

    def _wait_commits(self, c: int, frozen, waiting: list[OutgoingTarget]) -> None:
        """Wait for each target's commit of cycle ``c``, all at once.

        A target that has not committed ``stall_timeout`` seconds after another one did
        (stopped, hung on its disk: its kernel still takes the bytes) is dropped from
        the cycle like a failed one, so it holds up nobody else: its owed set keeps the
        cycle's blocks and a later cycle catches it up (a retry resumes after the chunks
        it acknowledged).  Alone, or with every target as slow, the wait is
        ``apply_timeout``.  State is recorded here, on the cycle's thread, in order."""
        if not waiting:
            return
        self._set_phase("applying")
        done: dict[str, tuple[BaseException | None, float]] = {}
        cond = threading.Condition()

        def wait(r: OutgoingTarget, link) -> None:
            t0 = time.monotonic()
            try:
                link.wait_committed(c, self.options.apply_timeout)
                result = (None, time.monotonic() - t0)
            except BaseException as exc:  # noqa: BLE001 - recorded below
                result = (exc, 0.0)
            with cond:
                done[r.label] = result
                cond.notify_all()

        threads = []
        for r in waiting:
            r.phase = "applying"
            threads.append(threading.Thread(target=wait, args=(r, r.link), daemon=True,
                                            name=f"commit-{self.volume.name}-{r.label}"))
        for t in threads:
            t.start()
        stragglers: list[OutgoingTarget] = []
        handled: set[str] = set()
        first = None
        while len(handled) < len(waiting):
            with cond:
                while not set(done) - handled:
                    if first is not None and \
                            time.monotonic() - first >= self.options.stall_timeout:
                        break
                    cond.wait(0.5 if first is None else
                              max(0.01, first + self.options.stall_timeout - time.monotonic()))
                new = [r for r in waiting if r.label in done and r.label not in handled]
            if not new:  # the others' grace is over
                stragglers = [r for r in waiting if r.label not in handled]
                break
            for r in new:  # recorded as each comes: a sync to that target returns
                handled.add(r.label)
                exc, seconds = done[r.label]
                if exc is None:
                    first = first or time.monotonic()
                    self._committed(r, frozen, seconds)
                else:
                    self._failed(r, exc)
        for r in stragglers:
            r.drop_link()  # its wait ends with the closed link
            self._failed(r, DeadlineError(
                f"target {r.label} had not committed cycle {c} {self.options.stall_timeout:g}"
                " s after another target did; it will catch up in a later cycle"))
        for t in threads:
            t.join()

    def _needs_dial(self, r: OutgoingTarget) -> bool:
        return not (r.link is not None and r.link.failure is None
                    and not self.state.entry(r.label).untrusted)

    def _dial(self, r: OutgoingTarget) -> TargetLink:
        """A new, opened link to ``r`` (network only: no state is read or written here)."""
        r.phase = "connecting"
        t0 = time.monotonic()
        link = TargetLink((r.spec.host, r.spec.port), r.spec.key, tls=r.spec.tls,
                          insecure=r.spec.insecure,
                          on_applied=lambda cycle, ft, r=r: self._on_applied(r, cycle, ft),
                          on_failure=lambda exc, r=r: self._apply_failed(r, exc))
        link.connect({
            "node_id": self.store.node_id, "node_name": self.store.node_name,
            "mirror": self.subject.remote_name, "group": self.subject.group,
            "volumes": self.subject.volume_specs(),
        }, lineage=self.options.lineage() if self.options.lineage is not None else None,
            resizable=self.subject.resizable and getattr(self.volume, "size_changed", False))
        log.debug("mirror %s -> %s: connected and opened in %.3fs", self.volume.name, r.label,
                  time.monotonic() - t0)
        return link

    def _start_dial(self, r: OutgoingTarget) -> None:
        """Dial ``r`` in a thread of its own, unless a dial of it is under way."""
        with self._cond:
            if r.dial_thread is not None:
                return
            r.drop_link()
            r.dialled = r.late = False
            r.dial_thread = threading.Thread(target=self._dial_in_background, args=(r,),
                                             daemon=True, name=f"mirror-dial-{r.label}")
            r.dial_thread.start()

    def _dial_in_background(self, r: OutgoingTarget) -> None:
        try:
            link = self._dial(r)
        except BaseException as exc:  # noqa: BLE001 - reported as the target's failure
            self._failed(r, exc)  # first: whoever sees the dial over sees why too
            with self._cond:
                r.dial_thread = None
                self._cond.notify_all()
            return
        with self._cond:
            r.dial_thread = None
            keep = not (self._stop or self._break_now or r.gone or r.paused)
            if keep:
                r.link, r.dialled = link, True
                if r.late:
                    # Connected after its cycle went on without it: a cycle now brings
                    # it up to date (one delta of its owed set).
                    r.late = False
                    self._sync_want = max(self._sync_want, self.volume.open_overlay + 1)
            self._cond.notify_all()
        if not keep:
            link.close()

    def _wait_dials(self, targets: list[OutgoingTarget], grace: float) -> None:
        deadline = time.monotonic() + grace
        with self._cond:
            while any(r.dial_thread is not None for r in targets) and not (
                    self._break_now or self._stop):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _prepare(self, r: OutgoingTarget, frozen, reader) -> bool:
        """Connect and reconcile; return False if the target already holds this cycle."""
        c = frozen.number
        e = self.state.entry(r.label)
        if e.in_flight == c and frozen.synced:
            # This process shipped the chunks the target holds from the page cache, and
            # that content is now durable: the very bytes, so a resume is safe.
            e.in_flight_synced = True
        if not r.dialled and r.link is not None and r.link.failure is None and not e.untrusted:
            return self._begin(r, frozen, plan.decide(e, r.held_cycle, r.owed is not None, c,
                                                      None))
        if not r.dialled:  # (the attempt dials first; a safety net)
            r.drop_link()
            r.link = self._dial(r)
        r.dialled = False
        link = r.link  # a break --now may drop it meanwhile
        if link is None:
            raise ConnectionLostError(f"target {r.label}: the link was dropped before cycle {c}")
        opened = link.opened
        held = max(opened["applied_cycle"], link.applied[0])
        view = plan.TargetView(opened["node_id"], held, opened["has_image"],
                               opened["pending_cycle"])
        decision = plan.decide(e, r.held_cycle, r.owed is not None, c, view)
        e.target_node = opened["node_id"]
        if decision.action == plan.SKIP:
            # It already holds this cycle or a newer one: nothing to send now.
            if decision.distrust:
                e.untrusted = True  # the next cycle compares hashes
                self.state.save()
            else:
                r.owed = ExtentBitmap(_nblocks(frozen, self.subject))
                self._record_held(r, held, opened["freeze_time"])
            return False
        if decision.action == plan.FULL:
            r.owed = None
        elif decision.action == plan.COMPARE:
            r.phase = "comparing"
            r.owed = self.subject.differences(
                reader, lambda i, s, n: r.link.fetch_hashes(i, s, n, self.options.apply_timeout))
            e.untrusted = False
            e.in_flight = 0
            log.info("mirror %s -> %s: hash comparison found %d differing blocks",
                     self.volume.name, r.label, r.owed.count())
        return self._begin(r, frozen, decision)

    def _begin(self, r: OutgoingTarget, frozen, decision: plan.Decision) -> bool:
        c = frozen.number
        e = self.state.entry(r.label)
        link = r.link  # a break or a stall may drop r.link while we wait
        if link is None:
            raise ConnectionLostError(f"target {r.label}: the link was dropped before cycle {c}")
        full = r.owed is None
        pend_cycle, pend_chunks = link.acked
        resume = decision.resume and pend_cycle == c
        r.resume_from = pend_chunks if resume else 0
        self.state.save_owed(r.label, r.owed)
        if full:
            frozen.sync()  # a long full copy should survive a restart of ours: resumable
        # Chunks sent before the frozen overlay is durable could hold writes a crash of
        # this process would take back: only a cycle synced before it began may resume.
        e.in_flight, e.in_flight_full, e.in_flight_synced = c, full, frozen.synced
        self.state.save()
        # A file object's cycle of another size than 'open' said: its size goes first.
        size = getattr(frozen, "size", None) if self.subject.resizable else None
        if size is not None and size != link.declared_sizes[0]:
            link.link.send_message("size", cycle=c, index=0, size=size)
        link.link.send_message("begin", cycle=c, freeze_time=frozen.freeze_time, full=full,
                               resume_from=r.resume_from)
        # Targets are prepared one after the other: a stopped one holds the cycle up
        # for this long at most (the link timeout, if shorter than 30 s).
        got = link.wait_for(lambda: link.acked[0] == c and link.acked,
                            min(30.0, self.options.stall_timeout), f"the start of cycle {c}")
        if got[1] != r.resume_from:
            raise StoreError(f"target {r.label} resumed at chunk {got[1]}, "
                             f"asked {r.resume_from}")
        log.debug("mirror %s -> %s: cycle %d begun (%s)", self.volume.name, r.label, c,
                  "full" if full else "delta")
        return True

    def _ship_group(self, group: list[OutgoingTarget], frozen, reader,
                    prepack: Prepack | None = None) -> None:
        """Produce the cycle's frames once; one sender thread per target of the group
        (the first frames packed ahead by ``prepack`` if they fit the group)."""
        c = frozen.number
        queues = {r.label: queue.Queue(self.options.queue_frames) for r in group}
        alive = {r.label: r for r in group}
        t0 = time.monotonic()

        observe_link = getattr(self.packer, "observe_link", None)

        def sender(r: OutgoingTarget) -> None:
            q = queues[r.label]
            meter = None
            sent_raw = 0
            send_seconds = 0.0
            prog = CycleProgress(c, r.owed is None, _cycle_bytes(self.subject, r.owed),
                                 r.resume_from)
            r.progress = prog
            # A local reference: a break or a stall may drop r.link meanwhile; then
            # the closed socket fails our send with ConnectionLostError (temporary).
            tlink = r.link
            try:
                if tlink is None:
                    raise ConnectionLostError(
                        f"target {r.label}: the link was dropped before cycle {c} was sent")
                wire0 = tlink.link.bytes_sent
                covered = skipped = 0
                r.phase = "copying"
                while not done.get(r.label):
                    # Small frames (scattered 4 KiB blocks) go out together, one
                    # send per batch instead of one per frame.
                    batch, nbytes = [], 0
                    items = q.get()
                    while True:
                        if items is None:
                            done[r.label] = True
                            break
                        for index, frame, raw, extent in items:
                            if index is not None:
                                covered += extent
                                if index < r.resume_from:
                                    skipped += extent
                            # index None: a group's member switch, sent also when resuming.
                            if index is None or index >= r.resume_from:
                                batch.append(frame)
                                nbytes += len(frame)
                                sent_raw += raw
                        if nbytes >= SEND_BATCH_BYTES:
                            break
                        try:
                            items = q.get_nowait()
                        except queue.Empty:
                            break
                    if batch:
                        ts = time.monotonic()
                        self.rate.consume(nbytes)
                        tlink.check()
                        if observe_link is not None:  # --compress auto learns the link
                            if meter is None or meter.sock is not tlink.link.sock:
                                meter = LinkMeter(tlink.link.sock)
                            # before the send: was the link busy all since the last one?
                            delivered = meter.sample(tlink.link.bytes_sent)
                            if delivered is not None:
                                observe_link(r.label, *delivered)
                        tlink.link.send_frames(batch, f"chunks up to {index} of cycle {c}")
                        send_seconds += time.monotonic() - ts
                    # Published after the send: the figures never run ahead of the link.
                    prog.bytes_raw = sent_raw
                    prog.skipped_bytes = skipped
                    prog.done_bytes = covered
                    prog.bytes_wire = tlink.link.bytes_sent - wire0
                    prog.chunks_sent = total[0] if done.get(r.label) else (
                        index + 1 if index is not None else prog.chunks_sent)
                dt = time.monotonic() - t0
                wire = tlink.link.bytes_sent - wire0
                if covered != prog.total_bytes and r.link is tlink:
                    # Only the progress figure is off (the target verifies the data
                    # itself), but it means the stream and the owed set disagree.
                    log.warning("cycle %d of %s to %s: the frames covered %d bytes of the "
                                "%d owed; the progress figures are off, please report this",
                                c, self.volume.name, r.label, covered, prog.total_bytes)
                frozen.sync()  # waits for the background fsync: the target commits at 'end'
                end = frames.encode_control(c, messages.encode_message(
                    "end", cycle=c, chunks=total[0]))
                wire += len(end)  # the figures count the 'end' frame too
                with self._times_lock:
                    phases = dict(self._times, pack=pack_seconds[0], send=send_seconds)
                stats = {"last_cycle": c, "full": r.owed is None, "bytes_raw": sent_raw,
                         "bytes_wire": wire, "chunks": total[0], "resumed_from": r.resume_from,
                         "duration": dt, "throughput": sent_raw / dt if dt > 0 else None,
                         "compression_ratio": sent_raw / wire if wire else None,
                         "phases": phases}
                with self._cond:
                    # Before 'end': the target may commit (and apply) at once.
                    r.cycle_stats[c] = stats
                tlink.link.send_frame(end, f"the 'end' of cycle {c}")
                log.debug("mirror %s -> %s: cycle %d sent, %d chunks, %d bytes (pack %.3fs, "
                          "send %.3fs)", self.volume.name, r.label, c, total[0], wire,
                          pack_seconds[0], send_seconds)
                prog.bytes_wire = tlink.link.bytes_sent - wire0
            except BaseException as exc:  # noqa: BLE001
                alive.pop(r.label, None)
                self._failed(r, exc)
                # Drain so the producer never blocks on us (unless the end was seen).
                while not done.get(r.label) and q.get() is not None:
                    pass

        total = [0]
        pack_seconds = [0.0]
        done: dict[str, bool] = {}
        threads = [threading.Thread(target=sender, args=(r,), daemon=True) for r in group]
        for t in threads:
            t.start()

        def publish(items: list) -> None:
            for r in group:
                if r.label not in alive:
                    continue
                try:
                    queues[r.label].put(items, timeout=self.options.stall_timeout)
                except queue.Full:
                    alive.pop(r.label, None)
                    r.drop_link()  # the sender fails and drains
                    self._failed(r, DeadlineError(
                        f"target {r.label} took no data for {self.options.stall_timeout}s;"
                        " it will catch up in a later cycle"))

        try:
            # Frames travel to the senders in lists of about SEND_BATCH_BYTES: one queue
            # handoff per list, not per frame (a delta is thousands of 4 KiB frames).
            items, nbytes = [], 0
            ahead: list = []
            if prepack is not None and len(group) == 1 and prepack.fits(
                    group[0].owed, _scatter(group[0])):
                ahead, stream = prepack.take()
                log.debug("mirror %s -> %s: %d bytes of cycle %d's frames packed ahead "
                          "in %.3fs%s", self.volume.name, group[0].label,
                          sum(len(item[1]) for item in ahead), c, prepack.seconds,
                          " (all of them)" if prepack.finished else "")
            else:
                stream = iter(self.subject.cycle_frames(reader, group[0].owed, c, self.packer,
                                                        scatter=_scatter(group[0])))
            if ahead:  # the frames packed ahead first, each let go of once handed on
                stream = itertools.chain(_drain(collections.deque(ahead)), stream)
                ahead = []
            while True:
                tp = time.monotonic()
                item = next(stream, None)
                pack_seconds[0] += time.monotonic() - tp
                if item is None:
                    break
                items.append(item)
                nbytes += len(item[1])
                if item[0] is not None:
                    total[0] = item[0] + 1
                if nbytes >= SEND_BATCH_BYTES:
                    publish(items)
                    items, nbytes = [], 0
                if self._break_now:
                    raise DeadlineError("break requested")
            if items:
                publish(items)
        except BaseException as exc:  # noqa: BLE001 - a read error fails every target
            for r in group:
                if r.label in alive:
                    self._failed(r, exc)
                    r.drop_link()
        finally:
            for r in group:
                queues[r.label].put(None)
            for t in threads:
                t.join()

    def _committed(self, r: OutgoingTarget, frozen, commit_seconds: float) -> None:
        """The target holds cycle ``frozen`` durably: nothing is owed from before it."""
        r.owed = ExtentBitmap(_nblocks(frozen, self.subject))
        r.ok, r.backoff, r.last_error, r.phase = True, 0.0, None, "idle"
        with self._cond:
            stats = r.cycle_stats.get(frozen.number)
            if stats is not None:
                stats["phases"]["commit"] = commit_seconds
                if self._merge_seconds_unreported is not None:
                    # A merge finished since the previous cycle: counted once, with this one.
                    stats["phases"]["merge"] = self._merge_seconds_unreported
                    self._merge_seconds_unreported = None
                r.stats = stats
            r.committed_at[frozen.number] = time.monotonic()
        self._record_held(r, frozen.number, frozen.freeze_time)
        if stats is not None:
            log.debug("mirror %s -> %s: cycle %d phases %s", self.volume.name, r.label,
                      frozen.number, " ".join(f"{k}={v:.3f}s" for k, v in stats["phases"].items()))

    def _record_held(self, r: OutgoingTarget, cycle: int, freeze_time: float) -> None:
        # Order: the owed set is emptied on disk before we claim the cycle.
        self.state.save_owed(r.label, r.owed)
        e = self.state.entry(r.label)
        e.held_cycle, e.freeze_time, e.in_flight = cycle, freeze_time, 0
        self.state.save()
        with self._cond:
            # One step for status(): the cycle's figures are in r.stats already.
            r.held_cycle, r.progress = cycle, None
            self._cond.notify_all()
        # A target found holding the cycle (or one that applied it before we saw the
        # commit: protocol 1) has applied it too.
        link = r.link
        if link is not None and link.applied[0] >= cycle:
            self._on_applied(r, *link.applied)

    def _on_applied(self, r: OutgoingTarget, cycle: int, freeze_time: float) -> None:
        """The target applied ``cycle`` (called by its link's reader thread, or above)."""
        with self._cond:
            if cycle <= r.applied_cycle or cycle > r.held_cycle:
                # Older news, or news of a cycle whose commit we have not recorded yet:
                # _record_held picks it up from link.applied once it has.
                return
            r.applied_cycle, r.freeze_time = cycle, freeze_time
            stats = r.cycle_stats.pop(cycle, None)
            for old in [k for k in r.cycle_stats if k < cycle]:
                del r.cycle_stats[old]
            committed = r.committed_at.pop(cycle, None)
            for old in [k for k in r.committed_at if k < cycle]:
                del r.committed_at[old]
            if stats is not None and committed is not None:
                stats["phases"]["apply"] = time.monotonic() - committed
            if stats is not None:
                r.latency.observe(stats["bytes_raw"], time.time() - freeze_time)
            hook = stats is not None and self.options.on_applied is not None
            if hook:
                # A sync waiting for this cycle returns once the hook counted it: its
                # answer's figures (the daemon's shipped bytes) include this cycle.
                self._hooks_running += 1
            self._cond.notify_all()
        log.debug("mirror %s -> %s: cycle %d applied there", self.volume.name, r.label, cycle)
        if hook:
            try:
                self.options.on_applied(cycle, r.label, dict(stats))
            finally:
                with self._cond:
                    self._hooks_running -= 1
                    self._cond.notify_all()

    def _apply_failed(self, r: OutgoingTarget, exc: BaseException) -> None:
        """The target sent an error between cycles (called by its link's reader thread):
        the apply of a committed cycle failed there (a full disk or Ceph pool).

        Status shows it at once, and a cycle is asked for: its connection makes the
        target's recovery redo the committed apply (nothing is sent again), retried
        with backoff while it fails.  A link that merely closed asks for nothing.
        """
        if not isinstance(exc, RemoteError):
            return
        with self._cond:
            if self._stop or r.broken is not None or r.held_cycle <= r.applied_cycle:
                return  # not an apply's failure: a cycle in flight reports its own
            r.last_error = f"{type(exc).__name__}: {exc}"
            self._sync_want = max(self._sync_want, self.volume.open_overlay + 1)
            self._cond.notify_all()
        log.warning("mirror %s -> %s: the target could not apply cycle %d: %s",
                    self.volume.name, r.label, r.held_cycle, exc)

    def _failed(self, r: OutgoingTarget, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if getattr(exc, "code", None) == "DemotedError" and self.options.on_demoted is not None:
            self.options.on_demoted(r.label, str(exc))  # recorded before anyone reads status
        r.progress = None  # a retry starts a new attempt with its own figures
        r.drop_link()
        with self._cond:
            r.last_error = text
            r.failed_cycle = self.cycle
            if is_temporary(exc) or self._break_now:
                r.phase = "reconnecting"
                r.backoff = min(self.options.retry_max,
                                max(self.options.retry_initial, r.backoff * 2))
            else:
                r.phase = "broken"
                r.broken = exc
                self.last_error = text
            self._cond.notify_all()
        log.warning("mirror %s -> %s: %s", self.volume.name, r.label, text)


def _nblocks(frozen, subject) -> int:
    """The blocks of cycle ``frozen`` (a file object's cycle has its own size)."""
    return getattr(frozen, "nblocks", None) or subject.nblocks


def _cycle_bytes(subject, owed: ExtentBitmap | None) -> int:
    """Bytes a cycle covers: each member's owed blocks times its block size (all of it if full)."""
    total = 0
    for vol, part in zip(subject.volumes, subject.split(owed), strict=True):
        total += vol.size if part is None else part.count() * vol.block_size
    return total


def _progress_snapshot(prog: CycleProgress | None) -> dict | None:
    return None if prog is None else prog.as_dict()


def _same_owed(a: ExtentBitmap | None, b: ExtentBitmap | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a == b


def _drain(items: collections.deque):
    """Yield and forget ``items`` from the front (a list iterator would keep them all)."""
    while items:
        yield items.popleft()


def _scatter(r: OutgoingTarget) -> bool:
    """The target takes SCATTER frames (protocol 2)."""
    return r.link is not None and r.link.pipelined


__all__ = ["CycleProgress", "MirrorDriver", "MirrorOptions", "TargetSpec", "CycleMirrorError"]
