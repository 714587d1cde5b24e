"""A damaged state file of one volume or mirror never stops the daemon serving the others.

A real daemon is stopped, files of one volume, one outgoing mirror definition
and one incoming mirror are damaged the way the fuzz harnesses found they
could be (each passed the old checks and escaped as KeyError, AttributeError
or a name with a newline), and the daemon is started again: it starts, says
what is damaged in status, and serves everything else over NBD.
"""

import json
import os
import subprocess

import pytest
import xxhash

from tests.support.daemons import DaemonPool, make_key
from tests.support.tools import require_tool


@pytest.fixture
def daemons(tmp_path):
    with DaemonPool(tmp_path) as pool:
        yield pool.start


def _checksummed(body) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return json.dumps({"body": body, "xxh64": xxhash.xxh64_hexdigest(text.encode())})


def test_damaged_files_of_one_volume_and_mirror_leave_the_others_served(tmp_path, daemons):
    require_tool("nbdinfo")
    key = make_key(tmp_path / "key")
    d = daemons("a", key_file=key, listen=True)
    d.cli("volume", "create", "good", "--size", "1M")
    d.cli("volume", "create", "bad", "--size", "1M")
    d.cli("mirror", "start", "good", "--to", "127.0.0.1:9", "--interval", "3600")
    node = d.node_id
    assert d.stop() == 0

    # volume.json without "merging": validated with .get(), indexed by the constructor.
    vpath = os.path.join(d.store, "volumes", "bad", "volume.json")
    with open(vpath) as fh:
        state = json.load(fh)
    del state["merging"]
    with open(vpath, "w") as fh:
        json.dump(state, fh)
    # An incoming mirror whose state has a correct checksum and a body that is a list.
    mdir = os.path.join(d.store, "mirrors", "feedbeef")
    os.makedirs(mdir)
    with open(os.path.join(mdir, "x.state.json"), "w") as fh:
        fh.write(_checksummed([1, 2, 3]))
    # A mirror definition whose volume name ends in a newline, beside the good one.
    bpath = os.path.join(d.store, "daemon", "mirrors.json")
    with open(bpath) as fh:
        book = json.load(fh)
    bad_entry = {"spec": dict(book["mirrors"][0]["spec"], volume="bad\n"), "broken": False}
    book["mirrors"].insert(0, bad_entry)
    with open(bpath, "w") as fh:
        json.dump(book, fh)

    d.start()
    doc = d.status()
    assert doc["node"]["id"] == node
    vols = {v["name"]: v for v in doc["volumes"]}
    assert "error" not in vols["good"] and "merging" in vols["bad"]["error"]
    rows = [r for r in doc["incoming"] if r["source_node"] == "feedbeef"]
    assert len(rows) == 1 and "not an object" in rows[0]["error"]
    assert len(doc["mirror_errors"]) == 1 and "entry 1" in doc["mirror_errors"][0]
    assert [(r["volume"], r["target"]) for r in doc["mirrors"]] == [("good", "127.0.0.1:9")]

    sock = d.nbd_sock
    info = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///good?socket={sock}"],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and info.stdout.strip() == str(1 << 20), info.stderr
    refused = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///bad?socket={sock}"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    # Still serving after the refusal; the damaged definition is still in the file.
    again = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///good?socket={sock}"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0
    d.cli("mirror", "break", "good", "--now")
    with open(bpath) as fh:
        assert bad_entry in json.load(fh)["mirrors"]
