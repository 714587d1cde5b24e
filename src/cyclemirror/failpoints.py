"""Failpoints: named places in production code where a test can slow a step down.

A test that kills a process must be able to land the kill inside a short
step (applying a delta takes milliseconds).  Production code marks such a
place with ``failpoints.hit(NAME)``; it does nothing unless that failpoint
was enabled, and then sleeps the enabled number of seconds.

Enabling is always explicit, never read from the environment:

* in the process under test: ``failpoints.enable(NAME, seconds)`` (or the
  context manager ``failpoints.enabled``), ``disable``, ``clear``;
* in a daemon a test starts: ``cyclemirror serve --failpoint NAME=SECONDS``
  (a hidden option, repeatable), parsed by ``parse_spec`` once at start.

Only the names in ``KNOWN`` exist, so a misspelt one is an error instead of a
test that silently tests nothing.  ``hit`` costs one dict lookup when its
failpoint is off; ``hits(NAME)`` counts the passes while it is on, so a
test can check that its failpoint was really reached.  Thread-safe: the registry is replaced whole on each
change, and ``hit`` reads it once.
"""

from __future__ import annotations

import contextlib
import time

from cyclemirror.errors import UsageError

KNOWN: dict[str, str] = {
    "receiver.apply_record": "sleep after each staged record applied to a mirror image "
                             "(receiver/mirror.py), so a kill -9 lands inside apply",
    "receiver.apply_resized": "sleep after a delta's redo set the images to the cycle's new "
                              "sizes, before its records are replayed (receiver/mirror.py), so "
                              "a kill -9 lands between a resize and the data",
    "receiver.commit": "sleep after a cycle's 'end' arrived, before the target commits it "
                       "(receiver/session.py): a target that takes the bytes and never "
                       "commits (a hung disk)",
    "promote.prepared": "sleep in a promotion after the image was recovered and checked, before "
                        "its commit point (receiver/promote.py)",
    "promote.recorded": "sleep after each role record a promotion writes (receiver/promote.py), "
                        "so a kill -9 lands between the commit point and the images' move",
    "promote.adopted": "sleep after each member image a promotion made a volume "
                       "(receiver/promote.py), so a kill -9 lands between a group's members",
    "store.adopt_image": "sleep in Store.adopt_image between moving the image in as base and "
                         "the volume's directory appearing (store/store.py)",
    "receiver.apply_visible": "sleep between telling the source that a delta applied in "
                              "place is applied and the image's fsync (receiver/mirror.py), so "
                              "a kill -9 lands between them",
    "receiver.tree_op": "sleep after each operation of a tree delta applied in the staging "
                        "copy (receiver/treeops.py), so a kill -9 lands mid-apply",
    "receiver.tree_switch": "sleep between a tree mirror's pending record and its exchange "
                            "of directories (receiver/treeops.py)",
    "treepromote.made": "sleep in a tree promotion after its tree is made at the path, "
                        "before it is registered (receiver/treepromote.py)",
    "treepromote.registered": "sleep in a tree promotion after the tree object is "
                              "registered, before the record says done "
                              "(receiver/treepromote.py)",
    "treefailback.recorded": "sleep in a tree failback on the old source after its record "
                             "(the commit point), before the mirror is made "
                             "(receiver/treefailback.py)",
    "treefailback.switched": "sleep in a tree failback after the mirror holds the promoted "
                             "cycle, before the live tree is renamed aside "
                             "(receiver/treefailback.py)",
    "treefailback.kept": "sleep in a tree failback after the live tree was renamed aside, "
                         "before the tree object is removed (receiver/treefailback.py)",
    "turnback.checked": "sleep in a failback's or split brain resolution's turn-back of "
                        "volumes into a mirror image after its checks, before its commit "
                        "point (receiver/turnback.py)",
    "turnback.recorded": "sleep in a turn-back right after its intent (the commit point) "
                         "was recorded (receiver/turnback.py)",
    "turnback.released": "sleep in a turn-back after each member's base became its mirror "
                         "image (receiver/turnback.py), so a kill -9 lands between members",
    "turnback.committed": "sleep in a turn-back after the mirror state was written, before "
                          "the role records say secondary (receiver/turnback.py)",
    "filefailback.checked": "sleep in a file object's failback on the old source after its "
                            "checks, before its intent (the commit point) is written "
                            "(receiver/filefailback.py)",
    "filefailback.recorded": "sleep in a file object's failback right after its intent "
                             "(the commit point) was written (receiver/filefailback.py)",
    "filefailback.imaged": "sleep in a file object's failback after the mirror image and "
                           "its state were made, before the live file is renamed aside "
                           "(receiver/filefailback.py)",
    "filefailback.kept": "sleep in a file object's failback after the live file was renamed "
                         "aside, before the file object is removed "
                         "(receiver/filefailback.py)",
    "filefailback.removed": "sleep in a file object's failback after the file object was "
                            "removed, before its role record says secondary "
                            "(receiver/filefailback.py)",
    "treediscard.recorded": "sleep in a tree's split brain lost here after its record (the "
                            "commit point) (receiver/treediscard.py)",
    "treediscard.kept": "sleep in a tree's split brain lost here after the promoted tree was "
                        "renamed aside (receiver/treediscard.py)",
    "treediscard.released": "sleep in a tree's split brain lost here after the promotion "
                            "record went, before the record says done "
                            "(receiver/treediscard.py)",
    "receiver.tree_switched": "sleep between a tree mirror's exchange of directories and "
                              "the record saying it applied (receiver/treeops.py)",
}
MAX_SECONDS = 60.0

_active: dict[str, float] = {}
_hits: dict[str, int] = {}  # per enabled failpoint, how often it was passed (for tests)


def hit(name: str) -> None:
    """The marked place: sleep if ``name`` is enabled, else return at once."""
    seconds = _active.get(name)
    if seconds is not None:
        _hits[name] = _hits.get(name, 0) + 1
        if seconds:
            time.sleep(seconds)


def is_on(name: str) -> bool:
    """Whether ``name`` is enabled (for a place that would compute how often to hit it)."""
    return name in _active


def hits(name: str) -> int:
    """How often ``hit(name)`` was passed while enabled, since it was last enabled."""
    return _hits.get(name, 0)


def enable(name: str, seconds: float) -> None:
    """Turn failpoint ``name`` on: each ``hit(name)`` then sleeps ``seconds``."""
    global _active
    if name not in KNOWN:
        raise UsageError(f"unknown failpoint {name!r}; known: {', '.join(sorted(KNOWN))}")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (
            0 <= seconds <= MAX_SECONDS):
        raise UsageError(f"failpoint {name}: seconds must be a number in [0, {MAX_SECONDS:g}], "
                         f"got {seconds!r}")
    _hits[name] = 0
    _active = {**_active, name: float(seconds)}


def disable(name: str) -> None:
    global _active
    _active = {k: v for k, v in _active.items() if k != name}


def clear() -> None:
    global _active
    _active = {}


def active() -> dict[str, float]:
    """The enabled failpoints and their seconds (a copy)."""
    return dict(_active)


@contextlib.contextmanager
def enabled(name: str, seconds: float):
    """``with failpoints.enabled(NAME, s):`` -- on inside the block, off after it."""
    enable(name, seconds)
    try:
        yield
    finally:
        disable(name)


def parse_spec(spec: str) -> tuple[str, float]:
    """``"NAME=SECONDS"`` (a command-line value) -> (name, seconds), checked like ``enable``."""
    name, sep, value = spec.partition("=")
    if not sep:
        raise UsageError(f"--failpoint {spec!r}: expected NAME=SECONDS")
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"--failpoint {spec!r}: {value!r} is not a number of seconds") from None
    if name not in KNOWN:
        raise UsageError(f"--failpoint {spec!r}: unknown failpoint {name!r}; known: "
                         f"{', '.join(sorted(KNOWN))}")
    if not 0 <= seconds <= MAX_SECONDS:  # also refuses nan
        raise UsageError(f"--failpoint {spec!r}: seconds must be in [0, {MAX_SECONDS:g}]")
    return name, seconds
