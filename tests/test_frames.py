"""cyclemirror._cext.frames against docs/protocol.md and tests/support/reference/frames_ref.py.

Proves: the header layout is pinned byte for byte (golden); decode_header
agrees with the pure-Python model on random and corrupted headers, naming the
same first bad field; every field made invalid on its own is rejected naming
that field, and every single flipped bit of a header is rejected; payloads
decompress only to exactly raw_length bytes and must match their checksum;
pack_extents yields the same frames as the model (byte for byte uncompressed,
the same offsets, checksums and content when compressed), across internal read pieces and chunk edges;
frame_raw_length (the one reader of a built frame's header outside the module)
agrees with the model.
"""

import os
import struct
import threading

import lz4.block
import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror import errors
from cyclemirror._cext import frames
from tests.support.reference import frames_ref as ref
from tests.support.tools import SLOW

# CYCLEMIRROR_SLOW=1 runs 20 times as many random examples.


def examples(n: int) -> int:
    return n * 20 if SLOW else n


LIMITS = dict(max_payload=1 << 20, max_raw=1 << 20, max_control=1 << 16,
              volume_size=1 << 30, alignment=512)


def limits(**overrides):
    return frames.FrameLimits(**{**LIMITS, **overrides})


def outcome(buf, **overrides):
    """decode_header's result in the model's form: field tuple or (error class, field)."""
    try:
        h = frames.decode_header(buf, limits(**overrides))
    except errors.ChecksumError as exc:
        return ("ChecksumError", exc.field)
    except errors.FrameError as exc:
        return ("FrameError", exc.field)
    return h.as_tuple()


# ---------------------------------------------------------------- golden layout

GOLDEN_FIELDS = (frames.FT_DATA, frames.FLAG_LAST, frames.CODEC_LZ4, 0x0102030405060708,
                 0x1122334455667788, 0x00BBCCDD, 0x01000000, 0xDEADBEEFCAFEF00D)
GOLDEN_HEX = ("434d4652" "01" "01" "01" "01"          # magic, version, type, flags, codec
              "0807060504030201"                      # cycle
              "8877665544332211"                      # offset
              "ddccbb00"                              # length
              "00000001"                              # raw_length
              "0df0fecaefbeadde"                      # checksum of the raw payload
              "fbfb0247815f201e")                     # xxh3-64 of the 40 bytes above


def test_header_layout_is_pinned():
    assert frames.HEADER_SIZE == 48
    assert frames.MAGIC == b"CMFR" and frames.VERSION == 1
    assert (frames.FT_DATA, frames.FT_ZERO, frames.FT_TRIM, frames.FT_CONTROL,
            frames.FT_SCATTER) == (1, 2, 3, 4, 5)
    assert (frames.CODEC_NONE, frames.CODEC_LZ4, frames.CODEC_ZSTD) == (0, 1, 2)
    assert (frames.FLAG_LAST, frames.FLAGS_RESERVED) == (0x01, 0xFE)
    header = frames.encode_header(*GOLDEN_FIELDS)
    assert header.hex() == GOLDEN_HEX
    # The header checksum is xxh3-64 of the first 40 bytes, little-endian.
    assert header[40:] == struct.pack("<Q", xxhash.xxh3_64_intdigest(header[:40]))
    assert header == ref.encode_header(*GOLDEN_FIELDS)


def test_zero_and_control_frames_are_pinned():
    zero = frames.encode_zero(frames.FT_TRIM, 9, 8192, 4096)
    assert zero.hex().startswith("434d465201030000" "0900000000000000" "0020000000000000"
                                 "00000000" "00100000" "0000000000000000")
    control = frames.encode_control(5, b"hello")
    assert control[:48] == ref.encode_header(frames.FT_CONTROL, 0, frames.CODEC_NONE, 5, 0, 5, 5,
                                             xxhash.xxh3_64_intdigest(b"hello"))
    assert control[48:] == b"hello"


# ---------------------------------------------------------------- decode_header

def valid_data_header(**fields):
    raw = b"x" * 4096
    values = dict(ftype=frames.FT_DATA, flags=0, codec=frames.CODEC_NONE, cycle=3, offset=8192,
                  length=4096, raw_length=4096, checksum=xxhash.xxh3_64_intdigest(raw))
    values.update(fields)
    return ref.encode_header(*values.values())


def test_valid_headers_of_every_type_decode():
    data = frames.decode_header(valid_data_header(), limits())
    assert data.as_tuple() == (1, 0, 0, 3, 8192, 4096, 4096, xxhash.xxh3_64_intdigest(b"x" * 4096))
    zero = frames.decode_header(frames.encode_zero(frames.FT_ZERO, 2, 0, 1 << 29), limits())
    assert (zero.type, zero.offset, zero.raw_length, zero.length) == (frames.FT_ZERO, 0, 1 << 29, 0)
    control = frames.decode_header(frames.encode_control(0, b"{}"), limits())
    assert (control.type, control.length, control.raw_length) == (frames.FT_CONTROL, 2, 2)
    # The last extent of a volume whose size is not aligned may end unaligned.
    tail = valid_data_header(offset=(1 << 20) - 512, length=100, raw_length=100)
    assert frames.decode_header(tail, limits(volume_size=(1 << 20) - 412)).raw_length == 100
    # Longer buffers are fine: only the first HEADER_SIZE bytes are read.
    assert frames.decode_header(valid_data_header() + b"payload", limits()).offset == 8192


# (field, byte offset, replacement bytes): each makes only that field invalid.
BAD_FIELDS = [
    ("magic", 0, b"CMFX"),
    ("version", 4, b"\x02"),
    ("type", 5, b"\x00"),
    ("type", 5, b"\x06"),
    ("flags", 6, b"\x02"),
    ("flags", 6, b"\x80"),
    ("codec", 7, b"\x03"),
    ("cycle", 8, struct.pack("<Q", 1 << 63)),
    ("offset", 16, struct.pack("<Q", (1 << 30) + 512)),        # past the volume
    ("offset", 16, struct.pack("<Q", 8192 + 1)),               # unaligned
    ("length", 24, struct.pack("<I", 4095)),                   # != raw_length when raw
    ("raw_length", 28, struct.pack("<I", (1 << 20) + 512)),    # above max_raw
    ("raw_length", 28, struct.pack("<I", 0)),
]


@pytest.mark.parametrize("reseal", [True, False], ids=["resealed", "checksum-stale"])
@pytest.mark.parametrize("field, at, patch", BAD_FIELDS)
def test_each_invalid_field_is_rejected_by_name(field, at, patch, reseal):
    header = bytearray(valid_data_header())
    header[at:at + len(patch)] = patch
    if reseal:
        header = ref.reseal(header)
    with pytest.raises(errors.FrameError) as info:
        frames.decode_header(bytes(header), limits())
    assert info.value.field == field
    assert not isinstance(info.value, errors.ChecksumError)
    assert field in str(info.value)


def test_field_rules_of_zero_trim_and_control_frames():
    def field_of(header):
        with pytest.raises(errors.FrameError) as info:
            frames.decode_header(header, limits())
        return info.value.field

    zero = dict(ftype=frames.FT_ZERO, codec=0, length=0, raw_length=4096, checksum=0)
    assert field_of(valid_data_header(**{**zero, "length": 1})) == "length"
    assert field_of(valid_data_header(**{**zero, "checksum": 1})) == "checksum"
    assert field_of(valid_data_header(**{**zero, "codec": frames.CODEC_LZ4})) == "codec"
    assert field_of(valid_data_header(**{**zero, "raw_length": (1 << 30)})) == "raw_length"
    control = dict(ftype=frames.FT_CONTROL, offset=0, length=10, raw_length=10)
    assert field_of(valid_data_header(**{**control, "offset": 512})) == "offset"
    assert field_of(valid_data_header(**{**control, "length": 1 << 17,
                                         "raw_length": 1 << 17})) == "raw_length"
    # A compressed payload must be shorter than the raw bytes and not empty.
    lz4 = dict(codec=frames.CODEC_LZ4)
    assert field_of(valid_data_header(**{**lz4, "length": 4096})) == "length"
    assert field_of(valid_data_header(**{**lz4, "length": 0})) == "length"
    assert field_of(valid_data_header(**{**lz4, "length": (1 << 20) + 1,
                                         "raw_length": 1 << 20})) == "length"


def test_every_flipped_bit_of_a_header_is_rejected():
    header = valid_data_header()
    for bit in range(len(header) * 8):
        flipped = bytearray(header)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(errors.FrameError):
            frames.decode_header(bytes(flipped), limits())


def test_an_in_range_offset_flip_is_a_header_checksum_error():
    header = bytearray(valid_data_header())
    header[17] ^= 0x10                       # offset 8192 -> 8192 + 4096 * 256, still valid
    with pytest.raises(errors.ChecksumError) as info:
        frames.decode_header(bytes(header), limits())
    assert info.value.field == "header_checksum"


def test_short_header_is_rejected():
    with pytest.raises(errors.FrameError) as info:
        frames.decode_header(valid_data_header()[:47], limits())
    assert info.value.field == "header"


field_values = st.fixed_dictionaries(dict(
    ftype=st.integers(0, 5), flags=st.sampled_from([0, 1, 2, 0x81]), codec=st.integers(0, 3),
    cycle=st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]),
    offset=st.one_of(st.integers(0, 4).map(lambda k: k * 512), st.integers(0, 2**64 - 1),
                     st.sampled_from([(1 << 30) - 512, 1 << 30, (1 << 30) + 1])),
    length=st.one_of(st.integers(0, 4).map(lambda k: k * 512), st.integers(0, 2**32 - 1)),
    raw_length=st.one_of(st.integers(0, 4).map(lambda k: k * 512), st.integers(0, 2**32 - 1),
                         st.sampled_from([1 << 16, (1 << 16) + 1, 1 << 20, (1 << 20) + 1])),
    checksum=st.sampled_from([0, 1, 2**64 - 1]),
))


# Each drawn header is checked under every (checksum, volume size, alignment) case at
# once: the check is microseconds, drawing the fields is where Hypothesis spends its time
# (about 10 ms an example here).  500 headers x 18 cases = 9000 comparisons, where one
# case per header drawn 1500 times made 1500.
CAP_CASES = [(stale, size, align) for stale in (False, True) for size in (0, 1000, 1 << 30)
             for align in (1, 512, 4096)]


@given(fields=field_values)
@settings(max_examples=examples(500), deadline=None)
def test_decode_header_agrees_with_the_model(fields):
    for stale_checksum, volume_size, alignment in CAP_CASES:
        header = bytearray(ref.encode_header(**fields))
        if stale_checksum:
            header[40] ^= 1
        caps = dict(volume_size=volume_size, alignment=alignment)
        expected = ref.check_header(bytes(header), **{**LIMITS, **caps})
        assert outcome(bytes(header), **caps) == expected, (stale_checksum, caps)


# The fields encode_header accepts, drawn directly: the same values as field_values
# filtered to them, without Hypothesis throwing away nine draws in ten.
valid_field_values = st.fixed_dictionaries(dict(
    ftype=st.integers(1, 4), flags=st.sampled_from([0, 1]), codec=st.integers(0, 2),
    cycle=st.sampled_from([0, 1, 2**63 - 1]),
    offset=st.one_of(st.integers(0, 4).map(lambda k: k * 512), st.integers(0, 2**63 - 1),
                     st.sampled_from([(1 << 30) - 512, 1 << 30, (1 << 30) + 1])),
    length=st.one_of(st.integers(0, 4).map(lambda k: k * 512), st.integers(0, 2**32 - 1)),
    raw_length=st.one_of(st.integers(0, 4).map(lambda k: k * 512), st.integers(0, 2**32 - 1),
                         st.sampled_from([1 << 16, (1 << 16) + 1, 1 << 20, (1 << 20) + 1])),
    checksum=st.sampled_from([0, 1, 2**64 - 1]),
))


@given(fields=valid_field_values)
@settings(max_examples=examples(300), deadline=None)
def test_encode_header_round_trips_through_the_model(fields):
    header = frames.encode_header(**fields)
    assert header == ref.encode_header(**fields)
    big = dict(max_payload=2**32 - 1, max_raw=2**32 - 1, max_control=2**32 - 1,
               volume_size=2**63 - 1, alignment=1)
    assert outcome(header, **big) == ref.check_header(header, **big)


@given(fields=field_values, tail=st.binary(max_size=64), kind=st.sampled_from(
    [bytes, bytearray, memoryview]))
@settings(max_examples=examples(500), deadline=None)
def test_frame_raw_length_agrees_with_the_model(fields, tail, kind):
    frame = kind(ref.encode_header(**fields) + tail)
    assert frames.frame_raw_length(frame) == ref.frame_raw_length(bytes(frame))


def test_frame_raw_length_of_packed_zero_and_control_frames(tmp_path):
    fd = write_file(tmp_path / "img", os.urandom(10000))
    try:
        packed = frames.FramePacker(frames.CODEC_LZ4, chunk_size=4096).pack_extents(
            fd, [(0, 10000)], 3)
    finally:
        os.close(fd)
    assert [frames.frame_raw_length(f) for f in packed] == [4096, 4096, 1808]
    assert frames.frame_raw_length(frames.encode_zero(frames.FT_ZERO, 3, 0, 1 << 31)) == 1 << 31
    assert frames.frame_raw_length(frames.encode_control(3, b"{}")) == 2
    for bad in (b"", b"CMFR" + bytes(40), b"XXXX" + bytes(60)):
        with pytest.raises(errors.UsageError):
            frames.frame_raw_length(bad)


@pytest.mark.parametrize("args", [
    (0, 0, 0, 0, 0, 0, 0, 0), (1, 0, 3, 0, 0, 0, 0, 0), (1, 2, 0, 0, 0, 0, 0, 0),
    (1, 0, 0, 2**63, 0, 0, 0, 0), (1, 0, 0, 0, -1, 0, 0, 0), (1, 0, 0, 0, 0, 2**32, 0, 0),
    (1, 0, 0, 0, 0, 0, 2**32, 0), (1, 0, 0, 0, 0, 0, 0, 2**64), (1, 0, 0, 0, 0.5, 0, 0, 0),
])
def test_encode_header_refuses_values_that_do_not_fit(args):
    with pytest.raises(errors.UsageError):
        frames.encode_header(*args)


def test_bad_limits_and_zero_records_are_refused():
    with pytest.raises(errors.UsageError, match="max_payload"):
        frames.FrameLimits(2**32, 0, 0, 0)
    with pytest.raises(errors.UsageError, match="volume_size"):
        frames.FrameLimits(0, 0, 0, -1)
    with pytest.raises(errors.UsageError, match="alignment"):
        frames.FrameLimits(0, 0, 0, 0, alignment=0)
    with pytest.raises(errors.UsageError):
        frames.encode_zero(frames.FT_DATA, 1, 0, 4096)
    with pytest.raises(errors.UsageError, match="length"):
        frames.encode_zero(frames.FT_ZERO, 1, 0, 0)
    with pytest.raises(errors.UsageError, match="length"):
        frames.encode_zero(frames.FT_ZERO, 1, 0, 2**32)


# ---------------------------------------------------------------- decode_payload

def frame_for(codec, raw, offset=0, cycle=1):
    packed = ref.compress(codec, raw)
    header = ref.encode_header(frames.FT_DATA, 0, codec, cycle, offset, len(packed), len(raw),
                               xxhash.xxh3_64_intdigest(raw))
    return header, packed


@pytest.mark.parametrize("codec", [frames.CODEC_NONE, frames.CODEC_LZ4, frames.CODEC_ZSTD])
def test_payloads_decode_and_verify(codec):
    raw = b"abcd" * 1024 + os.urandom(512)
    header, packed = frame_for(codec, raw)
    h = frames.decode_header(header, limits())
    assert frames.decode_payload(h, packed) == raw
    # Any flipped byte of the payload is caught (by the codec or the checksum).
    for i in range(0, len(packed), max(1, len(packed) // 50)):
        bad = bytearray(packed)
        bad[i] ^= 0x40
        with pytest.raises(errors.FrameError) as info:
            frames.decode_payload(h, bytes(bad))
        assert info.value.field in ("payload", "checksum")
    with pytest.raises(errors.FrameError) as info:
        frames.decode_payload(h, packed + b"x")
    assert info.value.field == "length"


@pytest.mark.parametrize("codec", [frames.CODEC_LZ4, frames.CODEC_ZSTD])
def test_decompression_is_capped_at_raw_length(codec):
    # A payload that inflates past raw_length (a "bomb") is refused, not truncated.
    big = bytes(1 << 20)
    packed = (lz4.block.compress(big, store_size=False) if codec == frames.CODEC_LZ4
              else zstandard.ZstdCompressor().compress(big))
    raw_length = 64 * 1024
    header = ref.encode_header(frames.FT_DATA, 0, codec, 1, 0, len(packed), raw_length,
                               xxhash.xxh3_64_intdigest(big[:raw_length]))
    h = frames.decode_header(header, limits())
    with pytest.raises(errors.FrameError) as info:
        frames.decode_payload(h, packed)
    assert info.value.field == "payload"
    # And one that inflates to less than raw_length is refused too.
    short = ref.encode_header(frames.FT_DATA, 0, codec, 1, 0, len(packed), (1 << 20) - 512 + 0,
                              0)
    h = frames.decode_header(short, limits(max_raw=1 << 21, max_payload=1 << 21))
    with pytest.raises(errors.FrameError):
        frames.decode_payload(h, packed)


def test_checksum_mismatch_is_a_checksum_error():
    raw = os.urandom(4096)
    header = ref.encode_header(frames.FT_DATA, 0, 0, 1, 0, 4096, 4096,
                               xxhash.xxh3_64_intdigest(raw) ^ 1)
    h = frames.decode_header(header, limits())
    with pytest.raises(errors.ChecksumError) as info:
        frames.decode_payload(h, raw)
    assert info.value.field == "checksum"


def test_decode_payload_needs_a_decoded_header():
    with pytest.raises(errors.UsageError, match="decode_header"):
        frames.decode_payload(frames.FrameHeader(), b"")


def test_control_and_zero_payloads():
    frame = frames.encode_control(4, b"status")
    h = frames.decode_header(frame, limits())
    assert frames.decode_payload(h, frame[48:]) == b"status"
    h = frames.decode_header(frames.encode_zero(frames.FT_ZERO, 1, 0, 512), limits())
    assert frames.decode_payload(h, b"") == b""
    with pytest.raises(errors.FrameError):
        frames.decode_payload(h, b"x")


# ---------------------------------------------------------------- pack_extents

def write_file(path, data):
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def unpack_all(packed, volume_size, max_raw):
    caps = frames.FrameLimits(max_raw, max_raw, 0, volume_size)
    out = []
    for frame in packed:
        h = frames.decode_header(frame, caps)
        assert len(frame) == frames.HEADER_SIZE + h.length
        out.append((h.offset, frames.decode_payload(h, frame[frames.HEADER_SIZE:]), h.codec))
    return out


contents = st.lists(
    st.one_of(st.binary(min_size=1, max_size=2000), st.integers(1, 5000).map(bytes),
              st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 500))
              .map(lambda t: t[0] * t[1])),
    min_size=1, max_size=8).map(b"".join)


@given(data=contents, codec=st.sampled_from([0, 1, 2]), chunk_size=st.sampled_from(
    [1, 7, 512, 4096, 1 << 20]), picks=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)),
                                                max_size=5))
@settings(max_examples=examples(150), deadline=None)
def test_pack_extents_matches_the_model(tmp_path_factory, data, codec, chunk_size, picks):
    path = tmp_path_factory.mktemp("pk") / "img"
    fd = write_file(path, data)
    try:
        extents = [(0, len(data))]
        for a, b in picks:
            start = int(a * (len(data) - 1))
            extents.append((start, max(1, int(b * (len(data) - start)))))
        packer = frames.FramePacker(codec, chunk_size=chunk_size)
        got = packer.pack_extents(fd, extents, 11)
        expected = ref.pack_extents(fd, extents, 11, codec, chunk_size)
    finally:
        os.close(fd)
    if codec == frames.CODEC_NONE:
        assert got == expected
    else:
        # The Python lz4/zstandard packages bundle their own library builds,
        # whose output differs from the system library's on some inputs (both
        # valid): compare what the frames mean, not the compressed bytes.
        assert len(got) == len(expected)
        ours = unpack_all(got, len(data), max(chunk_size, 1))
        theirs = unpack_all(expected, len(data), max(chunk_size, 1))
        assert [(o, r) for o, r, _ in ours] == [(o, r) for o, r, _ in theirs]
    # Every frame is a whole DATA frame for its exact slice of the file.
    for offset, raw, _ in unpack_all(got, len(data), max(chunk_size, 1)):
        assert raw == data[offset:offset + len(raw)]


@pytest.mark.parametrize("codec", [frames.CODEC_NONE, frames.CODEC_LZ4, frames.CODEC_ZSTD])
@pytest.mark.parametrize("chunk_size", [4096, 3 << 20])
def test_long_runs_are_read_in_pieces_without_changing_the_frames(tmp_path, codec, chunk_size):
    # 4 KiB chunks hit the 1024-vector limit (4 MiB pieces); 3 MiB chunks hit
    # the 16 MiB read limit (15 MiB pieces).  Half random, half compressible.
    size = (20 << 20) + 1234
    data = bytearray(os.urandom(size))
    for start in range(0, size, 2048):
        data[start:start + 1024] = bytes(len(data[start:start + 1024]))
    fd = write_file(tmp_path / "img", bytes(data))
    try:
        got = frames.FramePacker(codec, chunk_size=chunk_size).pack_extents(fd, [(0, size)], 2)
        if codec == frames.CODEC_NONE:
            assert got == ref.pack_extents(fd, [(0, size)], 2, codec, chunk_size)
    finally:
        os.close(fd)
    decoded = unpack_all(got, size, chunk_size)
    assert b"".join(raw for _, raw, _ in decoded) == bytes(data)
    assert [off for off, _, _ in decoded] == list(range(0, size, chunk_size))
    if codec != frames.CODEC_NONE:
        assert all(c == codec for _, _, c in decoded)


def test_incompressible_chunks_are_stored_raw(tmp_path):
    data = os.urandom(1 << 20) + bytes(1 << 20)
    fd = write_file(tmp_path / "img", data)
    try:
        for codec in (frames.CODEC_LZ4, frames.CODEC_ZSTD):
            got = frames.FramePacker(codec, chunk_size=1 << 19).pack_extents(fd, [(0, len(data))], 1)
            codecs = [c for _, _, c in unpack_all(got, len(data), 1 << 19)]
            assert codecs == [frames.CODEC_NONE] * 2 + [codec] * 2
    finally:
        os.close(fd)


def test_one_packer_from_two_threads(tmp_path):
    data = os.urandom(4 << 20)
    fd = write_file(tmp_path / "img", data)
    packer = frames.FramePacker(frames.CODEC_ZSTD, level=1, chunk_size=1 << 18)
    results = {}
    try:
        def work(i):
            results[i] = packer.pack_extents(fd, [(i * (2 << 20), 2 << 20)], 1)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.close(fd)
    decoded = unpack_all(results[0] + results[1], len(data), 1 << 18)
    assert b"".join(raw for _, raw, _ in decoded) == data


def test_pack_extents_refuses_bad_extents_and_reports_read_errors(tmp_path):
    fd = write_file(tmp_path / "img", b"z" * 10000)
    packer = frames.FramePacker(frames.CODEC_LZ4)
    try:
        with pytest.raises(errors.UsageError, match="ends at byte 10000"):
            packer.pack_extents(fd, [(8192, 4096)], 1)
        for bad in ([(0, 0)], [(-1, 10)], [(0, -5)], [(0,)], [5], [(0, 1.5)]):
            with pytest.raises(errors.UsageError, match="extent #0"):
                packer.pack_extents(fd, bad, 1)
        with pytest.raises(errors.UsageError, match="cycle"):
            packer.pack_extents(fd, [(0, 1)], -1)
        assert packer.pack_extents(fd, [], 1) == []
    finally:
        os.close(fd)
    with pytest.raises(errors.StoreError, match="errno 9"):
        packer.pack_extents(fd, [(0, 10)], 1)


@pytest.mark.parametrize("args", [
    dict(codec=3), dict(codec=1.0), dict(codec=frames.CODEC_LZ4, level=1), dict(codec=frames.CODEC_NONE, level=1),
    dict(codec=frames.CODEC_ZSTD, level=1000), dict(codec=frames.CODEC_LZ4, chunk_size=0),
    dict(codec=frames.CODEC_LZ4, chunk_size=(64 << 20) + 1),
])
def test_frame_packer_refuses_bad_settings(args):
    with pytest.raises(errors.UsageError):
        frames.FramePacker(**args)


def test_pack_extents_beyond_4_gib_and_from_a_numpy_run_array(tmp_path):
    # Offsets above 32 bits land in the header intact; extents may come as the
    # int64 (n, 2) array that ExtentBitmap.runs() gives (scaled to bytes).
    path = tmp_path / "sparse.img"
    data = os.urandom(10000)
    base = (5 << 30) + 512
    with open(path, "wb") as f:
        f.truncate(6 << 30)
        f.seek(base)
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = np.array([[base, 4096], [base + 8192, 10000 - 8192]], dtype=np.int64)
        got = frames.FramePacker(frames.CODEC_LZ4, chunk_size=4096).pack_extents(fd, extents, 3)
    finally:
        os.close(fd)
    decoded = unpack_all(got, 6 << 30, 4096)
    assert [(off, raw) for off, raw, _ in decoded] == [(base, data[:4096]),
                                                      (base + 8192, data[8192:])]


# ---------------------------------------------------------------- SCATTER frames

def _extents_from(gaps_and_lengths, block):
    """Ascending, non-overlapping (offset, length) in blocks of ``block`` bytes."""
    out, pos = [], 0
    for gap, length in gaps_and_lengths:
        pos += gap * block
        out.append((pos, length * block))
        pos += length * block
    return out


@given(spans=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 4)), min_size=1,
                      max_size=60),
       codec=st.sampled_from([0, 1, 2]), chunk_blocks=st.sampled_from([1, 3, 16, 256]))
@settings(max_examples=examples(120), deadline=None)
def test_pack_scatter_matches_the_model_and_round_trips(tmp_path_factory, spans, codec,
                                                        chunk_blocks):
    block = 512
    extents = _extents_from(spans, block)
    size = extents[-1][0] + extents[-1][1] + block
    data = os.urandom(size // 2) + bytes(size - size // 2)  # half noise, half compressible
    path = tmp_path_factory.mktemp("sc") / "img"
    fd = write_file(path, data)
    try:
        packer = frames.FramePacker(codec, chunk_size=chunk_blocks * block)
        got = packer.pack_scatter(fd, extents, 3)
        expected = ref.pack_scatter(fd, extents, 3, codec, chunk_blocks * block)
    finally:
        os.close(fd)
    assert [n for _, n in got] == [n for _, n in expected]
    if codec == frames.CODEC_NONE:
        assert [f for f, _ in got] == [f for f, _ in expected]
    caps = frames.FrameLimits(1 << 20, 1 << 20, 0, size, block)
    seen = []
    for frame, n in got:
        h = frames.decode_header(frame, caps)
        assert h.type == frames.FT_SCATTER
        raw = frames.decode_payload(h, frame[frames.HEADER_SIZE:])
        first, count, nbytes = frames.scatter_check(raw, size, block)
        ext = frames.scatter_extents(raw, size, block)
        assert ext == ref.scatter_extents(raw, size, block)
        assert (first, count, nbytes) == (h.offset, len(ext), n) == (ext[0][0], len(ext), n)
        pos = 8 + 16 * count
        for off, ln in ext:
            assert raw[pos:pos + ln] == data[off:off + ln]
            pos += ln
        seen += ext
    assert seen == extents


@given(extents=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 3 << 12)),
                        min_size=0, max_size=6),
       count_delta=st.integers(-1, 1), reserved=st.integers(0, 1), tail=st.integers(-2, 2),
       volume=st.sampled_from([1 << 16, (1 << 16) + 1024]))
@settings(max_examples=examples(400), deadline=None)
def test_scatter_tables_are_checked_like_the_model(extents, count_delta, reserved, tail,
                                                   volume):
    data = bytes(max(0, sum(ln for _, ln in extents) + tail))
    raw = bytearray(ref.scatter_payload(extents, data))
    struct.pack_into("<II", raw, 0, max(0, len(extents) + count_delta), reserved)
    expected = ref.scatter_extents(bytes(raw), volume, 1024)
    try:
        got = frames.scatter_extents(bytes(raw), volume, 1024)
    except errors.FrameError as exc:
        got = ("FrameError", exc.field)
    assert got == expected


def test_scatter_write_writes_each_extent_and_refuses_a_bad_table(tmp_path):
    size = 1 << 20
    extents = [(0, 4096), (8192, 8192), (size - 4096, 4096)]
    chunks = [os.urandom(ln) for _, ln in extents]
    raw = ref.scatter_payload(extents, b"".join(chunks))
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, size)
        assert frames.scatter_write(fd, raw, size, 4096) == sum(ln for _, ln in extents)
        for (off, ln), chunk in zip(extents, chunks, strict=True):
            assert os.pread(fd, ln, off) == chunk
        assert os.pread(fd, 4096, 4096) == bytes(4096)
        before = os.pread(fd, size, 0)
        bad = bytearray(raw)
        struct.pack_into("<Q", bad, 8 + 16 * 2, size)  # the last extent past the end
        with pytest.raises(errors.FrameError) as info:
            frames.scatter_write(fd, bytes(bad), size, 4096)
        assert info.value.field == "payload"
        assert os.pread(fd, size, 0) == before  # nothing written from a bad table
    finally:
        os.close(fd)


def test_pack_scatter_refuses_unordered_extents(tmp_path):
    fd = write_file(tmp_path / "img", bytes(1 << 16))
    try:
        packer = frames.FramePacker(frames.CODEC_NONE)
        with pytest.raises(errors.UsageError, match="overlaps or precedes"):
            packer.pack_scatter(fd, [(8192, 4096), (4096, 4096)], 1)
        with pytest.raises(errors.UsageError, match="extent #0"):
            packer.pack_scatter(fd, [(0, 0)], 1)
    finally:
        os.close(fd)
