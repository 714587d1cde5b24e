"""The parts behind the read-only export of mirror images, in one process:

* the NBD server releases every per-connection backend a lookup made, exactly
  once: probes (INFO, meta contexts, LIST by nbdinfo) at once, a served
  export when its session ends;
* a target applying delta cycles clones the image while a reader holds a pin
  (the reader's file never changes) and applies in place when nobody does;
* a reader never gets an image whose committed cycle a crash left unapplied.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cyclemirror import keys
from cyclemirror.errors import StoreError
from cyclemirror.nbd import NbdServer, RawFileBackend
from cyclemirror.receiver import TargetServer
from cyclemirror.receiver.readers import IMAGE_PINS, PinnedImage, mirror_images
from cyclemirror.receiver.state import InFlight, MirrorState
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from tests.support import nbd_rawclient as C
from tests.support.mirror import wait_for
from tests.support.nbd import run
from tests.support.tools import require_tool

MiB = 1 << 20


class CountingLookup:
    """Hands out a fresh per-connection RawFileBackend per lookup and counts releases."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.opened = 0
        self.released = 0

    def _released(self) -> None:
        with self.lock:
            self.released += 1

    def __call__(self, name: str):
        if name != "img":
            return None
        with self.lock:
            self.opened += 1
        return RawFileBackend(self.path, per_connection=True, on_release=self._released)

    def outstanding(self) -> int:
        with self.lock:
            return self.opened - self.released


@pytest.fixture
def counted(tmp_path):
    path = tmp_path / "img.raw"
    path.write_bytes(os.urandom(64 << 10) + bytes(1 * MiB - (64 << 10)))
    lookup = CountingLookup(str(path))
    srv = NbdServer(lookup, list_names=lambda: ["img"], unix_path=str(tmp_path / "nbd.sock"))
    with srv:
        yield srv, lookup


def test_every_per_connection_backend_is_released_once(counted):
    srv, lookup = counted
    require_tool("nbdinfo")
    for _ in range(5):
        run("nbdinfo", srv.uri("img"))          # meta context probes, then GO
        run("nbdinfo", "--list", f"nbd+unix://?socket={srv.unix_path}")  # LIST, INFO/GO each
        run("nbdinfo", "--map", srv.uri("img"))
    wait_for(lambda: srv.connection_count() == 0, 10, "every connection to end")
    assert lookup.opened >= 15
    assert lookup.outstanding() == 0


def test_a_served_backend_is_held_until_its_session_ends_and_probes_are_not(counted):
    srv, lookup = counted
    sock = C.connect_unix(srv.unix_path)
    try:
        export = C.open_export(sock, "img")  # SET_META_CONTEXT probes once, GO keeps one
        assert export.size == 1 * MiB
        assert not export.flags & (1 << 8), "a per-connection backend must not offer multi-conn"
        assert lookup.opened == 2 and lookup.outstanding() == 1
        reader = C.ReplyReader(sock, True)
        reader.expect_read(7, 0, 4096)
        sock.sendall(C.request(C.CMD_READ, 0, 4096, handle=7))
        assert reader.next().error == 0
        sock.sendall(C.request(C.CMD_DISC))
    finally:
        sock.close()
    wait_for(lambda: lookup.outstanding() == 0, 10, "the session's backend to be released")
    assert lookup.released == 2


def test_a_session_cut_by_the_client_or_by_stop_releases_its_backend(tmp_path):
    path = tmp_path / "img.raw"
    path.write_bytes(bytes(MiB))
    lookup = CountingLookup(str(path))
    srv = NbdServer(lookup, unix_path=str(tmp_path / "nbd.sock")).start()
    try:
        cut = C.connect_unix(srv.unix_path)
        C.open_export(cut, "img", structured=False)
        cut.shutdown(socket.SHUT_RDWR)  # no DISC: the connection just ends
        cut.close()
        held = C.connect_unix(srv.unix_path)
        C.open_export(held, "img", structured=False)
        wait_for(lambda: lookup.outstanding() == 1, 10, "the cut session's release")
    finally:
        srv.stop(grace=2)
    held.close()
    assert lookup.outstanding() == 0


# -- the target: clone while pinned, in place otherwise ---------------------------------


@pytest.fixture
def mirrored(tmp_path):
    key = keys.generate_key()
    dst = Store.create(str(tmp_path / "dst"), node_name="dst")
    target = TargetServer(dst, key)
    target.start()
    src = Store.create(str(tmp_path / "src"), node_name="src")
    vol = src.create_volume("v1", 2 * MiB)
    digests: dict[int, str] = {}

    def on_frozen(frozen, reader):
        digests[frozen.number] = hashlib.sha256(reader.read(0, vol.size)).hexdigest()

    driver = MirrorDriver(vol, target.address, key, MirrorOptions(interval=3600,
                          on_frozen=on_frozen), store=src)
    driver.start()
    try:
        yield dst, vol, driver, digests
    finally:
        driver.stop()
        target.stop()
        src.close()
        dst.close()


def _sha(fd: int, size: int) -> str:
    return hashlib.sha256(os.pread(fd, size, 0)).hexdigest()


def test_a_pinned_reader_keeps_its_cycle_while_deltas_apply_into_a_clone(mirrored):
    dst, vol, driver, digests = mirrored
    vol.write(0, os.urandom(256 << 10))
    first = driver.sync(60)
    (image,) = mirror_images(dst.path)
    pin = PinnedImage(image)
    fd = os.open(image.image_path, os.O_RDONLY)
    try:
        inode = os.fstat(fd).st_ino
        assert _sha(fd, vol.size) == digests[first]
        clones = IMAGE_PINS.clones
        for i in range(3):
            vol.write((i + 1) * (128 << 10), os.urandom(64 << 10))
            vol.trim(0, 64 << 10)
            last = driver.sync(60)
        assert IMAGE_PINS.clones == clones + 3
        assert _sha(fd, vol.size) == digests[first], "the pinned reader's image changed"
        assert os.stat(image.image_path).st_ino != inode
        with open(image.image_path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digests[last]
    finally:
        os.close(fd)
        pin.release()
    assert IMAGE_PINS.pinned(image.state_path) == 0
    inode = os.stat(image.image_path).st_ino
    vol.write(MiB, os.urandom(4096))
    last = driver.sync(60)
    assert os.stat(image.image_path).st_ino == inode, "with no reader, apply is in place"
    with open(image.image_path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digests[last]
    assert not os.path.exists(image.image_path + ".apply")


def test_an_image_with_a_committed_but_unapplied_cycle_is_refused(mirrored):
    dst, vol, driver, _digests = mirrored
    vol.write(0, b"x" * 4096)
    driver.sync(60)
    (image,) = mirror_images(dst.path)
    # 'applied' comes before the image's fsync; the apply then saves the state once
    # more (committed cleared). Edit the state only after that, or it is overwritten.
    wait_for(lambda: MirrorState.load(image.state_path).committed is None, 30,
             "the target to finish the apply")
    st = MirrorState.load(image.state_path)
    st.committed = InFlight(st.applied_cycle + 1, st.freeze_time, False)
    st.save(image.state_path)  # what a crash inside apply leaves behind
    with pytest.raises(StoreError, match="cut by a crash"):
        PinnedImage(image)
    assert IMAGE_PINS.pinned(image.state_path) == 0


# -- naming and the pin bookkeeping ------------------------------------------------------


def _fake_mirror(root, node_id, node_name, mirror, volumes, group=False, applied=1):
    from cyclemirror.receiver.state import VolumeSpec

    ndir = os.path.join(root, "mirrors", node_id)
    os.makedirs(ndir, exist_ok=True)
    st = MirrorState(mirror, group, node_id, node_name,
                     [VolumeSpec(v, MiB, 4096) for v in volumes], applied_cycle=applied)
    st.save(os.path.join(ndir, mirror + (".group.json" if group else ".state.json")))
    for v in volumes:
        with open(os.path.join(ndir, v + ".img"), "wb") as f:
            f.truncate(MiB)


def test_export_names_use_the_node_name_only_where_it_is_unambiguous(tmp_path):
    from cyclemirror.receiver.readers import export_names, listed_export_names

    root = str(tmp_path)
    _fake_mirror(root, "aaaa", "db1", "vol", ["vol"])
    _fake_mirror(root, "bbbb", "twin", "vol", ["vol"])
    _fake_mirror(root, "cccc", "twin", "vol", ["vol"])      # a second node named twin
    _fake_mirror(root, "dddd", None, "g", ["m1", "m2"], group=True)
    _fake_mirror(root, "eeee", "fresh", "vol", ["vol"], applied=0)  # nothing applied yet
    images = mirror_images(root)
    names = export_names(images)
    assert set(names) == {"mirror/aaaa/vol", "mirror/db1/vol", "mirror/bbbb/vol",
                          "mirror/cccc/vol", "mirror/dddd/m1", "mirror/dddd/m2"}
    assert names["mirror/db1/vol"] is names["mirror/aaaa/vol"]
    assert names["mirror/dddd/m2"].image_path.endswith(os.path.join("dddd", "m2.img"))
    assert listed_export_names(images) == ["mirror/bbbb/vol", "mirror/cccc/vol",
                                           "mirror/db1/vol", "mirror/dddd/m1",
                                           "mirror/dddd/m2"]


def test_a_reader_waits_for_an_in_place_apply_and_times_out_naming_why(tmp_path):
    from cyclemirror.errors import DeadlineError
    from cyclemirror.receiver.readers import ImagePins

    pins = ImagePins()
    key = str(tmp_path / "m.state.json")
    with pins.applying(key):
        assert pins.start_in_place(key) is True
        with pytest.raises(DeadlineError, match="retry when the cycle is applied"):
            pins.pin(key, timeout=0.05)
    assert pins.pin(key, timeout=0.05) is False  # the apply ended: no wait, none under way
    with pins.applying(key):
        assert pins.start_in_place(key) is False  # a reader holds it: clone
        assert pins.pin(key, timeout=0.05) is True  # more readers may join a cloned apply
    pins.unpin(key)
    pins.unpin(key)
    with pytest.raises(StoreError, match="unpin without a pin"):
        pins.unpin(key)
    assert pins.pinned(key) == 0 and pins.clones == 1


class PinsMachine(RuleBasedStateMachine):
    """ImagePins against a model: an in-place apply never overlaps a held pin."""

    def __init__(self):
        super().__init__()
        from cyclemirror.receiver.readers import ImagePins

        self.pins = ImagePins()
        self.key = "/nonexistent/mirror.state.json"
        self.stack = contextlib.ExitStack()
        self.model_pins = 0
        self.applies = 0
        self.in_place = False  # an in-place apply was decided and is not over

    @rule()
    def pin(self):
        from cyclemirror.errors import DeadlineError

        if self.in_place:
            with pytest.raises(DeadlineError):
                self.pins.pin(self.key, timeout=0)
        else:
            assert self.pins.pin(self.key, timeout=0) == (self.applies > 0)
            self.model_pins += 1

    @rule()
    def unpin(self):
        if self.model_pins:
            self.pins.unpin(self.key)
            self.model_pins -= 1
        else:
            with pytest.raises(StoreError):
                self.pins.unpin(self.key)

    @rule(recovering=st.booleans())
    def begin_apply(self, recovering):
        self.stack.enter_context(self.pins.applying(self.key, recovering=recovering))
        self.applies += 1
        self.in_place = self.in_place or recovering

    @precondition(lambda self: self.applies)
    @rule()
    def decide(self):
        got = self.pins.start_in_place(self.key)
        assert got == (self.model_pins == 0)
        self.in_place = self.in_place or got

    @precondition(lambda self: self.applies)
    @rule()
    def end_apply(self):
        self.stack.pop_all().close()  # every nested apply of this mirror ends together
        self.applies = 0
        self.in_place = False

    @invariant()
    def agrees_with_the_model(self):
        assert self.pins.pinned(self.key) == self.model_pins

    def teardown(self):
        self.stack.close()


TestPinsMachine = PinsMachine.TestCase
TestPinsMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
