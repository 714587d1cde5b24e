"""NBD over TLS with pre-shared keys: our server against nbdkit --tls=require, same run.

Run on demand:  PYTHONPATH=src:. python -m pytest bench/bench_nbd_tls.py -s
(CYCLEMIRROR_BENCH_NBD_TLS_MB sets the image size, default 1024;
CYCLEMIRROR_BENCH_ROUNDS the number of interleaved rounds, default 5.)

Client: nbdcopy (libnbd, GnuTLS), with its defaults (multi-conn: 4
connections, 64 requests in flight each), over TCP loopback, with
``nbds://alice@127.0.0.1:PORT/?tls-psk-file=FILE`` and a key made by psktool.
Two workloads: read the whole export to ``null:``, and write a random source
file (page cache warm) over the whole export.  Servers, each in its own
process, on the same raw image:
  * nbdkit-tls  ``nbdkit --tls=require --tls-psk=FILE file IMAGE`` (GnuTLS)
  * ours-tls    our NbdServer with ``NbdTls(psk_file=FILE)`` on a writable
                RawFileBackend (OpenSSL, the relay thread of cext/tlsrelay.pyx)
  * nbdkit      the same nbdkit without TLS, and
  * ours        our server without TLS: what TLS costs each
Rounds interleave the servers with the order rotated each round, so a busy
neighbour on this shared machine hits all alike.  Prints median MiB/s and the
ratios ours-tls / nbdkit-tls and TLS / plaintext; never asserts a speed.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time

import pytest

from tests.support.tools import require_tool

MiB = 1 << 20
SIZE_MB = int(os.environ.get("CYCLEMIRROR_BENCH_NBD_TLS_MB", "1024"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "5"))
SERVERS = ["nbdkit-tls", "ours-tls", "nbdkit", "ours"]

OUR_SERVER = """
import os, sys, time
from cyclemirror.nbd import NbdServer, RawFileBackend
from cyclemirror.nbd.tls import NbdTls
image, keys, portfile = sys.argv[1:]
backend = RawFileBackend(image, readonly=False)
tls = NbdTls(psk_file=keys) if keys != "-" else None
srv = NbdServer(lambda name: backend, list_names=lambda: [""], tcp=("127.0.0.1", 0), tls=tls)
srv.start()
open(portfile + ".tmp", "w").write(str(srv.tcp_address[1]))
os.replace(portfile + ".tmp", portfile)
while True:
    time.sleep(3600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def _start(kind: str, image: str, keys: str, tmp) -> tuple[subprocess.Popen, int]:
    if kind.startswith("nbdkit"):
        port = _free_port()
        tls = ["--tls=require", f"--tls-psk={keys}"] if kind.endswith("tls") else []
        proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
                                 "-p", str(port), *tls, "file", image],
                                stderr=subprocess.DEVNULL)
        _wait_port(port, proc)
        return proc, port
    portfile = str(tmp / f"{kind}.port")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", OUR_SERVER, image,
                             keys if kind.endswith("tls") else "-", portfile], env=env)
    deadline = time.monotonic() + 30
    while not os.path.exists(portfile):
        assert proc.poll() is None and time.monotonic() < deadline, "our server did not start"
        time.sleep(0.05)
    return proc, int(open(portfile).read())


def _copy(src: str, dst: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", src, dst], check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t0


def test_nbd_tls_psk_throughput_against_nbdkit(tmp_path):
    for tool in ("nbdkit", "nbdcopy", "psktool"):
        require_tool(tool)
    keys = str(tmp_path / "keys.psk")
    subprocess.run(["psktool", "-u", "alice", "-p", keys], check=True, capture_output=True)
    image, source = str(tmp_path / "image.raw"), str(tmp_path / "source.raw")
    with open(source, "wb") as f:
        for _ in range(SIZE_MB):
            f.write(os.urandom(MiB))
    with open(image, "wb") as f:
        f.truncate(SIZE_MB * MiB)
    subprocess.run(["nbdcopy", source, image], check=True)  # both files in the page cache
    servers = {}
    try:
        for kind in SERVERS:
            servers[kind] = _start(kind, image, keys, tmp_path)
        rates = {(k, w): [] for k in SERVERS for w in ("read", "write")}
        for r in range(ROUNDS):
            order = SERVERS[r % len(SERVERS):] + SERVERS[:r % len(SERVERS)]
            for kind in order:
                port = servers[kind][1]
                if kind.endswith("tls"):
                    uri = f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={keys}"
                else:
                    uri = f"nbd://127.0.0.1:{port}/"
                rates[kind, "read"].append(SIZE_MB / _copy(uri, "null:"))
                rates[kind, "write"].append(SIZE_MB / _copy(source, uri))
    finally:
        for proc, _port in servers.values():
            proc.kill()
            proc.wait()
    med = {key: statistics.median(v) for key, v in rates.items()}
    print(f"\nnbdcopy over TCP loopback, {SIZE_MB} MiB, {ROUNDS} rounds, medians (MiB/s):")
    print(f"{'server':12} {'read':>9} {'write':>9}")
    for kind in SERVERS:
        print(f"{kind:12} {med[kind, 'read']:9.0f} {med[kind, 'write']:9.0f}")
    for w in ("read", "write"):
        print(f"{w}: ours-tls / nbdkit-tls = {med['ours-tls', w] / med['nbdkit-tls', w]:.2f}x;"
              f" TLS / plaintext: ours {med['ours-tls', w] / med['ours', w]:.2f}x,"
              f" nbdkit {med['nbdkit-tls', w] / med['nbdkit', w]:.2f}x")
    for key, v in sorted(rates.items()):
        print(f"  {key[0]:10} {key[1]:5}: " + ", ".join(f"{x:.0f}" for x in v))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s"]))
