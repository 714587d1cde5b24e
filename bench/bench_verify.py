"""Verify of a mirror against ``cmp`` of the two image files and ``rsync --checksum --dry-run``.

Run on demand:  PYTHONPATH=src python -m pytest bench/bench_verify.py -s

A volume of CYCLEMIRROR_BENCH_VERIFY_MB (default 4096) MiB of mixed data
(thirds of random, text-like and zero 1 MiB pieces, as bench_mirror.py) is
mirrored once to a target in its own process on this host.  Then, in
CYCLEMIRROR_BENCH_ROUNDS (default 3) interleaved rounds, each of these
compares the source's image with the target's, from a cold cache and then
warm (the same command again right after):

* ``verify``: ``sender.verify.VerifyRun`` here against the target process
  (both sides read their image once, in parallel; digests on the wire);
* ``cmp``: ``cmp -s`` of the source volume's base file and the mirror image
  (the source has had no write since the copy, so its image is its base);
* ``rsync``: ``rsync --checksum --dry-run`` of one to the other (both read
  whole, sender and receiver in two processes);
* ``scrub``: the target alone against its record (for scale; no peer).

Cold: ``os.sync()``, then ``posix_fadvise(DONTNEED)`` over every file the
contenders read (only those files' clean pages leave the cache: the machine
is shared, so ``/proc/sys/vm/drop_caches`` is not used); ``fincore`` shows
what is left before each cold run.  The verify's wire bytes for the clean
mirror are printed against the volume size.  Nothing asserts a time.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import cyclemirror
from cyclemirror import keys
from cyclemirror.daemon import memtune

SIZE_MB = int(os.environ.get("CYCLEMIRROR_BENCH_VERIFY_MB", "4096"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
MiB = 1 << 20
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cyclemirror.__file__)))
ENV = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
memtune.keep_freed_buffers()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mirror import Target, make_mixed_file  # noqa: E402 - the same volume and target


def evict(paths):
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_mib(paths) -> float:
    """MiB of these files in the page cache (fincore), or -1 if it cannot tell."""
    if not shutil.which("fincore"):
        return -1.0
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *paths],
                         capture_output=True, text=True).stdout.split()
    return sum(int(x) for x in out if x.isdigit()) / MiB


def test_verify_against_cmp_and_rsync_checksum():
    from cyclemirror.receiver.scrub import scrub_image
    from cyclemirror.receiver.state import MirrorState
    from cyclemirror.sender import MirrorDriver, MirrorOptions
    from cyclemirror.sender.driver import TargetSpec
    from cyclemirror.sender.verify import VerifyRun
    from cyclemirror.store import Store

    size = SIZE_MB * MiB
    key = keys.generate_key()
    times: dict[str, dict[str, list[float]]] = {}
    wire = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("CYCLEMIRROR_BENCH_DIR")) as tmp:
        src_file = os.path.join(tmp, "source.img")
        make_mixed_file(src_file, size)
        keyfile = os.path.join(tmp, "key")
        keys.write_key_file(keyfile, key)
        target = Target(tmp, keyfile, "dst")
        store = Store.create(os.path.join(tmp, "src"))
        vol = store.import_volume("v", src_file)
        os.unlink(src_file)
        spec = TargetSpec("127.0.0.1", target.port, key)
        driver = MirrorDriver(vol, [spec], key, MirrorOptions(interval=3600), store=store)
        try:
            driver.start()
            driver.sync(3600)
            ndir = os.path.join(target.path, "mirrors", store.node_id)
            image = os.path.join(ndir, "v.img")
            state = os.path.join(ndir, "v.state.json")
            vdir = os.path.join(store.path, "volumes", "v")
            layers = [os.path.join(vdir, f) for f in os.listdir(vdir) if f.endswith(".img")]
            base = os.path.join(vdir, "base.img")
            files = [*layers, image]
            spec_vol = MirrorState.load(state).volumes[0]

            def verify():
                out = VerifyRun(driver.subject, 0, store, spec).run()
                assert out.mismatched.count() == 0
                wire.append(out.wire_sent + out.wire_received)

            def cmp():
                subprocess.run(["cmp", "-s", base, image], check=True)

            def rsync():
                out = subprocess.run(["rsync", "--checksum", "--dry-run", "--itemize-changes",
                                      "--inplace", base, image], check=True,
                                     capture_output=True, text=True).stdout
                assert out.strip() == "", out  # same content: nothing to transfer

            def scrub():
                out = scrub_image(state, image, spec_vol)
                assert out.bad.count() == 0 and out.unchecked_blocks == 0

            contenders = {"verify": verify, "cmp": cmp, "rsync": rsync, "scrub": scrub}
            left = []
            for _rnd in range(ROUNDS):
                for name, run in contenders.items():
                    evict(files)
                    left.append(cached_mib(files))
                    for temp in ("cold", "warm"):
                        t0 = time.perf_counter()
                        run()
                        times.setdefault(name, {}).setdefault(temp, []).append(
                            time.perf_counter() - t0)
        finally:
            driver.stop()
            store.close()
            target.close()

    med = statistics.median
    print(f"\n== verify of a {SIZE_MB} MiB mirror (1/3 random, 1/3 text, 1/3 zero), source and "
          f"target on this host, {ROUNDS} rounds, median ==")
    print(f"  cache left before the cold runs: at most {max(left):.1f} MiB "
          f"(fincore; -1 = unknown)")
    for name, by in times.items():
        print(f"  {name:7s} cold {med(by['cold']):7.2f} s ({size / MiB / med(by['cold']):7.0f} "
              f"MiB/s)   warm {med(by['warm']):7.2f} s ({size / MiB / med(by['warm']):7.0f} "
              f"MiB/s)   (cold: {', '.join(f'{t:.2f}' for t in by['cold'])}; warm: "
              f"{', '.join(f'{t:.2f}' for t in by['warm'])})")
    for temp in ("cold", "warm"):
        v = med(times["verify"][temp])
        print(f"  {temp}: verify / cmp = {med(times['cmp'][temp]) / v:.2f}x faster,  "
              f"verify / rsync --checksum = {med(times['rsync'][temp]) / v:.2f}x faster")
    print(f"  verify wire bytes for the clean mirror: {max(wire)} bytes = "
          f"{100.0 * max(wire) / size:.5f}% of the volume (target: < 0.1%)")
