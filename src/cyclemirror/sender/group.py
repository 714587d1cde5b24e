"""What a MirrorDriver mirrors: one volume, or a consistency group of volumes.

The driver's machinery (owed sets, fan-out, resume, hash comparison, merge)
is written once, against a *subject*:

* ``SingleVolume``: one volume, named on the target after the volume or its
  ``--as`` name.  Its frozen cycles and readers are the store's own
  ``FrozenCycle`` / ``FrozenReader``.
* ``VolumeGroup``: several volumes of one store, frozen together by
  ``Store.freeze_group`` so every member's cycle *c* is the same instant.
  A ``GroupCycle`` bundles the members' frozen cycles, a ``GroupReader``
  their readers.

Block spaces: the driver keeps one owed ExtentBitmap per target.  For a
group that bitmap covers the members' blocks laid end to end (member *i*
owns bits ``offsets[i] .. offsets[i] + nblocks_i``), so saving, folding and
comparing owed sets works unchanged; ``split`` and ``join`` convert.

The frame stream of a group cycle is ``member(i)`` followed by member *i*'s
frames, for each member in order.  ``member`` frames are not chunks (they are
always sent, also when a resumed cycle skips chunks), so the target is told
which member a resumed chunk belongs to.  A group is applied all-or-none by
the target (docs/protocol.md, "Apply").

Every member of a group must stand at the same overlay number, because one
cycle number names the group's freeze; ``align`` brings members that differ
(a volume that was mirrored on its own before) level with extra freezes.

Members come and go (``adopt_layout``): the driver's state directory records
the member layout it was written for (``members.json``: names and block
counts, in order).  When the group's members differ, each target's owed set
is laid out again: a member that stays keeps its bits, a new member owes all
of its blocks (its first cycle carries it whole, inside an ordinary delta of
the others), a member that left drops out.  Written as ``.relayout`` files,
committed by the new ``members.json``, then renamed in, so a crash in
between either redoes the relayout or finishes it.  A cycle in flight under
the old layout is never resumed (its chunk stream belongs to the old members).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

from cyclemirror._cext import frames
from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import CycleMirrorError, UsageError
from cyclemirror.fileio import atomic_write
from cyclemirror.sender import shipping
from cyclemirror.store.names import validate_volume_name
from cyclemirror.wire import messages

GROUP_STATE_PREFIX = ".group-"  # outgoing/.group-NAME: never a volume name (those start alnum)
LAYOUT_FILE = "members.json"  # the member layout the owed sets of a group state are laid out for
RELAYOUT_SUFFIX = ".relayout"
log = logging.getLogger(__name__)


def _member_frame(index: int) -> bytes:
    return frames.encode_control(0, messages.encode_message("member", index=index))


class SingleVolume:
    group = False

    def __init__(self, volume, remote_name: str | None = None):
        self.volume = volume
        self.volumes = [volume]
        self.name = volume.name
        self.remote_name = validate_volume_name(remote_name or volume.name)
        self.remote_names = [self.remote_name]
        self.offsets = [0]
        self.state_dir_name = volume.name

    @property
    def nblocks(self) -> int:
        """The volume's blocks; a file object's change with its size (as of its newest
        freeze: ``fileobject``).  A subject that sets its own (a group, an RBD volume)
        keeps that."""
        own = self.__dict__.get("_nblocks")
        return self.volume.nblocks if own is None else own

    @nblocks.setter
    def nblocks(self, value: int) -> None:
        self._nblocks = value

    @property
    def resizable(self) -> bool:
        """The size may change from cycle to cycle (a file object), so each cycle's
        frozen size is sent (``size`` messages, docs/protocol.md)."""
        return bool(getattr(self.volume, "resizable", False))

    @property
    def open_overlay(self) -> int:
        return self.volume.open_overlay

    def freeze(self, sync: bool = True):
        return self.volume.freeze(sync)

    def frozen(self, k: int):
        return self.volume.frozen(k)

    def frozen_cycles(self) -> list[int]:
        return self.volume.frozen_cycles()

    def merge_through(self, k: int) -> None:
        self.volume.merge_through(k)

    def align(self) -> list[str]:
        return []

    def adopt_layout(self, state) -> list[str]:
        return []

    @staticmethod
    def member_readers(reader) -> list:
        return [reader]

    def split(self, owed: ExtentBitmap | None) -> list:
        return [owed]

    def volume_specs(self) -> list[dict]:
        return [{"name": n, "size": v.size, "block_size": v.block_size}
                for n, v in zip(self.remote_names, self.volumes, strict=True)]

    def cycle_frames(self, reader, owed, cycle: int, packer, scatter: bool = False
                     ) -> Iterator[tuple]:
        """(chunk index or None for a member switch, frame, data bytes, covered bytes).

        ``scatter``: small extents of a delta travel in SCATTER frames (protocol 2).
        """
        index = 0
        for i, (vol, rd, part) in enumerate(zip(self.volumes, self.member_readers(reader),
                                                self.split(owed), strict=True)):
            if self.group:
                yield None, _member_frame(i), 0, 0
            for frame, raw, covered in shipping.cycle_frames(
                    rd, part, cycle, packer, vol.block_size,
                    scatter=scatter and part is not None):
                yield index, frame, raw, covered
                index += 1

    def differences(self, reader, fetch) -> ExtentBitmap:
        """Blocks where the frozen image differs from the target's; fetch(index, start, n)."""
        readers = self.member_readers(reader)
        parts = [shipping.block_differences(rd, vol, lambda s, n, i=i: fetch(i, s, n))
                 for i, (vol, rd) in enumerate(zip(self.volumes, readers, strict=True))]
        return self.join(parts)

    def join(self, parts: list) -> ExtentBitmap:
        if len(parts) == 1:
            return parts[0]
        out = ExtentBitmap(self.nblocks)
        for off, part in zip(self.offsets, parts, strict=True):
            for s, n in part.iter_runs():
                out.set_range(off + s, n)
        return out


class VolumeGroup(SingleVolume):
    """Several volumes of one store, frozen at one instant each cycle."""

    group = True
    resizable = False  # a group's members keep their sizes

    def __init__(self, store, name: str, volumes: list, remote_names: list[str] | None = None,
                 *, remote_name: str | None = None):
        """``remote_names``: each member's name on the target; ``remote_name``: the group's
        mirror name there (default ``name``), which also names its state directory, so a
        group whose members change starts a new mirror instead of misreading the old one."""
        self.name = validate_volume_name(name)
        if not volumes:
            raise UsageError(f"group {name!r} has no volumes")
        order = sorted(range(len(volumes)), key=lambda i: volumes[i].name)
        self.volumes = [volumes[i] for i in order]
        names = remote_names or [v.name for v in volumes]
        self.remote_names = [validate_volume_name(names[i]) for i in order]
        if len({v.name for v in self.volumes}) != len(self.volumes) or len(
                set(self.remote_names)) != len(self.remote_names):
            raise UsageError(f"group {name!r} lists a volume (or a name on the target) twice")
        self.store = store
        self.remote_name = validate_volume_name(remote_name or self.name)
        self.offsets, total = [], 0
        for v in self.volumes:
            self.offsets.append(total)
            total += v.nblocks
        self.nblocks = total
        self.state_dir_name = GROUP_STATE_PREFIX + self.remote_name
        self.volume = _GroupFace(self)

    @property
    def open_overlay(self) -> int:
        return max(v.open_overlay for v in self.volumes)

    def align(self) -> list[str]:
        """Freeze members behind the others until all stand at one overlay; return the
        names of those that were frozen (none: they stood level)."""
        top = self.open_overlay
        moved = []
        for v in self.volumes:
            while v.open_overlay < top:
                v.freeze()
                if v.name not in moved:
                    moved.append(v.name)
        return moved

    def layout(self) -> list[list]:
        return [[v.name, v.nblocks] for v in self.volumes]

    def adopt_layout(self, state) -> list[str]:
        """Lay the state's owed and repair sets out for the members as they are now;
        return the names of members new to it (each owes all its blocks)."""
        path = os.path.join(state.directory, LAYOUT_FILE)
        new = self.layout()
        old = _read_layout(path)
        if old is None or old == new:
            if old is None:
                atomic_write(path, json.dumps(new).encode())
            for name in os.listdir(state.directory):  # a relayout committed, not renamed
                if name.endswith(RELAYOUT_SUFFIX):
                    os.replace(os.path.join(state.directory, name),
                               os.path.join(state.directory, name[: -len(RELAYOUT_SUFFIX)]))
            return []
        kept = {name: off for name, off in _offsets(old).items()
                if [name, dict(old)[name]] in new}
        joining = [name for name, _n in new if name not in kept]
        old_bits = sum(n for _name, n in old)
        for label, rec in state.targets.items():
            rec.in_flight = 0  # its chunks belong to the old members: never resumed
            for kind, fill in (("owed", True), ("repair", False)):
                src = (state._bitmap_path(label) if kind == "owed"
                       else state._repair_path(label))
                if (kind == "owed" and rec.full) or not os.path.exists(src):
                    continue
                try:
                    bm = ExtentBitmap.load(src)
                    if bm.nbits != old_bits:
                        raise UsageError(f"{src} has {bm.nbits} bits, not {old_bits}")
                except (CycleMirrorError, OSError) as exc:
                    log.warning("group %s: %s unreadable (%s); target %s will be compared "
                                "by block hashes", self.name, src, exc, label)
                    rec.untrusted = True
                    continue
                out = ExtentBitmap(self.nblocks)
                for off, (name, n) in zip(self.offsets, new, strict=True):
                    if name in kept:
                        for s, k in bm.iter_runs(kept[name], kept[name] + n):
                            out.set_range(off + s - kept[name], k)
                    elif fill:
                        out.set_range(off, n)
                out.save(src + RELAYOUT_SUFFIX)
        state.save()
        atomic_write(path, json.dumps(new).encode())  # the commit point
        for name in os.listdir(state.directory):
            if name.endswith(RELAYOUT_SUFFIX):
                os.replace(os.path.join(state.directory, name),
                           os.path.join(state.directory, name[: -len(RELAYOUT_SUFFIX)]))
        log.info("group %s: members now %s; owed sets kept for %s; owing all their "
                 "blocks (new): %s", self.name, ", ".join(n for n, _ in new),
                 ", ".join(kept) or "none", ", ".join(joining) or "none")
        return joining

    def freeze(self, sync: bool = True) -> GroupCycle:
        cycles = self.store.freeze_group([v.name for v in self.volumes], sync)
        return GroupCycle(self, [cycles[v.name] for v in self.volumes])

    def frozen(self, k: int) -> GroupCycle:
        return GroupCycle(self, [v.frozen(k) for v in self.volumes])

    def frozen_cycles(self) -> list[int]:
        common = set(self.volumes[0].frozen_cycles())
        for v in self.volumes[1:]:
            common &= set(v.frozen_cycles())
        return sorted(common)

    def merge_through(self, k: int) -> None:
        for v in self.volumes:
            v.merge_through(k)

    @staticmethod
    def member_readers(reader) -> list:
        return reader.readers

    def split(self, owed: ExtentBitmap | None) -> list:
        if owed is None:
            return [None] * len(self.volumes)
        parts = []
        for off, v in zip(self.offsets, self.volumes, strict=True):
            part = ExtentBitmap(v.nblocks)
            for s, n in owed.iter_runs(off, off + v.nblocks):
                part.set_range(s - off, n)
            parts.append(part)
        return parts


def _read_layout(path: str) -> list | None:
    try:
        with open(path, "rb") as fh:
            value = json.loads(fh.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("group layout %s unreadable (%s); written anew", path, exc)
        return None
    if not isinstance(value, list) or not all(
            isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)
            and type(x[1]) is int and x[1] > 0 for x in value):
        log.warning("group layout %s malformed; written anew", path)
        return None
    return value


def _offsets(layout: list) -> dict[str, int]:
    out, total = {}, 0
    for name, n in layout:
        out[name] = total
        total += n
    return out


class _GroupFace:
    """What the driver and daemon read from ``driver.volume``: name and sizes of the group."""

    def __init__(self, group: VolumeGroup):
        self.name = group.name
        self.nblocks = group.nblocks
        self.size = sum(v.size for v in group.volumes)
        self.block_size = min(v.block_size for v in group.volumes)
        self._group = group

    @property
    def open_overlay(self) -> int:
        return self._group.open_overlay


class GroupCycle:
    """Cycle ``number`` of every member, frozen at the one instant ``freeze_time``."""

    def __init__(self, group: VolumeGroup, members: list):
        self.group = group
        self.members = members
        self.number = members[0].number
        self.freeze_time = members[0].freeze_time
        if any(m.number != self.number or m.freeze_time != self.freeze_time for m in members):
            raise UsageError(
                f"group {group.name!r}: members stand at cycles "
                f"{[(m.volume.name, m.number, m.freeze_time) for m in members]}, not one freeze")
        parts = [m.dirty for m in members]
        self.dirty = None if any(p is None for p in parts) else group.join(parts)
        zparts = [m.zeroed for m in members]
        self.zeroed = None if any(p is None for p in zparts) else group.join(zparts)

    @property
    def synced(self) -> bool:
        return all(m.synced for m in self.members)

    def sync(self) -> None:
        for m in self.members:
            m.sync()

    def reader(self) -> GroupReader:
        return GroupReader(self)

    def __repr__(self) -> str:
        return f"GroupCycle({self.group.name!r}, number={self.number})"


class GroupReader:
    """Every member's FrozenReader, opened and closed together. ``readers`` in member order."""

    def __init__(self, cycle: GroupCycle):
        self.cycle = cycle
        self._stack: contextlib.ExitStack | None = None
        self.readers: list = []

    def __enter__(self) -> GroupReader:
        stack = contextlib.ExitStack()
        try:
            self.readers = [stack.enter_context(m.reader()) for m in self.cycle.members]
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @property
    def members(self) -> dict:
        """{volume name: FrozenReader}."""
        return {m.volume.name: r for m, r in zip(self.cycle.members, self.readers, strict=True)}

    def extents(self, blocks, max_run_blocks: int) -> Iterator[tuple[int, int, str, int]]:
        """Every member's extents in turn (offsets are each member's own; for sizing a cycle)."""
        group = self.cycle.group
        for rd, part in zip(self.readers, group.split(blocks), strict=True):
            yield from rd.extents(part, max_run_blocks)
