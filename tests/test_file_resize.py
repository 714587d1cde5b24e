"""A mirrored file object whose live file changes size, with real daemons on XFS.

What happens today (docs/files.md: an object keeps the size it had at
``file add``): a plain writer appends to the live file between cycles; the
next freeze fails naming both sizes, the mirror stops, and

* a ``mirror sync`` waiting for that cycle fails with that error instead of
  waiting out its deadline (it used to hang: the cycle it waited for would
  never come),
* ``status`` shows the mirror's row broken with the error,
* the target keeps exactly the last freeze (its image, and its size);

and once the file has its size back, ``mirror resume`` goes on with a delta
(no second full copy) and the target equals the file again.
"""

from __future__ import annotations

import os
import re
import subprocess

from tests.support.daemons import DaemonPool, make_key

K = 4096
MiB = 1 << 20


def image_of(target, source) -> bytes:
    rows = [r for r in target.status()["incoming"] if r["source_node"] == source.node_id]
    assert len(rows) == 1, rows
    with open(rows[0]["image"], "rb") as fh:
        return fh.read()


def test_a_file_that_grows_stops_the_mirror_visibly_and_the_target_keeps_its_freeze(
        xfs_mount, tmp_path):
    d = os.path.join(xfs_mount, "rs-" + tmp_path.name)
    os.makedirs(d)
    path = os.path.join(d, "f.img")
    with open(path, "wb") as fh:
        fh.write(os.urandom(64 * K))
        fh.truncate(MiB)
    try:
        with DaemonPool(tmp_path) as pool:
            key = make_key(tmp_path / "k")
            a = pool.start("a", key_file=key)
            b = pool.start("b", key_file=key, listen=True)
            a.cli("file", "add", "f", path)
            a.cli("mirror", "start", "f", "--to", b.listen, "--interval", "3600")
            a.cli("mirror", "sync", "f")
            with open(path, "rb") as fh:
                frozen = fh.read()
            assert image_of(b, a) == frozen

            with open(path, "ab") as fh:  # a writer appends: the file grows
                fh.write(b"appended" * 1000)
            grown = os.path.getsize(path)
            r = a.cli("mirror", "sync", "f", check=False)  # answers, does not hang
            assert r.returncode != 0
            assert f"now {grown} bytes, it was {MiB}" in r.stderr, r.stderr
            row = a.status()["mirrors"][0]
            assert row["phase"] == "broken", row
            assert f"now {grown} bytes" in (row["last_error"] or ""), row
            assert image_of(b, a) == frozen  # the last freeze, its size too

            r = a.cli("mirror", "sync", "f", check=False)  # still stopped: says why
            assert r.returncode != 0 and "resume it first" in r.stderr, r.stderr

            os.truncate(path, MiB)  # its size back, and a write meanwhile
            with open(path, "r+b") as fh:
                fh.seek(128 * K)
                fh.write(b"after" * 100)
            a.cli("mirror", "resume", "f")
            a.cli("mirror", "sync", "f")
            with open(path, "rb") as fh:
                assert image_of(b, a) == fh.read()
            row = a.status()["mirrors"][0]
            assert row["phase"] != "broken" and row["last_error"] is None, row
            full = re.findall(r"mirror f -> \S+: cycle \d+ applied.*full copy", a.log())
            assert len(full) == 1, a.log()
            a.cli("mirror", "break", "f")
            a.cli("mirror", "rm", "f")
            a.cli("file", "rm", "f")
    finally:
        subprocess.run(["rm", "-rf", d], check=False)
