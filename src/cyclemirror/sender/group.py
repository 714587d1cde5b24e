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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from cyclemirror._cext import frames
from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import UsageError
from cyclemirror.sender import shipping
from cyclemirror.store.names import validate_volume_name
from cyclemirror.wire import messages

GROUP_STATE_PREFIX = ".group-"  # outgoing/.group-NAME: never a volume name (those start alnum)


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
        self.nblocks = volume.nblocks
        self.offsets = [0]
        self.state_dir_name = volume.name

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

    def align(self) -> bool:
        return False

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

    def align(self) -> bool:
        """Freeze members behind the others until all stand at one overlay; True if any did."""
        top = self.open_overlay
        moved = False
        for v in self.volumes:
            while v.open_overlay < top:
                v.freeze()
                moved = True
        return moved

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
