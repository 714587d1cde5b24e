"""Deleting an incoming mirror on the target: ``cyclemirror mirror rm SOURCE/NAME``.

An incoming mirror is a state file (``<name>.state.json``, or
``<name>.group.json`` for a consistency group) and, per member volume, its
image ``<volume>.img`` with the files that follow it: a full cycle being
built (``.img.new``), an apply into a copy (``.img.apply``), the scrub record
(``.scrub``, ``.scrub.new``), the last verify (``.verify.json``); plus the
mirror's staging logs (``<name>.staging[.N]``, ``<name>.group.staging[.N]``).

``find_incoming`` names one mirror from what a person types: the source's
node id or node name (as ``status`` lists it), a slash, and the mirror's name
(a single volume's name on the target, or a group's ``target_mirror`` name).
A member of a group is refused with the group's name: a group's images are
applied all or none, so they are removed together.

``remove_files`` deletes the state file first, so a crash half way leaves
files no state names (never a state naming images that are gone), then the
rest, and fsyncs the directory.  The caller keeps sources out meanwhile
(``server.MirrorRegistry.hold``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cyclemirror.errors import CycleMirrorError, NotFoundError, UsageError
from cyclemirror.receiver import fileops
from cyclemirror.receiver.state import MirrorState

STATE_SUFFIXES = {".state.json": False, ".group.json": True}
IMAGE_FOLLOWERS = ("", ".new", ".apply")  # after <volume>.img
RECORD_SUFFIXES = (".scrub", ".scrub.new", ".scrub.tmp", ".verify.json")  # after <volume>


@dataclass(frozen=True)
class IncomingMirror:
    node_id: str
    directory: str
    mirror: str
    group: bool
    state_path: str
    state: MirrorState | None  # None: the state file is damaged
    error: str | None = None

    @property
    def volumes(self) -> list[str]:
        if self.state is not None:
            return [v.name for v in self.state.volumes]
        return [] if self.group else [self.mirror]

    @property
    def source_name(self) -> str | None:
        return self.state.source_name if self.state is not None else None


def incoming_mirrors(root: str) -> list[IncomingMirror]:
    """Every incoming mirror of the store at ``root``, damaged ones included."""
    base = os.path.join(root, "mirrors")
    out = []
    for node in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        ndir = os.path.join(base, node)
        for entry in sorted(os.listdir(ndir)) if os.path.isdir(ndir) else []:
            for suffix, group in STATE_SUFFIXES.items():
                if not entry.endswith(suffix):
                    continue
                path = os.path.join(ndir, entry)
                try:
                    state, error = MirrorState.load(path), None
                except (CycleMirrorError, OSError) as exc:
                    state, error = None, str(exc)
                out.append(IncomingMirror(node, ndir, entry[: -len(suffix)], group, path,
                                          state, error))
    return out


def find_incoming(root: str, name: object) -> IncomingMirror:
    """The incoming mirror ``SOURCE/NAME``; NotFoundError listing what there is."""
    if not isinstance(name, str) or name.count("/") < 1:
        raise UsageError(f"{name!r:.80} is not SOURCE/NAME: the source's node name or id "
                         "(as 'status' lists it under incoming), a slash, the mirror's name")
    source, mirror = name.rsplit("/", 1)
    mirrors = incoming_mirrors(root)
    by_id = [m for m in mirrors if m.node_id == source]
    by_name = [m for m in mirrors if m.source_name == source]
    nodes = {m.node_id for m in by_name}
    if not by_id and len(nodes) > 1:
        raise UsageError(f"source name {source!r} belongs to several source nodes "
                         f"({', '.join(sorted(nodes))}); name the source by its node id")
    candidates = by_id or by_name
    found = [m for m in candidates if m.mirror == mirror]
    if found:
        return found[0]
    member_of = [m for m in candidates if m.group and mirror in m.volumes]
    if member_of:
        g = member_of[0]
        raise UsageError(f"{mirror!r} is a member of the group mirror {g.mirror!r} of source "
                         f"{source}, whose images are applied all or none; remove the whole "
                         f"group with 'cyclemirror mirror rm {source}/{g.mirror}'")
    known = ", ".join(f"{m.source_name or m.node_id}/{m.mirror}" for m in mirrors) or "none"
    raise NotFoundError(f"no incoming mirror {name!r} in this store (incoming mirrors: "
                        f"{known}); name it SOURCE/NAME as 'status' lists it")


def remove_member_files(directory: str, volume: str) -> list[str]:
    """Delete one member's image and the files that follow it; return the paths removed."""
    removed = []
    base = os.path.join(directory, volume)
    for path in [base + ".img" + f for f in IMAGE_FOLLOWERS] + [base + s for s in
                                                                RECORD_SUFFIXES]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def remove_files(m: IncomingMirror) -> list[str]:
    """Delete the mirror's state, images and records; return the paths removed."""
    removed = []

    def unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        removed.append(path)

    unlink(m.state_path)  # first: from here no state names the images
    fileops.fsync_dir(m.directory)
    for vol in m.volumes:
        removed += remove_member_files(m.directory, vol)
    prefix = m.mirror + (".group.staging" if m.group else ".staging")
    for entry in sorted(os.listdir(m.directory)):
        if entry == prefix or (entry.startswith(prefix + ".")
                               and entry[len(prefix) + 1:].isdigit()):
            unlink(os.path.join(m.directory, entry))
    fileops.fsync_dir(m.directory)
    try:
        os.rmdir(m.directory)  # the source's last mirror here: its directory goes too
    except OSError:
        pass
    return removed
