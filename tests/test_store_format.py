"""Golden tests of the store's on-disk format (docs/store.md, "Layout on disk").

A store written by one version must open in the next, and recovery reads the
zero log byte by byte, so these pin file names, JSON fields and record bytes.
A change here is a format change: bump the format number and migrate.
"""

from __future__ import annotations

import json
import os
import struct

import xxhash

from cyclemirror.store import Store
from cyclemirror.store.zerolog import MAGIC, RECORD_SIZE, encode_record


def test_zero_log_record_bytes_are_pinned():
    assert MAGIC == b"CMZLOG1\n" and RECORD_SIZE == 24
    assert encode_record(5, 3).hex() == "05000000000000000300000000000000b536f1cd96245abe"
    assert encode_record(1 << 40, 1).hex() == "000000000001000001000000000000002816b0f174f1cac1"
    # and the rule behind them: <start u64, count u64, xxh64(those 16 bytes) u64>, little-endian
    head = struct.pack("<QQ", 77, 9)
    assert encode_record(77, 9) == head + struct.pack("<Q", xxhash.xxh64_intdigest(head))


def test_store_and_volume_files_are_as_documented(tmp_path):
    root = str(tmp_path / "s")
    with Store.create(root, node_name="n1") as store:
        vol = store.create_volume("v", 1 << 20, 8192)
        assert sorted(os.listdir(root)) == [".lock", "store.json", "volumes"]
        with open(os.path.join(root, "store.json")) as f:
            meta = json.load(f)
        assert set(meta) == {"format", "node_id", "node_name"} and meta["format"] == 1
        assert meta["node_name"] == "n1" and len(meta["node_id"]) == 32
        vdir = os.path.join(root, "volumes", "v")
        assert sorted(os.listdir(vdir)) == ["base.img", "overlay-0.img", "overlay-0.zlog", "volume.json"]
        with open(os.path.join(vdir, "overlay-0.zlog"), "rb") as f:
            assert f.read() == MAGIC
        vol.write_zeroes(8192, 16384)
        with open(os.path.join(vdir, "overlay-0.zlog"), "rb") as f:
            assert f.read() == MAGIC + encode_record(1, 2)
        vol.freeze()
        with open(os.path.join(vdir, "volume.json")) as f:
            state = json.load(f)
        assert set(state) == {"format", "size", "block_size", "created", "merged_through", "merging", "merge_mode",
                              "overlays"}
        assert (state["format"], state["size"], state["block_size"]) == (1, 1 << 20, 8192)
        assert state["merged_through"] == -1 and state["merging"] is None and state["merge_mode"] is None
        assert [o["number"] for o in state["overlays"]] == [0, 1]
        assert isinstance(state["overlays"][0]["closed_at"], float) and state["overlays"][1]["closed_at"] is None
        for name in ("base.img", "overlay-0.img", "overlay-1.img"):
            assert os.path.getsize(os.path.join(vdir, name)) == 1 << 20
        vol.merge_through(0)
        assert sorted(os.listdir(vdir)) == ["base.img", "overlay-1.img", "overlay-1.zlog", "volume.json"]
        with open(os.path.join(vdir, "volume.json")) as f:
            state = json.load(f)
        assert state["merged_through"] == 0 and [o["number"] for o in state["overlays"]] == [1]
