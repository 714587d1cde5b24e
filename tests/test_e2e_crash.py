"""Crash trials of the whole product: kill -9 of the source or the target daemon while a
workload writes and cycles repeat, then check the two invariants from outside.

The workload writes generations sequentially: generation g stamps every block
of the volume in order with (g, block index), one flushed write per block.  So
the volume at any instant, and therefore at any freeze instant, is a prefix
pattern: blocks [0, k) carry generation g+1 and blocks [k, n) generation g.

* Remote consistency: after any crash and the target's restart (recovery), with
  no source connected, the mirror image must be such a pattern.  A torn or
  half-applied delta would show blocks of a newer generation after older ones,
  or generations two apart.
* Nothing acknowledged is lost: after the source daemon's kill -9 and restart,
  every block the workload saw acknowledged carries at least that generation.

Default: 3 rounds; CYCLEMIRROR_SLOW=1: 20 rounds.
"""

import random
import struct
import threading
import time

import pytest

from cyclemirror.daemon.nbd_client import NbdClient
from cyclemirror.errors import CycleMirrorError
from tests.support.daemons import DaemonPool, make_key
from tests.support.tools import SLOW

BLOCK = 4096
NBLOCKS = 128  # a 512 KiB volume: many generations per second
ROUNDS = 20 if SLOW else 3


def stamp(gen: int, index: int) -> bytes:
    return struct.pack("<QQ", gen, index) * (BLOCK // 16)


def read_pattern(data: bytes) -> list[int]:
    gens = []
    for i in range(NBLOCKS):
        block = data[i * BLOCK:(i + 1) * BLOCK]
        if block == bytes(BLOCK):
            gens.append(0)
            continue
        gen, index = struct.unpack_from("<QQ", block)
        assert block == stamp(gen, index), f"block {i} is torn inside itself"
        assert index == i, f"block {i} carries the stamp of block {index}"
        gens.append(gen)
    return gens


def assert_prefix_pattern(gens: list[int], what: str) -> None:
    switches = [i for i in range(1, len(gens)) if gens[i] != gens[i - 1]]
    ok = (len(switches) <= 1 and all(gens[i] == gens[i - 1] - 1 for i in switches))
    assert ok, f"{what} is not the volume at one instant: generations {gens}"


class Writer(threading.Thread):
    """Writes generations over NBD until stopped or the source dies; records acks."""

    def __init__(self, sock: str, start_gen: int, start_index: int, acked: list[int]):
        super().__init__(daemon=True)
        self.sock = sock
        self.gen, self.index = start_gen, start_index
        self.acked = acked  # generation acknowledged per block
        self.stop = threading.Event()

    def run(self):
        try:
            with NbdClient("v", unix_path=self.sock) as nbd:
                while not self.stop.is_set():
                    nbd.write(self.index * BLOCK, stamp(self.gen, self.index), fua=True)
                    self.acked[self.index] = self.gen
                    self.index += 1
                    if self.index == NBLOCKS:
                        self.gen, self.index = self.gen + 1, 0
        except CycleMirrorError:
            pass  # the source was killed under us: expected


@pytest.fixture
def daemons(tmp_path):
    with DaemonPool(tmp_path) as pool:
        yield pool


def test_kill_9_of_either_daemon_never_shows_a_torn_image_nor_loses_acked_writes(
        daemons, tmp_path):
    import socket as socketlib

    rng = random.Random(7)
    key = make_key(tmp_path / "mirror.key")
    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = daemons.start("b", key_file=key, nbd=False, metrics=False,
                      extra=("--listen", f"127.0.0.1:{port}"))
    a = daemons.start("a", key_file=key, metrics=False)
    a.cli("volume", "create", "v", "--size", str(NBLOCKS * BLOCK))
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "0.05", "--compress", "none")
    try:
        run_rounds(a, b, rng)
    except AssertionError as exc:  # keep the evidence: both daemons' logs
        raise AssertionError(f"{exc}\n--- source log ---\n{a.log()[-6000:]}\n"
                             f"--- target log ---\n{b.log()[-6000:]}") from None


def run_rounds(a, b, rng):
    acked = [0] * NBLOCKS
    gen, index = 1, 0
    images_checked = 0
    for round_no in range(ROUNDS):
        writer = Writer(a.nbd_sock, gen, index, acked)
        writer.start()
        time.sleep(rng.uniform(0.2, 0.8))
        victim = rng.choice(["source", "target"])
        if victim == "source":
            a.kill()
            writer.join(10)
            a.start()
            with NbdClient("v", unix_path=a.nbd_sock) as nbd:
                after = read_pattern(nbd.read(0, NBLOCKS * BLOCK))
            lost = [i for i in range(NBLOCKS) if after[i] < acked[i]]
            assert not lost, f"round {round_no}: acknowledged writes lost in blocks {lost}"
        else:
            b.kill()
            time.sleep(rng.uniform(0.0, 0.3))  # the source retries against a dead port
            b.start()
            writer.stop.set()
            writer.join(10)
        gen, index = writer.gen, writer.index
        # Inspect the image with nothing applying: source stopped, target recovered.
        a.kill()
        b.kill()
        b.start()
        row = [m for m in b.status()["incoming"] if m["volume"] == "v"]
        if row and row[0]["applied_cycle"] > 0:
            with open(row[0]["image"], "rb") as fh:
                assert_prefix_pattern(read_pattern(fh.read()),
                                      f"round {round_no}: mirror image after a {victim} kill")
            images_checked += 1
        a.start()
    assert images_checked >= 1, "no round had an applied image to inspect"
    a.cli("mirror", "sync", "v", "--timeout", "60")
    a.cli("mirror", "break", "v")
    with NbdClient("v", unix_path=a.nbd_sock) as nbd:
        source = nbd.read(0, NBLOCKS * BLOCK)
    row = [m for m in b.status()["incoming"] if m["volume"] == "v"][0]
    with open(row["image"], "rb") as fh:
        assert fh.read() == source


def test_the_pattern_checker_rejects_torn_images():
    assert_prefix_pattern([3, 3, 2, 2], "ok")
    assert_prefix_pattern([0] * 4, "ok")
    for bad in ([2, 3, 3, 3], [3, 2, 3, 2], [4, 2, 2, 2]):
        with pytest.raises(AssertionError):
            assert_prefix_pattern(bad, "bad")
    torn = bytearray(stamp(5, 1))
    torn[100] ^= 1
    with pytest.raises(AssertionError, match="torn"):
        read_pattern(stamp(5, 0) + bytes(torn) + bytes(BLOCK * (NBLOCKS - 2)))
