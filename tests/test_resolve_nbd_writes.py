"""NBD writes that land on the new primary while a split brain is resolved against it.

``mirror resolve V --discard-changes-on THIS-NODE`` on the new primary turns its
volume back into the old primary's mirror image and keeps the writes it took
since the promotion in a file (receiver/discard.py, receiver/turnback.py).  An
NBD client may still be connected and writing meanwhile.  Each of its writes
must either be refused (EPERM, with the reason) or be in the kept file: an
acknowledged write that is in neither would be lost silently.

Two real daemons driven through the CLI; the writer is one qemu-io process on
the new primary's export, fed a write at a time (each with FUA, so each
acknowledgement is a durable write) before, during and after the resolve.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading

import pytest

from tests.support.daemons import DaemonPool, make_key, wait_for
from tests.support.tools import require_tool

MiB = 1 << 20
SIZE = 8 * MiB
BLOCK = 4096
FIRST = 4 * MiB  # the writer's blocks: FIRST, FIRST + 4 KiB, ... one pattern each
WROTE = re.compile(rb"wrote 4096/4096 bytes at offset (\d+)")


def uri(d, name: str) -> str:
    return f"nbd+unix:///{name}?socket={d.nbd_sock}"


def qemu_io(d, name: str, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", "raw", *args, uri(d, name)], check=True,
                   capture_output=True, timeout=120)


def role_row(d, volume: str) -> dict:
    return next((r for r in d.status().get("roles", []) if r.get("volume") == volume), {})


class Writer:
    """One qemu-io on an export, taking ``write -f`` commands on its stdin one at a time
    (qemu-io runs one command per wake-up of its stdin: each waits for the previous
    one's answer)."""

    def __init__(self, d, name: str):
        # stdbuf: qemu-io answers each command at once, not when its stdio buffer fills
        self.proc = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw", uri(d, name)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.sent: list[int] = []  # block index of each write sent, in order
        self.lines: list[bytes] = []
        self.answers = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                if WROTE.search(line) or b"write failed" in line:
                    self.answers += 1
                self._cond.notify_all()
        with self._cond:
            self.answers = -1  # qemu-io is gone
            self._cond.notify_all()

    @property
    def out(self) -> bytes:
        with self._cond:
            return b"".join(self.lines)

    def acked(self) -> set[int]:
        return {(int(m) - FIRST) // BLOCK for m in WROTE.findall(self.out)}

    def write(self, index: int) -> None:
        """Write block ``index`` (its own pattern) and wait for the answer."""
        self.sent.append(index)
        # pattern: from the block's index (mod 251, never 0: an unwritten block reads 0)
        self.proc.stdin.write(f"write -f -P {index % 251 + 1} {FIRST + index * BLOCK} "
                              f"{BLOCK}\n".encode())
        self.proc.stdin.flush()
        with self._cond:
            if not self._cond.wait_for(lambda: self.answers in (-1, len(self.sent)), 60):
                raise AssertionError(f"qemu-io did not answer write {index}: {self.out!r}")
            if self.answers == -1:
                raise AssertionError(f"qemu-io exited: {self.out[-2000:]!r}")

    def close(self) -> None:
        self.proc.stdin.write(b"quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self._reader.join(timeout=120)


@pytest.fixture
def pair(tmp_path):
    require_tool("qemu-io")
    require_tool("stdbuf")
    key = make_key(tmp_path / "mirror.key")
    with DaemonPool(tmp_path) as pool:
        a = pool.start("a", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hosta"))
        b = pool.start("b", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hostb"))
        yield a, b


def test_writes_during_a_resolve_that_discards_this_node_are_kept_or_refused(pair):
    a, b = pair
    a.cli("volume", "create", "v", "--size", str(SIZE))
    qemu_io(a, "v", f"write -P 1 0 {MiB}", "flush")
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "3600")
    a.cli("mirror", "sync", "v")
    qemu_io(a, "v", f"write -P 3 {3 * MiB} 64k", "flush")  # a's side of the split brain
    a.kill()
    b.cli("mirror", "promote", "hosta/v", "--force")
    a.start()
    wait_for(lambda: role_row(a, "v").get("role") == "demoted", 60, "a to learn it was demoted")

    writer = Writer(b, "v")
    stop = threading.Event()
    before = 8  # written and answered before the resolve starts

    def keep_writing():
        i = before
        while not stop.is_set() and i < 900:
            writer.write(i)
            i += 1

    fresh: dict[int, bool] = {}  # block -> acknowledged, each by a new connection

    def connect_and_write():
        i = 950
        while not stop.is_set() and i < SIZE // BLOCK - FIRST // BLOCK:
            proc = subprocess.run(["qemu-io", "-f", "raw", "-c",
                                   f"write -f -P {i % 251 + 1} {FIRST + i * BLOCK} {BLOCK}",
                                   uri(b, "v")], capture_output=True, timeout=60)
            # refused: the export is gone, or the write failed with EPERM
            fresh[i] = proc.returncode == 0 and WROTE.search(proc.stdout) is not None
            i += 1

    for i in range(before):
        writer.write(i)
    assert writer.acked() == set(range(before)), writer.out
    threads = [threading.Thread(target=keep_writing),
               threading.Thread(target=connect_and_write)]
    for t in threads:
        t.start()
    try:
        out = json.loads(b.cli("mirror", "resolve", "v", "--discard-changes-on", "hostb",
                               "--json").stdout)
    finally:
        stop.set()
        for t in threads:
            t.join()
    # After the resolve returned, the same connection's writes are refused.
    after = list(range(900, 908))
    for i in after:
        writer.write(i)
    writer.close()

    assert out["discarded_here"] and len(out["kept"]) == 1, out
    acked = writer.acked() | {i for i, ok in fresh.items() if ok}
    refused = writer.out.count(b"Operation not permitted")
    # Every write got an answer: acknowledged or refused with EPERM, nothing else.
    assert len(writer.acked()) + refused == len(writer.sent), writer.out[-2000:]
    assert not acked & set(after), "a write after the resolve was acknowledged"
    # Every acknowledged write is in the kept file, with its own pattern.
    with open(out["kept"][0]["path"], "rb") as f:
        for i in sorted(acked):
            f.seek(FIRST + i * BLOCK)
            assert f.read(BLOCK) == bytes([i % 251 + 1]) * BLOCK, (
                f"acknowledged write {i} at {FIRST + i * BLOCK} is not in the kept file")
    assert out["kept"][0]["bytes"] == len(acked) * BLOCK, (out, len(acked))
    # The image is the old primary's cycle again, none of the writers' blocks in it.
    assert role_row(b, "v")["role"] == "secondary"
    with open(f"{b.store}/mirrors/{a.node_id}/v.img", "rb") as f:
        f.seek(FIRST)
        assert f.read(SIZE - FIRST) == bytes(SIZE - FIRST)

