"""Golden tests of the target's on-disk formats: the mirror journal and the staging log.

The files under tests/golden/ are the bytes a target of this format version
writes for the states and records built below.  Proves: the writer produces
exactly those bytes for the same state (``to_bytes`` and ``save``; the
staging writer record by record), and the reader reads the checked-in bytes
back to exactly the same state and records.  A change that fails here changes
what is on users' disks: it needs a new format version that still reads the
old files, and new golden files beside these, never an edit of them.
"""

import json
import os
import struct

import xxhash

from cyclemirror.receiver.staging import (
    REC_DATA,
    REC_SCATTER,
    REC_TRIM,
    REC_ZERO,
    StagingWriter,
    read_records,
)
from cyclemirror.receiver.state import STATE_VERSION, InFlight, MirrorState, VolumeSpec
from tests.support.reference.frames_ref import scatter_payload

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def golden(name: str) -> bytes:
    with open(os.path.join(GOLDEN, name), "rb") as f:
        return f.read()


# A single-volume mirror with a delta being received (resumable).
SINGLE = MirrorState(
    mirror="db", group=False, source_node="3f2a9c1e0b7d4a65", source_name="src-host",
    volumes=[VolumeSpec("db", 64 << 20, 4096)], applied_cycle=41, freeze_time=1700000000.25,
    pending=InFlight(cycle=42, freeze_time=1700000030.5, full=False, chunks=17,
                     staged_bytes=5 << 20))
# A consistency group with a committed delta that recovery must finish, and extra keys.
GROUP = MirrorState(
    mirror="pair-0123abcd", group=True, source_node="3f2a9c1e0b7d4a65", source_name=None,
    volumes=[VolumeSpec("log", 8 << 20, 512), VolumeSpec("data", 1 << 30, 65536)],
    applied_cycle=7, freeze_time=1699999999.0,
    committed=InFlight(cycle=8, freeze_time=1700000060.0, full=True, chunks=1024,
                       staged_bytes=1 << 30),
    extra={"note": "kept as is"})
# Version 1 files (before pipelining) are still read: their deltas have no staging name.
V1_CASES = [(SINGLE, "receiver-v1.state.json"), (GROUP, "receiver-v1.group.json")]
# Version 2: the next cycle is received while the committed one applies, each delta
# with its own staging log.
SINGLE_V2 = MirrorState(
    mirror="db", group=False, source_node="3f2a9c1e0b7d4a65", source_name="src-host",
    volumes=[VolumeSpec("db", 64 << 20, 4096)], applied_cycle=41, freeze_time=1700000000.25,
    committed=InFlight(cycle=42, freeze_time=1700000030.5, full=False, chunks=9,
                       staged_bytes=3 << 20, staging="db.staging.42"),
    pending=InFlight(cycle=43, freeze_time=1700000031.0, full=False, chunks=2,
                     staged_bytes=1 << 20, staging="db.staging.43"))
CASES = [(SINGLE_V2, "receiver-v2.state.json"), (GROUP, "receiver-v2.group.json")]

# DATA (member 1), ZERO, TRIM, DATA of 4 KiB: every record kind, and data of two sizes.
RECORDS = [(REC_DATA, 1, 8192, 5, b"hello"), (REC_ZERO, 0, 1 << 20, 65536, None),
           (REC_TRIM, 1, 0, 4096, None), (REC_DATA, 0, 12288, 4096, bytes(range(256)) * 16)]


def test_state_version_is_the_one_the_golden_files_pin():
    assert STATE_VERSION == 2


def test_mirror_state_writes_exactly_the_golden_bytes(tmp_path):
    for state, name in CASES:
        assert state.to_bytes() == golden(name), name
        path = tmp_path / name
        state.save(path)
        assert path.read_bytes() == golden(name), name


def test_mirror_state_reads_the_golden_bytes_back_exactly():
    for state, name in CASES + V1_CASES:
        assert MirrorState.from_bytes(golden(name), name) == state
        assert MirrorState.load(os.path.join(GOLDEN, name)) == state


def test_the_golden_journal_carries_its_version_and_a_checksum_of_its_body():
    for _state, name in CASES + V1_CASES:
        outer = json.loads(golden(name))
        assert sorted(outer) == ["body", "xxh64"]
        assert outer["body"]["version"] == int(name.split("-v")[1][0])
        text = json.dumps(outer["body"], sort_keys=True, separators=(",", ":"))
        assert xxhash.xxh64_hexdigest(text.encode()) == outer["xxh64"]


def test_staging_writer_writes_exactly_the_golden_bytes(tmp_path):
    path = str(tmp_path / "m.staging")
    w = StagingWriter(path, 0)
    for kind, member, offset, length, data in RECORDS:
        w.append(kind, member, offset, length, data)
    w.sync()
    w.close()
    assert open(path, "rb").read() == golden("receiver-v1.staging")


def test_staging_log_reads_the_golden_bytes_back_exactly():
    raw = golden("receiver-v1.staging")
    # Layout by hand (docs: receiver/staging.py): the first record's 32-byte header.
    assert raw[:32] == b"CMSR" + struct.pack(">BBHQQQ", REC_DATA, 0, 1, 8192, 5,
                                             xxhash.xxh3_64_intdigest(b"hello"))
    path = os.path.join(GOLDEN, "receiver-v1.staging")
    got = list(read_records(path, len(raw), 1 << 20))
    assert got == [(k, m, o, n, d) for k, m, o, n, d in RECORDS]


# Version 2 logs add SCATTER records (a SCATTER frame's raw payload as it arrived).
SCATTER_RAW = scatter_payload([(4096, 4096), (16384, 8192)], bytes(range(256)) * 48)
RECORDS_V2 = RECORDS + [(REC_SCATTER, 0, 4096, len(SCATTER_RAW), SCATTER_RAW)]


def test_staging_writer_writes_exactly_the_golden_bytes_with_scatter_records(tmp_path):
    path = str(tmp_path / "m.staging.43")
    w = StagingWriter(path, 0)
    w.append_batch([(k, m, o, n, d, None) for k, m, o, n, d in RECORDS_V2])
    w.sync()
    w.close()
    assert open(path, "rb").read() == golden("receiver-v2.staging")
    got = list(read_records(os.path.join(GOLDEN, "receiver-v2.staging"),
                            len(golden("receiver-v2.staging")), 1 << 20))
    assert got == [(k, m, o, n, d) for k, m, o, n, d in RECORDS_V2]
