"""A full first cycle with TLS against the same cycle in plaintext, measured in the same run.

Run on demand:  PYTHONPATH=src:. python -m pytest bench/bench_mirror_tls.py -s

The volume is the one bench_mirror.py uses (thirds of random, text-like and
zero 1 MiB pieces; CYCLEMIRROR_BENCH_FULL_MB, default 2048), shipped with
lz4 over loopback to a target in another process until it has applied and
synced it.  The target presents an EC P-256 certificate made by openssl;
the source verifies it (as `mirror start --tls-ca` does).  Rounds
(CYCLEMIRROR_BENCH_ROUNDS, default 3) alternate plaintext and TLS; medians
and the ratio TLS/plaintext throughput are printed, with the cipher that
OpenSSL negotiated.  Target of issue 17: TLS >= 0.6x plaintext.  Kernel TLS
is not available (Python 3.11's ssl has no OP_ENABLE_KTLS; this kernel has no
tls module), so TLS runs in user space in both processes.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench.bench_mirror import ENV, FULL_MB, ROUNDS, MiB, make_mixed_file, wait_file

from cyclemirror import keys
from tests.support.certs import Certs

TARGET_SCRIPT = """
import os, sys, time
from cyclemirror import keys
from cyclemirror.daemon import memtune
memtune.keep_freed_buffers()
from cyclemirror.store import Store
from cyclemirror.receiver import TargetServer
from cyclemirror.wire.handshake import TlsConfig
path, keyfile, portfile, cert, pkey = sys.argv[1:]
tls = TlsConfig(certfile=cert, keyfile=pkey) if cert != "-" else None
t = TargetServer(Store.create(path), keys.read_key_file(keyfile), ("127.0.0.1", 0), tls=tls)
t.start()
open(portfile + ".tmp", "w").write(str(t.address[1]))
os.replace(portfile + ".tmp", portfile)
while True:
    time.sleep(3600)
"""


def one_cycle(tmp, key, keyfile, src, tls_files, ca):
    from cyclemirror.sender import MirrorDriver, MirrorOptions
    from cyclemirror.sender.driver import TargetSpec
    from cyclemirror.store import Store
    from cyclemirror.wire.handshake import TlsConfig

    portfile = os.path.join(tmp, "port")
    cert, pkey = tls_files if tls_files else ("-", "-")
    target = subprocess.Popen([sys.executable, "-c", TARGET_SCRIPT, os.path.join(tmp, "dst"),
                               keyfile, portfile, cert, pkey], env=ENV)
    try:
        port = int(wait_file(portfile))
        store = Store.create(os.path.join(tmp, "src"))
        vol = store.import_volume("v", src)
        tls = TlsConfig(cafile=ca, server_hostname="localhost") if tls_files else None
        stats = {}
        d = MirrorDriver(vol, [TargetSpec("127.0.0.1", port, key, tls=tls)], key,
                         MirrorOptions(interval=3600, codec="lz4",
                                       on_applied=lambda c, lab, s: stats.update(s)),
                         store=store)
        os.sync()
        t0 = time.perf_counter()
        d.start()
        d.sync(3600)
        secs = time.perf_counter() - t0
        cipher = None
        link = d.runs[0].link
        if link is not None and hasattr(link.link.sock, "cipher"):
            cipher = link.link.sock.cipher()
        d.stop()
        store.close()
        return secs, stats.get("bytes_wire"), cipher
    finally:
        target.kill()
        target.wait(10)


def test_full_first_cycle_with_tls_against_plaintext():
    size = FULL_MB * MiB
    key = keys.generate_key()
    times = {"plaintext": [], "tls": []}
    ciphers = set()
    with tempfile.TemporaryDirectory(dir=os.environ.get("CYCLEMIRROR_BENCH_DIR")) as tmp:
        certs = Certs(os.path.join(tmp, "certs"))
        server = certs.server("target")
        keyfile = os.path.join(tmp, "key")
        keys.write_key_file(keyfile, key)
        src = os.path.join(tmp, "source.img")
        make_mixed_file(src, size)
        for rnd in range(ROUNDS):
            for name in ("plaintext", "tls"):
                sub = os.path.join(tmp, f"r{rnd}-{name}")
                os.makedirs(sub)
                secs, _wire, cipher = one_cycle(sub, key, keyfile, src,
                                                server if name == "tls" else None,
                                                certs.ca_cert)
                times[name].append(secs)
                if cipher:
                    ciphers.add(cipher[0] + " " + cipher[1])
                shutil.rmtree(sub)
    print(f"\n== full first cycle, {FULL_MB} MiB mixed volume, lz4, TLS against plaintext, "
          f"{ROUNDS} rounds, median ==")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:10s} {med:8.2f} s  {size / MiB / med:8.1f} MiB/s   "
              f"(all: {', '.join(f'{t:.2f}' for t in ts)})")
    ratio = statistics.median(times["plaintext"]) / statistics.median(times["tls"])
    print(f"  throughput TLS / plaintext = {ratio:.2f}x (target >= 0.6x); "
          f"cipher: {', '.join(sorted(ciphers)) or '?'}")
