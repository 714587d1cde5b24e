"""A real target daemon exports its mirror images read-only over NBD, read by real clients
while the source keeps writing and cycles keep applying.

The source is an in-process store and driver, so the test knows every cycle's
frozen image (a sha256 taken by the driver's ``on_frozen`` hook) and can
check that whatever a client reads equals the source at one freeze instant,
never a mix.  The target is a ``cyclemirror serve`` subprocess with
``--listen`` and ``--nbd``.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest

from cyclemirror import keys
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from tests.support import nbd_badclient as bad
from tests.support import nbd_rawclient as C
from tests.support.daemons import Daemon, make_key
from tests.support.mirror import wait_for
from tests.support.nbd import run
from tests.support.tools import require_tool

MiB = 1 << 20
SIZE = 4 * MiB
EXPORT = "mirror/srcnode/v1"


class Source:
    """An in-process source volume mirrored every 50 ms, with a writer thread on it."""

    def __init__(self, root: str, target_listen: str, key_file: str):
        host, port = target_listen.rsplit(":", 1)
        self.store = Store.create(os.path.join(root, "src"), node_name="srcnode")
        self.vol = self.store.create_volume("v1", SIZE)
        self.digests: dict[int, str] = {}
        self.applied: list[int] = []
        self._cond = threading.Condition()
        self.driver = MirrorDriver(
            self.vol, (host, int(port)), keys.read_key_file(key_file),
            MirrorOptions(interval=0.05, on_frozen=self._frozen, on_applied=self._applied),
            store=self.store)
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.writer_error: BaseException | None = None

    def _frozen(self, frozen, reader) -> None:
        digest = hashlib.sha256(reader.read(0, SIZE)).hexdigest()
        with self._cond:
            self.digests[frozen.number] = digest

    def _applied(self, cycle, label, stats) -> None:
        with self._cond:
            self.applied.append(cycle)
            self._cond.notify_all()

    def last_applied(self) -> int:
        with self._cond:
            return self.applied[-1] if self.applied else 0

    def cycle_of(self, data: bytes) -> int | None:
        digest = hashlib.sha256(data).hexdigest()
        with self._cond:
            found = [c for c, d in self.digests.items() if d == digest]
        return max(found) if found else None

    def start(self) -> None:
        self.driver.start()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._writer.start()

    def _write(self) -> None:
        rng = random.Random(5)
        try:
            while not self._stop.is_set():
                block = rng.randrange(SIZE // 4096)
                count = min(rng.choice((1, 3, 16)), SIZE // 4096 - block)
                if rng.random() < 0.1:
                    self.vol.trim(block * 4096, count * 4096)
                else:
                    self.vol.write(block * 4096, rng.randbytes(count * 4096))
                time.sleep(0.001)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.writer_error = exc

    def quiesce(self) -> int:
        self._stop.set()
        if self._writer is not None:
            self._writer.join(10)
        assert self.writer_error is None, self.writer_error
        return self.driver.sync(60)

    def close(self) -> None:
        self._stop.set()
        self.driver.stop()
        self.store.close()


@pytest.fixture
def rig(tmp_path):
    key_file = make_key(tmp_path / "mirror.key")
    target = Daemon(tmp_path, "dst", key_file=key_file, listen=True, metrics=False).start()
    source = Source(str(tmp_path), target.listen, key_file)
    try:
        source.start()
        wait_for(lambda: source.last_applied() >= 2, 60, "the first cycles to apply")
        yield source, target
    finally:
        source.close()
        target.stop()


def _uri(target: Daemon, name: str = EXPORT) -> str:
    return f"nbd+unix:///{name}?socket={target.nbd_sock}"


def _image_fds(target: Daemon) -> list[str]:
    """What the target process holds open under its mirrors directory (from /proc)."""
    fd_dir = f"/proc/{target.proc.pid}/fd"
    out = []
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue  # closed meanwhile
        if os.sep + "mirrors" + os.sep in link and ".img" in link:
            out.append(link)
    return out


def test_mirror_images_are_listed_beside_volumes_and_refuse_writes(rig):
    source, target = rig
    require_tool("nbdinfo")
    target.cli("volume", "create", "v1", "--size", "1M")  # same name as the mirrored volume
    listed = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={target.nbd_sock}").stdout
    assert f'"{EXPORT}"' in listed.decode() and '"v1"' in listed.decode()
    info = run("nbdinfo", "--json", _uri(target)).stdout.decode()
    assert '"is_read_only": true' in info and f'"export-size": {SIZE}' in info
    assert '"can_multi_conn": false' in info  # connections may pin different cycles
    node_id = source.store.node_id
    assert run("nbdinfo", "--size", _uri(target, f"mirror/{node_id}/v1")).stdout.strip() == \
        str(SIZE).encode()
    assert run("nbdinfo", "--size", _uri(target, "v1")).stdout.strip() == str(MiB).encode()
    missing = run("nbdinfo", "--size", _uri(target, "mirror/srcnode/nope"), check=False)
    assert missing.returncode != 0
    errors, _data = bad.writes_to_read_only_export(target.nbd_sock, EXPORT)
    assert errors == [C.EPERM, C.EPERM, C.EPERM]
    require_tool("qemu-io")
    out = run("qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", _uri(target), check=False)
    assert out.returncode != 0 or b"failed" in out.stdout + out.stderr, out


def test_a_connection_reads_one_cycle_while_several_newer_ones_apply(rig):
    source, target = rig
    require_tool("nbdcopy")
    sock = C.connect_unix(target.nbd_sock)
    try:
        C.open_export(sock, EXPORT, structured=True, allocation=False)
        opened_at = source.last_applied()
        reader = C.ReplyReader(sock, True)
        chunks = []

        def read_range(start: int, end: int) -> None:
            for handle, off in enumerate(range(start, end, 256 << 10), start=start // 4096 + 1):
                reader.expect_read(handle, off, 256 << 10)
                sock.sendall(C.request(C.CMD_READ, off, 256 << 10, handle=handle))
                reply = reader.next()
                assert reply.error == 0
                chunks.append(reply.data)

        read_range(0, SIZE // 2)
        wait_for(lambda: source.last_applied() >= opened_at + 3, 60,
                 "three more cycles to apply while the reader is connected")
        held_files = _image_fds(target)
        read_range(SIZE // 2, SIZE)
        sock.sendall(C.request(C.CMD_DISC))
    finally:
        sock.close()
    cycle = source.cycle_of(b"".join(chunks))
    assert cycle is not None, "the reader saw an image that matches no freeze instant"
    assert cycle <= opened_at + 1  # pinned at connection time, not a later cycle
    # The target renamed a clone over the image; this reader still held the old file.
    assert any(link.endswith("(deleted)") for link in held_files), held_files
    wait_for(lambda: not _image_fds(target), 10, "the target to close the reader's image")
    later = run("nbdcopy", _uri(target), "-").stdout  # a new connection: a newer cycle
    assert (source.cycle_of(later) or 0) > cycle


def test_real_clients_copy_consistent_images_while_cycles_apply(rig, tmp_path):
    source, target = rig
    require_tool("nbdcopy")
    require_tool("qemu-img")
    copy = tmp_path / "copy.raw"
    overlapped = 0
    seen = set()
    for _ in range(8):
        before = source.last_applied()
        if copy.exists():
            copy.unlink()
        run("nbdcopy", _uri(target), str(copy))
        overlapped += source.last_applied() > before
        cycle = source.cycle_of(copy.read_bytes())
        assert cycle is not None, "nbdcopy got an image that matches no freeze instant"
        seen.add(cycle)
    assert len(seen) > 1, "cycles did not advance between copies"
    assert overlapped, "no cycle was applied while a copy ran; the test proved nothing"
    final = source.quiesce()
    export = tmp_path / "source-export.raw"
    source.vol.export(str(export))
    compare = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(export), _uri(target),
                  check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert hashlib.sha256(export.read_bytes()).hexdigest() == source.digests[final]


def test_probes_and_sessions_leave_no_image_open_on_the_target(rig):
    _source, target = rig
    require_tool("nbdinfo")
    for _ in range(10):
        run("nbdinfo", "--map", _uri(target))
        run("nbdinfo", "--list", f"nbd+unix://?socket={target.nbd_sock}")
    held = C.connect_unix(target.nbd_sock)
    try:
        C.open_export(held, EXPORT)
        wait_for(lambda: len(_image_fds(target)) == 1, 10, "exactly the held session's image")
    finally:
        held.close()
    wait_for(lambda: not _image_fds(target), 10, "the target to close every image")
    assert "Traceback" not in target.log()


def test_export_of_a_mirror_whose_target_is_not_listening_still_serves_it(tmp_path):
    """After failover the target daemon may run without --listen: images stay readable."""
    require_tool("nbdinfo")
    require_tool("nbdcopy")
    key_file = make_key(tmp_path / "k")
    target = Daemon(tmp_path, "dst", key_file=key_file, listen=True, metrics=False).start()
    source = Source(str(tmp_path), target.listen, key_file)
    try:
        source.start()
        wait_for(lambda: source.last_applied() >= 2, 60, "cycles to apply")
        final = source.quiesce()
    finally:
        source.close()
        target.stop()
    again = Daemon(tmp_path, "dst", metrics=False).start()
    try:
        data = run("nbdcopy", _uri(again), "-").stdout
        assert hashlib.sha256(data).hexdigest() == source.digests[final]
        assert EXPORT.encode() in run("nbdinfo", "--list",
                                      f"nbd+unix://?socket={again.nbd_sock}").stdout
    finally:
        again.stop()
