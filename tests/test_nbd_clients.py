"""The NBD server with real clients: nbdinfo, qemu-img, qemu-io, nbdcopy.

Every test runs a real NbdServer on a real raw image and drives it with the
tools applications use, then checks the bytes on disk (or through the server)
independently of the server's own view.
"""

from __future__ import annotations

import json
import os
import random
import threading

from tests.support.nbd import file_blocks_bytes, raw_server, run
from tests.support.tools import require_tool

MiB = 1 << 20


def test_nbdinfo_shows_size_capabilities_and_the_allocation_context_over_unix_and_tcp(tmp_path):
    require_tool("nbdinfo")
    require_tool("qemu-io")
    with raw_server(tmp_path, {"vol": (64 * MiB, False), "mirror": (8 * MiB, True)}, tcp=True) as (srv, paths):
        info = json.loads(run("nbdinfo", "--json", srv.uri("vol")).stdout)
        (export,) = info["exports"]
        assert export["export-size"] == 64 * MiB
        assert export["contexts"] == ["base:allocation"]
        assert info["structured"] is True
        for cap in ("can_trim", "can_zero", "can_fua", "can_flush", "can_multi_conn",
                    "can_fast_zero", "can_df"):
            assert export[cap] is True, cap
        assert export["is_read_only"] is False and export["can_cache"] is False
        ro = json.loads(run("nbdinfo", "--json", srv.uri("mirror")).stdout)["exports"][0]
        assert ro["is_read_only"] is True and ro["export-size"] == 8 * MiB
        for cap in ("can_trim", "can_zero", "can_fua", "can_flush"):
            assert ro[cap] is False, cap
        # the same over TCP, and the export list
        host, port = srv.tcp_address
        tcp = json.loads(run("nbdinfo", "--json", f"nbd://{host}:{port}/vol").stdout)
        assert tcp["exports"][0]["export-size"] == 64 * MiB
        run("qemu-io", "-f", "raw", "-c", "write -P 0x42 12345 100000", "-c", "read -P 0x42 12345 100000",
            f"nbd://{host}:{port}/vol")
        listed = run("nbdinfo", "--list", "--json", srv.uri("")).stdout
        assert sorted(e["export-name"] for e in json.loads(listed)["exports"]) == ["mirror", "vol"]
        with open(paths["vol"], "rb") as f:
            f.seek(12345)
            assert f.read(100000) == b"\x42" * 100000  # the TCP write landed


def test_qemu_img_convert_fills_the_volume_and_compare_matches(tmp_path):
    require_tool("qemu-img")
    src = tmp_path / "src.raw"
    rnd = random.Random(5)
    with open(src, "wb") as f:
        f.truncate(32 * MiB)
        for _ in range(40):  # scattered data, the rest holes
            f.seek(rnd.randrange(0, 32 * MiB - 300_000))
            f.write(rnd.randbytes(rnd.randrange(1, 300_000)))
    with raw_server(tmp_path, {"vol": (32 * MiB, False)}) as (srv, paths):
        # pre-dirty the target so zero regions must really be zeroed by the copy
        with open(paths["vol"], "r+b") as f:
            f.write(b"\xee" * (32 * MiB))
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri("vol"))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri("vol"))
        assert open(paths["vol"], "rb").read() == src.read_bytes()


def _qemu_io(uri: str, *cmds: str, check: bool = True):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    return run(*argv, uri, check=check)


def test_qemu_io_patterns_at_odd_offsets_and_lengths_read_back(tmp_path):
    require_tool("qemu-io")
    size = 16 * MiB
    rnd = random.Random(11)
    writes = []
    cursor = 1
    for i in range(24):  # non-overlapping, unaligned, sizes from 1 byte to over 1 MiB
        length = rnd.choice([1, 3, 511, 513, 4095, 4097, 65537, 300_001, 1_048_577])
        writes.append((cursor, length, (i * 37 + 1) % 255 + 1))
        cursor += length + rnd.randrange(1, 5000)
    assert cursor < size
    with raw_server(tmp_path, {"vol": (size, False)}) as (srv, paths):
        uri = srv.uri("vol")
        _qemu_io(uri, *(f"write -P {p} {o} {n}" for o, n, p in writes))
        # a separate process reads back: nothing is served from the writer's cache
        _qemu_io(uri, *(f"read -P {p} {o} {n}" for o, n, p in writes))
        expected = bytearray(size)
        for o, n, p in writes:
            expected[o:o + n] = bytes([p]) * n
        assert open(paths["vol"], "rb").read() == expected
        # a wrong pattern must fail (the check can fail)
        o, n, p = writes[3]
        bad = _qemu_io(uri, f"read -P {p ^ 0xFF} {o} {n}", check=False)
        assert b"Pattern verification failed" in bad.stdout + bad.stderr


def test_trim_and_write_zeroes_read_back_as_zeroes_and_show_in_the_map(tmp_path):
    require_tool("qemu-io")
    require_tool("nbdinfo")
    with raw_server(tmp_path, {"vol": (8 * MiB, False)}) as (srv, paths):
        uri = srv.uri("vol")
        _qemu_io(uri, "write -P 0x61 0 8M", "flush")
        _qemu_io(uri, "discard 1M 1M", "write -z 4M 1M", "write -z -u 6M 512k",
                 "write -z 7340033 4095")  # unaligned zero range
        _qemu_io(uri, "read -P 0 1M 1M", "read -P 0 4M 1M", "read -P 0 6M 512k",
                 "read -P 0 7340033 4095", "read -P 0x61 0 1M", "read -P 0x61 2M 2M",
                 "read -P 0x61 7340032 1", "read -P 0x61 7344128 1044480")
        data = open(paths["vol"], "rb").read()
        assert data[MiB:2 * MiB] == bytes(MiB) and data[4 * MiB:5 * MiB] == bytes(MiB)
        mapping = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
        zero_bytes = sum(e["length"] for e in mapping if e["type"] & 2)
        assert zero_bytes >= MiB  # at least the trimmed MiB is reported as zero


def test_read_only_export_is_readable_and_qemu_cannot_open_it_for_writing(tmp_path):
    require_tool("qemu-io")
    content = bytes(range(256)) * 4096
    with raw_server(tmp_path, {"mirror": (content, True)}) as (srv, paths):
        uri = srv.uri("mirror")
        run("qemu-io", "-r", "-f", "raw", "-c", "read -P 7 7 1", "-c", "read -P 255 1048575 1", uri)
        w = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 512", uri, check=False)
        assert w.returncode != 0 and b"Permission denied" in w.stderr
        # The byte-level EPERM replies to WRITE/TRIM/WRITE_ZEROES are in test_nbd_badclient.
        assert open(paths["mirror"], "rb").read() == content


def test_nbdcopy_in_and_out_keeps_sparse_regions_sparse(tmp_path):
    require_tool("nbdcopy")
    size = 64 * MiB
    src = tmp_path / "src.raw"
    rnd = random.Random(3)
    with open(src, "wb") as f:
        f.truncate(size)
        for i in range(8):
            f.seek(i * 8 * MiB)
            f.write(rnd.randbytes(MiB))  # 8 MiB data, 56 MiB holes
    with raw_server(tmp_path, {"vol": (size, False)}) as (srv, paths):
        run("nbdcopy", str(src), srv.uri("vol"))
        assert open(paths["vol"], "rb").read() == src.read_bytes()
        # the target stayed sparse: nbdcopy zeroed holes with WRITE_ZEROES/TRIM, not data
        assert file_blocks_bytes(paths["vol"]) < 24 * MiB
        out = tmp_path / "out.raw"
        run("nbdcopy", srv.uri("vol"), str(out))
        assert out.read_bytes() == src.read_bytes()
        assert file_blocks_bytes(str(out)) < 24 * MiB  # holes came across as holes


def test_many_clients_and_connections_write_disjoint_regions_at_once(tmp_path):
    require_tool("qemu-io")
    size = 32 * MiB
    with raw_server(tmp_path, {"vol": (size, False)}) as (srv, paths):
        uri = srv.uri("vol")
        errors = []

        def writer(i):
            try:
                base = i * 4 * MiB
                _qemu_io(uri, *(f"write -P {i + 1} {base + k * 65536 + i} 60000" for k in range(48)))
            except AssertionError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        data = open(paths["vol"], "rb").read()
        for i in range(6):
            for k in range(48):
                o = i * 4 * MiB + k * 65536 + i
                assert data[o:o + 60000] == bytes([i + 1]) * 60000
        # multi-conn: nbdcopy with several connections reads it all back consistently
        out = tmp_path / "out.raw"
        run("nbdcopy", "--connections=4", uri, str(out))
        assert out.read_bytes() == data
    assert not os.path.exists(tmp_path / "nbd.sock")  # stop() removed the socket
