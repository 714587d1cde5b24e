"""Write pacing end to end: real daemons, the real CLI, a writer through NBD.

Proves: a mirror started with ``--rpo 2 --pace`` whose copy is capped
(``--bwlimit``) holds the volume's writer: status (JSON, table and metrics)
shows the limit and the writes that waited; the writer is never stopped and
the target's image equals the volume once the writer stops and a sync lands;
when the target goes away, pacing lifts (slowing the application cannot bring
a target back) while the objective is reported violated; ``--pace`` without
``--rpo`` is refused with a message that says what to add.
"""

import os
import threading

import pytest

from cyclemirror.daemon.nbd_client import NbdClient
from tests.support.daemons import DaemonPool, make_key, wait_for

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture
def daemons(tmp_path):
    with DaemonPool(tmp_path) as pool:
        yield pool.start


class Writer(threading.Thread):
    """Rewrites the volume in 256 KiB writes of random bytes, as fast as the export lets it."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.halt = threading.Event()
        self.written = 0
        self.error = None
        self.last = {}

    def run(self):
        try:
            with NbdClient("v", unix_path=self.sock) as nbd:
                n = 0
                while not self.halt.is_set():
                    off = (n * 256 * 1024) % SIZE
                    data = os.urandom(256 * 1024)  # incompressible: the cap binds
                    nbd.write(off, data)
                    self.last[off] = data
                    self.written += len(data)
                    n += 1
                nbd.flush()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self):
        self.halt.set()
        self.join(60)
        assert not self.is_alive(), "the writer is stuck"
        if self.error is not None:
            raise self.error


def pacing(daemon):
    row = daemon.status()["mirrors"][0]
    return row, row["pacing"]


def test_a_capped_mirror_paces_its_writer_and_lifts_it_when_the_target_is_gone(daemons, tmp_path):
    key = make_key(tmp_path / "k")
    target = daemons("dst", key_file=key, listen=True, nbd=False)
    source = daemons("src", key_file=key)
    source.cli("volume", "create", "v", "--size", str(SIZE))
    out = source.cli("mirror", "start", "v", "--to", target.listen, "--rpo", "2", "--pace",
                     "--bwlimit", "4M").stdout
    assert "pacing writers" in out, out
    source.cli("mirror", "sync", "v", "--timeout", "60")
    assert pacing(source)[1]["limit"] is None  # caught up: nobody is held

    writer = Writer(source.nbd_sock)
    writer.start()
    try:
        wait_for(lambda: (pacing(source)[1]["paced_writes"] or 0) > 10, 60,
                 "the writer to be paced")
        row, pace = pacing(source)
        assert pace["limit"] is not None and pace["limit"] >= 1 * MiB, pace
        assert pace["waited_seconds"] > 0
        # The limit follows the prediction (it lifts right after an apply): wait for the table.
        wait_for(lambda: "writers paced to" in source.cli("status").stdout, 60,
                 "the status table to show the pace")
        metrics = source.scrape()
        assert "cyclemirror_mirror_write_pace_limit_bytes_per_second{" in metrics
        assert "cyclemirror_mirror_write_pace_wait_seconds_total{" in metrics
        before = writer.written
        wait_for(lambda: writer.written > before + 2 * MiB, 60,
                 "the paced writer to keep writing (slowed, never stopped)")
    finally:
        writer.stop()
    source.cli("mirror", "sync", "v", "--timeout", "120", timeout=180)
    wait_for(lambda: pacing(source)[1]["limit"] is None, 30, "pacing to lift once caught up")
    image = target.status()["incoming"][0]["image"]
    with open(image, "rb") as fh:
        for off, data in writer.last.items():
            fh.seek(off)
            assert fh.read(len(data)) == data, f"target image differs at {off}"

    writer = Writer(source.nbd_sock)
    writer.start()
    try:
        wait_for(lambda: pacing(source)[1]["limit"] is not None, 60, "pacing to start again")
        target.stop()
        wait_for(lambda: pacing(source)[1]["limit"] is None, 60,
                 "pacing to lift with the target gone")
        row, _pace = pacing(source)
        assert row["phase"] in ("reconnecting", "broken") or row["last_error"], row
        before = writer.written
        wait_for(lambda: writer.written > before + 8 * MiB, 60,
                 "the writer to run unpaced with the target gone")
    finally:
        writer.stop()


def test_pace_without_an_objective_is_refused(daemons, tmp_path):
    key = make_key(tmp_path / "k")
    source = daemons("src", key_file=key)
    source.cli("volume", "create", "v", "--size", "1M")
    proc = source.cli("mirror", "start", "v", "--to", "127.0.0.1:9", "--pace", check=False)
    assert proc.returncode == 2 and "pace needs rpo" in proc.stderr, proc.stderr
    assert source.status()["mirrors"] == []
