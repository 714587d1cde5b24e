"""A store Volume exported over NBD keeps taking writes while it freezes and merges underneath.

Several qemu-io processes write patterns at odd offsets and lengths, round
after round, while another thread freezes the volume, reads the frozen image
and merges the previous overlay, again and again.  Every frozen image must
hold whole writes only (each region is one pattern, and within one writer the
regions show a single cut through its write order), and at the end every
pattern reads back through NBD and from the store.
"""

from __future__ import annotations

import threading
import time

import pytest

from cyclemirror.nbd import NbdServer, VolumeBackend
from cyclemirror.store import Store
from tests.support.nbd import run, run_under_freezer
from tests.support.tools import SLOW, require_tool

MiB = 1 << 20
WRITERS = 4
REGION_SPAN = 4 * MiB
REGIONS = [(1, 4095), (5000, 70001), (200_003, 1), (300_000, 513), (700_001, 1_048_577),
           (2_000_000, 300_007)]


def pattern(writer: int, round_: int) -> int:
    return 1 + writer * 60 + round_  # rounds stay below 60: the byte names writer and round


def decode_round(writer: int, byte: int) -> int:
    return 0 if byte == 0 else byte - 1 - writer * 60


@pytest.fixture
def store(tmp_path):
    s = Store.create(str(tmp_path / "store"))
    yield s
    s.close()


def check_frozen_image(image: bytes) -> None:
    """Whole writes only: uniform regions, and one cut through each writer's write order."""
    for w in range(WRITERS):
        rounds = []
        for off, length in REGIONS:
            start = w * REGION_SPAN + off
            region = image[start:start + length]
            assert region == bytes([region[0]]) * length, f"torn write: writer {w} region {off}"
            r = decode_round(w, region[0])
            assert 0 <= r < 60, f"foreign byte {region[0]} in writer {w}'s region"
            rounds.append(r)
        # regions are written in order each round: a prefix of round R, the rest R-1
        top = rounds[0]
        cut = next((i for i, r in enumerate(rounds) if r != top), len(rounds))
        assert all(r == top - 1 for r in rounds[cut:]), f"writer {w}: rounds {rounds} are no cut"


def test_writes_keep_working_through_repeated_freezes_and_merges(store, tmp_path):
    require_tool("qemu-io")
    vol = store.create_volume("vol", WRITERS * REGION_SPAN)
    server = NbdServer(lambda n: VolumeBackend(store.open_volume(n)) if n in store.list_volumes() else None,
                       list_names=store.list_volumes, unix_path=str(tmp_path / "nbd.sock"))
    server.start()
    rounds = 50 if SLOW else 10
    errors: list[BaseException] = []
    writers_done = threading.Event()
    freezes = []

    def writer(w: int) -> None:
        try:
            for r in range(1, rounds + 1):
                cmds = []
                for off, length in REGIONS:
                    cmds += ["-c", f"write -P {pattern(w, r)} {w * REGION_SPAN + off} {length}"]
                run("qemu-io", "-f", "raw", *cmds, "-c", "flush", server.uri("vol"))
        except BaseException as exc:
            errors.append(exc)

    def freezer() -> None:
        try:
            while not writers_done.is_set():
                cycle = vol.freeze()
                with cycle.reader() as reader:
                    check_frozen_image(reader.read(0, vol.size))
                vol.merge_through(cycle.number - 1)
                freezes.append(cycle.number)
                time.sleep(0.02)
        except BaseException as exc:
            errors.append(exc)

    try:
        run_under_freezer([threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)],
                          threading.Thread(target=freezer), writers_done, errors)
        assert len(freezes) >= 3, f"only {len(freezes)} freezes happened during the writes"
        # every last pattern, read back through NBD by a fresh client
        cmds = []
        for w in range(WRITERS):
            for off, length in REGIONS:
                cmds += ["-c", f"read -P {pattern(w, rounds)} {w * REGION_SPAN + off} {length}"]
        run("qemu-io", "-f", "raw", "-r", *cmds, server.uri("vol"))
        # and from the store itself, after one more freeze and merge
        cycle = vol.freeze()
        vol.merge_through(cycle.number - 1)
        image = vol.read(0, vol.size)
        expected = bytearray(vol.size)
        for w in range(WRITERS):
            for off, length in REGIONS:
                start = w * REGION_SPAN + off
                expected[start:start + length] = bytes([pattern(w, rounds)]) * length
        assert image == bytes(expected)
    finally:
        server.stop()


def test_volume_export_reports_zeroes_from_the_store_and_trims_read_back_as_zeroes(store, tmp_path):
    require_tool("qemu-io")
    require_tool("nbdinfo")
    vol = store.create_volume("vol", 8 * MiB)
    # a plain Volume from lookup is served too (wrapped by the server)
    with NbdServer(lambda n: store.open_volume(n) if n == "vol" else None,
                   unix_path=str(tmp_path / "nbd.sock")) as server:
        uri = server.uri("vol")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 8M", "-c", "flush", uri)
        vol.freeze()
        run("qemu-io", "-f", "raw", "-c", "discard 1M 1M", "-c", "write -z 3M 1M", uri)
        run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 1M 1M", "-c", "read -P 0 3M 1M",
            "-c", "read -P 0x33 0 1M", "-c", "read -P 0x33 2M 1M", "-c", "read -P 0x33 4M 4M", uri)
        out = run("nbdinfo", "--map", uri).stdout.decode()
        zero_lines = [line.split() for line in out.splitlines() if "zero" in line]
        assert ["1048576", "1048576", "3", "hole,zero"] in zero_lines, out
        assert ["3145728", "1048576", "3", "hole,zero"] in zero_lines, out
        assert vol.read(MiB, MiB) == bytes(MiB)
