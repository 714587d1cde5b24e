"""``--compress auto``: the pure choice, and the packer that learns and switches.

Proves: ``choose`` picks the candidate of least cost (hypothesis, against
the cost written out here), lz4 when the link is fast or unknown, the best
ratio when the link is slow; ``AdaptivePacker`` learns from real packing
(real FramePackers, a real file) and from the link rates it is told, moves
to zstd on a slow link and back to lz4 on a fast one, and every frame it
makes, whatever the codec, decodes to exactly the bytes of its chunk at the
same chunk boundaries as a fixed packer's.
"""

from __future__ import annotations

import os
import random

from hypothesis import given
from hypothesis import strategies as st

from cyclemirror._cext import frames
from cyclemirror.sender.autocodec import CANDIDATES, EXPLORE_EVERY, AdaptivePacker, choose

MiB = 1 << 20


def cost(link, cpu, ratio, threads):
    c = 1 / (cpu * threads)
    return max(c, ratio / link) if link else c


rates = st.floats(min_value=1e3, max_value=1e10, allow_nan=False)
ratios = st.floats(min_value=0.01, max_value=1.2, allow_nan=False)


@given(link=st.one_of(st.none(), rates), cpus=st.lists(st.one_of(st.none(), rates), min_size=4,
                                                        max_size=4),
       rs=st.lists(ratios, min_size=4, max_size=4), threads=st.integers(1, 4))
def test_choose_picks_a_measured_candidate_of_least_cost(link, cpus, rs, threads):
    i = choose(link, cpus, rs, threads)
    measured = [j for j, c in enumerate(cpus) if c is not None]
    if not measured:
        assert i == 0
        return
    assert i in measured
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


def test_the_packer_moves_to_zstd_on_a_slow_link_and_back_and_frames_stay_exact(tmp_path):
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

        assert batches(1) == {frames.CODEC_LZ4}  # the link is unknown: lz4
        packer.observe_link("t", 2 * MiB, 2.0)  # 1 MiB/s: a very slow link
        batches(len(CANDIDATES) + 1)  # every candidate gets measured once
        assert packer.status()["codec"].startswith("zstd")
        picked = packer.status()["codec"]
        assert all(c["batches"] >= 1 for c in packer.status()["candidates"])
        for _ in range(EXPLORE_EVERY + 1):
            packer.observe_link("t", 2 * MiB, 2.0)
            batches(1)
        assert packer.status()["codec"] == picked != "lz4"
        for _ in range(30):  # now the link is loopback-fast: the CPU is the limit
            packer.observe_link("t", 1 << 30, 0.01)
        batches(1)
        assert packer.status()["codec"] == "lz4"
        assert packer.status()["link_rate"] > 1e9
    finally:
        os.close(fd)


def test_the_slowest_target_sets_the_link_rate():
    packer = AdaptivePacker(MiB)
    packer.observe_link("fast", 100 * MiB, 0.1)
    packer.observe_link("slow", 10 * MiB, 10.0)
    assert packer.status()["link_rate"] == 1 * MiB
    packer.forget_link("slow")
    assert packer.status()["link_rate"] == 1000 * MiB
