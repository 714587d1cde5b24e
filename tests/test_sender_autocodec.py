"""``--compress auto``: the pure choice, and the packer that learns and switches.

Proves: ``choose`` picks the candidate of least cost (hypothesis, against
the cost written out here), never ``none`` without a link rate, ``none``
when the link takes raw bytes faster than the threads compress (a table of
links from 40 Mbit/s to loopback), lz4 when the CPU is the limit, the best
ratio when the link is slow; ``LinkMeter`` on a real TCP connection tells a
busy link (its rate) from one that idled (a lower bound); ``AdaptivePacker``
learns from real packing (real FramePackers, a real file) and from the link
rates it is told, probes with one batch of ``none`` then zstd 1, moves to
zstd on a slow link without a batch of lz4 (``worth_trying``: both bounds of a candidate's
cost, the bytes one only against the link's own rate) and to ``none`` on a
fast one, lower bounds only ever raise its link estimate, and every frame it
makes, whatever the codec, decodes to exactly the bytes of its chunk at the
same chunk boundaries as a fixed packer's.
"""

from __future__ import annotations

import os
import random
import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyclemirror._cext import frames
from cyclemirror.sender.autocodec import (
    CANDIDATES,
    EXPLORE_EVERY,
    AdaptivePacker,
    LinkMeter,
    choose,
    label,
    link_bound,
    worth_trying,
)

MiB = 1 << 20


def cost(link, cpu, ratio, threads):
    c = 1 / (cpu * threads)
    return max(c, ratio / link) if link else c


rates = st.floats(min_value=1e3, max_value=1e10, allow_nan=False)
ratios = st.floats(min_value=0.01, max_value=1.2, allow_nan=False)


@given(link=st.one_of(st.none(), rates), cpus=st.lists(st.one_of(st.none(), rates), min_size=5,
                                                        max_size=5),
       rs=st.lists(ratios, min_size=5, max_size=5), threads=st.integers(1, 4),
       stored=st.one_of(st.none(), st.integers(0, 4)))
def test_choose_picks_a_measured_candidate_of_least_cost(link, cpus, rs, threads, stored):
    i = choose(link, cpus, rs, threads, stored=stored, first=1)
    measured = [j for j, c in enumerate(cpus)
                if c is not None and (j != stored or link is not None)]
    if not measured:
        assert i == 1  # first
        return
    assert i in measured  # the stored candidate only against a measured link
    best = min(cost(link, cpus[j], rs[j], threads) for j in measured)
    assert cost(link, cpus[i], rs[i], threads) <= best * (1 + 1e-12)


def test_choose_lz4_on_a_fast_link_and_the_best_ratio_on_a_slow_one():
    cpu = [600e6, 300e6, 150e6, 30e6]  # lz4, zstd 1, 3, 9 per thread
    ratio = [0.50, 0.35, 0.32, 0.28]
    assert choose(None, cpu, ratio) == 0
    assert choose(10e9, cpu, ratio) == 0  # loopback: CPU is the limit
    assert choose(5e6, cpu, ratio) == 3  # 40 Mbit/s: zstd 9 keeps up and ships least
    assert choose(12.5e6, cpu, ratio) == 2  # 100 Mbit/s: zstd 9's CPU is now the limit
    assert choose(60e6, cpu, ratio) == 1  # 480 Mbit/s: zstd 1
    assert choose(60e6, cpu, ratio, threads=4) == 2  # four threads pack: zstd 3 keeps up


# none, lz4, zstd 1, 3, 9: raw bytes per second of one thread, wire bytes per raw byte
CPU5 = [3000e6, 600e6, 300e6, 150e6, 30e6]
RATIO5 = [1.0, 0.50, 0.35, 0.32, 0.28]
NAMES5 = ["none", "lz4", "zstd:1", "zstd:3", "zstd:9"]


@pytest.mark.parametrize("link, threads, want", [
    (None, 1, "lz4"),  # not measured: CPU alone, and none needs a link rate
    (None, 4, "lz4"),
    (10e9, 1, "none"),  # loopback: the link takes raw bytes faster than lz4 makes them
    (1.25e9, 1, "none"),  # 10 GbE
    (1.25e9, 2, "none"),  # two threads make 1.2 GB/s of lz4: still slower than raw
    (1e9, 4, "lz4"),  # four threads: lz4 keeps up and halves the bytes
    (700e6, 1, "none"),  # just above one thread of lz4 (600 MB/s raw)
    (500e6, 1, "lz4"),  # just below it
    (125e6, 1, "zstd:1"),  # 1 GbE
    (125e6, 2, "zstd:1"),
    (12.5e6, 1, "zstd:3"),  # 100 Mbit/s: zstd 9's CPU is the limit
    (12.5e6, 4, "zstd:9"),  # ...unless four threads pack
    (5e6, 1, "zstd:9"),  # 40 Mbit/s
])
def test_choose_table_from_a_slow_wan_to_loopback(link, threads, want):
    got = choose(link, CPU5, RATIO5, threads, stored=0, first=1)
    assert NAMES5[got] == want


@pytest.mark.parametrize("cpus, link, want", [
    ([None] * 5, None, "lz4"),  # nothing measured: the first candidate
    ([None] * 5, 10e9, "lz4"),
    ([3000e6, None, None, None, None], None, "lz4"),  # only none measured, no link
    ([3000e6, None, None, None, None], 10e9, "none"),  # ...with a link: it is all we know
    ([None, 600e6, 300e6, 150e6, 30e6], 10e9, "lz4"),  # none not measured yet
])
def test_choose_with_candidates_not_yet_measured(cpus, link, want):
    assert NAMES5[choose(link, cpus, RATIO5, 1, stored=0, first=1)] == want


ALL5 = [3000e6, 600e6, 300e6, 150e6, 30e6]
NOT_ABOVE_ZSTD1 = [3000e6, 600e6, 300e6, None, None]  # zstd 3 and 9 not tried yet
CHEAP = (0, 1, 2)  # none, lz4, zstd 1


@pytest.mark.parametrize("i, link, cpus, chosen, want", [
    (0, None, [None] * 5, 1, True),  # none, lz4 and zstd 1 are always worth a batch
    (1, None, [None] * 5, 1, True),
    (2, 10e9, ALL5, 0, True),
    (3, None, NOT_ABOVE_ZSTD1, 1, False),  # no link rate yet: nothing says zstd 3 could win
    (3, 10e9, NOT_ABOVE_ZSTD1, 0, False),  # loopback: zstd 1's CPU cost alone loses to none
    (4, 10e9, NOT_ABOVE_ZSTD1, 0, False),
    (3, 125e6, NOT_ABOVE_ZSTD1, 2, False),  # 1 GbE: zstd 1 is CPU-bound, a higher level too
    (3, 12.5e6, NOT_ABOVE_ZSTD1, 2, True),  # 100 Mbit/s: the link is the limit, try zstd 3
    (4, 12.5e6, [3000e6, 600e6, 300e6, 150e6, None], 3, True),  # ...then zstd 9
    (4, 60e6, [3000e6, 600e6, 300e6, 150e6, None], 2, False),  # 480 Mbit/s: zstd 3 too slow
    (3, 12.5e6, [3000e6, 600e6, None, None, None], 1, True),  # only lz4 below: a weaker bound
])
def test_worth_trying_a_level_only_when_its_cpu_cost_could_beat_the_choice(
        i, link, cpus, chosen, want):
    assert worth_trying(i, link, cpus, RATIO5, 1, chosen, CHEAP) is want


# The packer's order: zstd 1 first (autocodec.FIRST), so ALWAYS is its index.
ALWAYS = (2,)
ONLY_ZSTD1 = [None, None, 300e6, None, None]


@pytest.mark.parametrize("i, link, busy, cpus, chosen, want", [
    (1, None, False, ONLY_ZSTD1, 2, False),  # no link rate: only the first candidate
    (0, None, False, ONLY_ZSTD1, 2, False),
    (2, None, False, [None] * 5, 2, True),  # the first one always
    # 100 Mbit/s, the link's own rate: lz4 and none ship no fewer bytes than
    # zstd 1, which is already link-bound there: never a batch of them to learn it
    (1, 12.5e6, True, ONLY_ZSTD1, 2, False),
    (0, 12.5e6, True, ONLY_ZSTD1, 2, False),
    (0, 12.5e6, True, [None, 600e6, 300e6, None, None], 2, False),
    (3, 12.5e6, True, ONLY_ZSTD1, 2, True),  # ...but zstd 3 could ship fewer
    # a rate from lower bounds only (the link outran the packer): it may be far faster
    (1, 12.5e6, False, ONLY_ZSTD1, 2, True),
    (0, 12.5e6, False, ONLY_ZSTD1, 2, True),
    (1, 10e9, True, ONLY_ZSTD1, 2, True),  # 10 GbE: zstd 1 is CPU-bound, lz4 could win
    (1, 125e6, True, ONLY_ZSTD1, 2, True),  # 1 GbE: zstd 1 (300 MB/s) CPU-bound too
    (0, 125e6, True, [None, 600e6, 300e6, None, None], 1, False),  # lz4 link-bound: not none
    (0, 1e9, True, [None, 600e6, 300e6, None, None], 1, True),  # lz4 CPU-bound: none could
    (4, 10e9, True, [None, 600e6, 300e6, 150e6, None], 1, False),  # zstd 9 on 10 GbE: never
])
def test_worth_trying_uses_both_bounds_the_bytes_one_only_on_the_links_own_rate(
        i, link, busy, cpus, chosen, want):
    assert worth_trying(i, link, cpus, RATIO5, 1, chosen, ALWAYS, link_busy=busy) is want


def _tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


def _wait(predicate, what):
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_link_meter_tells_a_busy_link_from_an_idle_one():
    # sampled just before each send: busy when the unsent queue is not empty then
    a, b = _tcp_pair()
    try:
        meter = LinkMeter(a)
        sent = 0
        assert meter.sample(sent) is None  # the first sample starts the clock
        a.sendall(b"x" * 65536)
        sent += 65536
        _wait(lambda: meter.unsent() == 0, "the peer to acknowledge 64 KiB")
        delivered, seconds, busy = meter.sample(sent)
        assert (delivered, busy) == (65536, False) and seconds > 0  # it ran empty: idle
        a.setblocking(False)
        try:  # the peer reads nothing: fill its window and our buffer
            while True:
                sent += a.send(b"y" * 65536)
        except BlockingIOError:
            pass
        _wait(lambda: meter.unsent() > 0, "data to stay unacknowledged")
        delivered, seconds, busy = meter.sample(sent)
        assert busy and 0 <= delivered < sent  # never empty since: the link's own rate
        got = 0
        b.settimeout(30)
        while got < sent:  # the peer reads it all: the queue drains
            got += len(b.recv(1 << 20))
        _wait(lambda: meter.unsent() == 0, "the queue to drain")
        delivered, seconds, busy = meter.sample(sent)
        assert not busy and delivered > 0  # it ran empty before this sample
    finally:
        a.close()
        b.close()


def test_lower_bounds_only_raise_the_link_estimate():
    packer = AdaptivePacker(MiB)
    packer.observe_link("t", 10 * MiB, 1.0)  # busy: 10 MiB/s
    packer.observe_link("t", MiB, 1.0, busy=False)  # the link idled: it says nothing
    assert packer.status()["link_rate"] == 10 * MiB
    packer.observe_link("t", 100 * MiB, 1.0, busy=False)  # at least 100 MiB/s
    raised = packer.status()["link_rate"]
    assert 10 * MiB < raised < 100 * MiB  # a step towards it (a running mean)
    packer.observe_link("t", 5 * MiB, 1.0)  # busy samples still lower it
    assert packer.status()["link_rate"] < raised


def _text(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(2, 9)))
             for _ in range(400)]
    out = b" ".join(rng.choice(words) for _ in range(n // 4))
    return out[:n]


def _decoded(frame_list) -> list[tuple[int, bytes, int]]:
    limits = frames.FrameLimits(max_payload=2 * MiB, max_raw=MiB, max_control=1 << 16,
                                volume_size=1 << 30, alignment=1)
    out = []
    for f in frame_list:
        h = frames.decode_header(f, limits)
        out.append((h.offset, bytes(frames.decode_payload(h, f[frames.HEADER_SIZE:])), h.codec))
    return out


def test_the_packer_moves_to_zstd_on_a_slow_link_to_none_on_a_fast_one_frames_stay_exact(
        tmp_path):
    data = _text(2 * MiB) + os.urandom(MiB // 4)
    path = tmp_path / "img"
    path.write_bytes(data)
    fixed = frames.FramePacker(frames.CODEC_LZ4, 0, MiB)
    packer = AdaptivePacker(MiB, threads=1)
    fd = os.open(path, os.O_RDONLY)
    try:
        reference = [(o, b) for o, b, _c in _decoded(fixed.pack_extents(fd, [(0, len(data))], 1))]

        def batches(n):
            codecs = set()
            for _ in range(n):
                got = _decoded(packer.pack_extents(fd, [(0, len(data))], 1))
                assert [(o, b) for o, b, _c in got] == reference  # same chunks, same bytes
                codecs |= {c for _o, _b, c in got} - {frames.CODEC_NONE}  # random: stored
            return codecs

        batches(1)  # the probe: none (its frames are stored, not in the set)
        assert [c["batches"] for c in packer.status()["candidates"]][0] == 1
        assert batches(2) == {frames.CODEC_ZSTD}  # the link is unknown: zstd 1
        packer.observe_link("t", 2 * MiB, 2.0)  # 1 MiB/s, its own rate: a very slow link
        # the zstd levels get measured; lz4, which cannot ship fewer bytes
        # than zstd 1, gets no batch (until exploration, one in 16)
        assert batches(len(CANDIDATES) + 1) == {frames.CODEC_ZSTD}
        tried = {c["codec"] for c in packer.status()["candidates"] if c["batches"]}
        assert tried == {"none", "zstd:1", "zstd:3", "zstd:9"}, packer.status()
        assert packer.status()["codec"].startswith("zstd")
        picked = packer.status()["codec"]
        for _ in range(EXPLORE_EVERY + 1):
            packer.observe_link("t", 2 * MiB, 2.0)
            batches(1)
        assert packer.status()["codec"] == picked != "lz4"
        for _ in range(30):  # now the link is far faster than any codec: none
            packer.observe_link("t", 1 << 30, 0.01)
        batches(2)  # none gets its first batch (lz4 too, when exploring got to it first)
        assert packer.status()["codec"] == "none"
        assert packer.status()["link_rate"] > 1e9
    finally:
        os.close(fd)


@pytest.mark.parametrize("link, cpu, ratio, threads, want", [
    (12.5e6, 300e6, 0.35, 1, True),  # 100 Mbit/s: zstd 1 waits for the link
    (10e9, 300e6, 0.35, 1, False),  # 10 GbE: the CPU is the limit
    (125e6, 300e6, 0.35, 1, False),  # 1 GbE, one thread: CPU-bound (3.3 ns against 2.8 ns)
    (125e6, 300e6, 0.35, 2, True),  # ...two threads: the link is
    (None, 300e6, 0.35, 1, False),  # unknown figures say no
    (12.5e6, None, 0.35, 1, False),
    (12.5e6, 300e6, None, 1, False),
])
def test_link_bound_table(link, cpu, ratio, threads, want):
    assert link_bound(link, cpu, ratio, threads) is want
    # a rate made of lower bounds (the link outran the packer) says nothing of the kind
    assert link_bound(link, cpu, ratio, threads, link_busy=False) is False


def test_on_a_link_bound_choice_trying_and_exploring_ship_no_more_than_the_choice(tmp_path):
    data = _text(MiB // 2) + os.urandom(MiB // 4)
    path = tmp_path / "img"
    path.write_bytes(data)
    fixed = {label(c): frames.FramePacker({"none": frames.CODEC_NONE, "lz4": frames.CODEC_LZ4,
                                           "zstd": frames.CODEC_ZSTD}[c[0]], c[1], MiB)
             for c in CANDIDATES}
    packer = AdaptivePacker(MiB, threads=2)
    fd = os.open(path, os.O_RDONLY)
    extents = [(0, len(data))]
    try:
        packer.pack_extents(fd, extents, 1)  # zstd 1, blind
        packed = 1
        for _ in range(2 * EXPLORE_EVERY):
            packer.observe_link("t", 2 * MiB, 2.0)  # 1 MiB/s, busy: every codec waits for it
            choice = packer.status()["codec"]
            before = sum(c["batches"] for c in packer.status()["candidates"])
            wire = sum(len(f) for f in packer.pack_extents(fd, extents, 1))
            assert wire <= sum(len(f) for f in fixed[choice].pack_extents(fd, extents, 1))
            packed += 1
            packed_now = sum(c["batches"] for c in packer.status()["candidates"])
            assert packed_now - before in (1, 2)  # and the choice's packing, if it tried another
        counts = {c["codec"]: c["batches"] for c in packer.status()["candidates"]}
        assert sum(counts.values()) > packed  # some batches were packed twice
        assert counts["zstd:3"] and counts["zstd:9"], counts  # tried and explored
        for _ in range(30):  # a link far faster than the codecs: CPU-bound, one packing each
            packer.observe_link("t", 1 << 30, 0.001)
        for _ in range(EXPLORE_EVERY + 1):
            before = sum(c["batches"] for c in packer.status()["candidates"])
            packer.pack_extents(fd, extents, 1)
            assert sum(c["batches"] for c in packer.status()["candidates"]) == before + 1
        # a slow rate made of lower bounds only (the link idled: it may be far faster):
        # not link-bound, so no batch is packed twice
        packer = AdaptivePacker(MiB, threads=2)
        packer.pack_extents(fd, extents, 1)
        for _ in range(EXPLORE_EVERY + 1):
            packer.observe_link("t", 2 * MiB, 2.0, busy=False)
            before = sum(c["batches"] for c in packer.status()["candidates"])
            packer.pack_extents(fd, extents, 1)
            assert sum(c["batches"] for c in packer.status()["candidates"]) == before + 1
    finally:
        os.close(fd)


def test_the_slowest_target_sets_the_link_rate():
    packer = AdaptivePacker(MiB)
    packer.observe_link("fast", 100 * MiB, 0.1)
    packer.observe_link("slow", 10 * MiB, 10.0)
    assert packer.status()["link_rate"] == 1 * MiB
    packer.forget_link("slow")
    assert packer.status()["link_rate"] == 1000 * MiB
