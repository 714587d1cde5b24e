"""``cyclemirror demo``: a source and a target daemon on loopback, mirroring a live volume.

Needs nothing but the installed package.  In a fresh temporary directory it
makes a key, starts two ``cyclemirror serve`` processes (the target listens
on a free loopback port, the source serves NBD on a Unix socket), creates a
volume, starts a mirror with a one-second interval and writes to the volume
over NBD (the small client in ``daemon.nbd_client``) while cycles repeat,
showing the mirror's status as it goes.  Then it syncs, breaks, and compares
the target's mirror image with an export of the source volume byte for byte,
once as a file and once through the target's read-only NBD export of the
image (``mirror/<source node>/<volume>``), where a write must get EPERM.
It prints a summary and removes everything it made; a mismatch exits with
``IntegrityError.exit_code``.

Each step is printed as the CLI command that does the same, so the output
doubles as a walk-through.  The daemons talk to us over their control
sockets exactly as the CLI does.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from cyclemirror.daemon.control import ControlClient
from cyclemirror.daemon.nbd_client import NbdClient
from cyclemirror.daemon.render import render_status
from cyclemirror.errors import (
    CycleMirrorError,
    DaemonUnavailableError,
    IntegrityError,
    StoreError,
)
from cyclemirror.units import format_duration, format_rate, format_size

VOLUME = "demo"
VOLUME_SIZE = 64 << 20
INTERVAL = 1.0
WRITE_SIZE = 64 << 10
STARTUP_TIMEOUT = 20.0
COMPARE_CHUNK = 4 << 20


def _say(text: str) -> None:
    print(text, flush=True)


class _DaemonProcess:
    def __init__(self, workdir: str, name: str, args: list[str]):
        self.name = name
        self.store = os.path.join(workdir, name)
        self.log_path = os.path.join(workdir, f"{name}.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cyclemirror.cli", "--store", self.store, "serve", *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise DaemonUnavailableError(
                    f"the {self.name} daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with ControlClient(self.store, timeout=5) as client:
                    return client.call("status")
            except DaemonUnavailableError:
                if time.monotonic() > deadline:
                    raise DaemonUnavailableError(
                        f"the {self.name} daemon did not start in {STARTUP_TIMEOUT:g}s:\n"
                        f"{self.log()}") from None
                time.sleep(0.05)

    def call(self, op: str, reply_timeout: float | None = 60.0, **args):
        with ControlClient(self.store, timeout=reply_timeout) as client:
            return client.call(op, **args)

    def log(self) -> str:
        try:
            with open(self.log_path) as fh:
                return fh.read()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Workload(threading.Thread):
    """Writes half-compressible 64 KiB blocks at random offsets, flushing now and then."""

    def __init__(self, nbd_socket: str, seconds: float):
        super().__init__(name="demo-workload", daemon=True)
        self.nbd_socket = nbd_socket
        self.seconds = seconds
        self.written = 0
        self.error: BaseException | None = None
        self.rng = random.Random(2024)

    def _block(self) -> bytes:
        text = (f"cyclemirror demo block {self.rng.getrandbits(32):08x} " * 40).encode()
        raw = text[: WRITE_SIZE // 2] + self.rng.randbytes(WRITE_SIZE // 2)
        return raw.ljust(WRITE_SIZE, b"\0")

    def run(self) -> None:
        try:
            with NbdClient(VOLUME, unix_path=self.nbd_socket) as nbd:
                # A first burst, so the full first cycle has data to ship.
                for offset in range(0, 16 << 20, WRITE_SIZE):
                    nbd.write(offset, self._block())
                    self.written += WRITE_SIZE
                nbd.flush()
                end = time.monotonic() + self.seconds
                count = 0
                while time.monotonic() < end:
                    offset = self.rng.randrange(VOLUME_SIZE // WRITE_SIZE) * WRITE_SIZE
                    nbd.write(offset, self._block())
                    self.written += WRITE_SIZE
                    count += 1
                    if count % 16 == 0:
                        nbd.flush()
                    time.sleep(0.004)  # a steady stream, not a flood: the demo shares the CPU
                nbd.flush()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc


def _status_line(row: dict) -> str:
    last = row.get("last_cycle") or {}
    progress = row.get("progress")
    extra = ""
    if progress:
        extra = f"  copying {format_size(progress['done'])}/{format_size(progress['total'])}"
    return (f"  cycle {row['cycle']:>3}  {row['phase']:<12} applied {row['applied_cycle']:>3}  "
            f"RPO age {format_duration(row.get('rpo_age')):>6}  last cycle "
            f"{format_size(last['bytes']) if last.get('bytes') is not None else '-':>10} in "
            f"{format_duration(last.get('duration'))}{extra}")


def _files_equal(a: str, b: str) -> tuple[bool, int | None]:
    """Compare two files chunk by chunk; return (equal, first differing offset)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(COMPARE_CHUNK), fb.read(COMPARE_CHUNK)
            if ca != cb:
                for i, (x, y) in enumerate(zip(ca, cb, strict=False)):
                    if x != y:
                        return False, offset + i
                return False, offset + min(len(ca), len(cb))
            if not ca:
                return True, None
            offset += len(ca)


def _export_equal(path: str, export: str, nbd_socket: str) -> tuple[bool, int | None]:
    """Compare a file with an NBD export (one connection: one applied cycle throughout)."""
    with open(path, "rb") as fa, NbdClient(export, unix_path=nbd_socket) as nbd:
        if nbd.size != os.fstat(fa.fileno()).st_size:
            return False, min(nbd.size, os.fstat(fa.fileno()).st_size)
        for offset in range(0, nbd.size, COMPARE_CHUNK):
            ca = fa.read(COMPARE_CHUNK)
            cb = nbd.read(offset, len(ca))
            if ca != cb:
                return False, offset + next(i for i, (x, y) in enumerate(zip(ca, cb, strict=True))
                                            if x != y)
    return True, None


def _write_is_refused(export: str, nbd_socket: str) -> bool:
    with NbdClient(export, unix_path=nbd_socket) as nbd:
        try:
            nbd.write(0, bytes(4096))
        except StoreError as exc:
            return "EPERM" in str(exc)
    return False


def run_demo(keep: bool = False, seconds: float = 6.0) -> int:
    from cyclemirror import keys

    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="cm-demo-")
    daemons: list[_DaemonProcess] = []
    try:
        _say(f"cyclemirror demo in {workdir}")
        key_file = os.path.join(workdir, "mirror.key")
        keys.write_key_file(key_file, keys.generate_key())
        _say("$ cyclemirror keygen --out mirror.key")
        target_nbd = os.path.join(workdir, "target-nbd.sock")
        target = _DaemonProcess(workdir, "target", ["--listen", "127.0.0.1:0",
                                                    "--nbd", f"unix:{target_nbd}",
                                                    "--key-file", key_file,
                                                    "--node-name", "demo-target"])
        daemons.append(target)
        nbd_socket = os.path.join(workdir, "source-nbd.sock")
        source = _DaemonProcess(workdir, "source", ["--nbd", f"unix:{nbd_socket}",
                                                    "--key-file", key_file,
                                                    "--node-name", "demo-source"])
        daemons.append(source)
        target_doc = target.wait_ready()
        source.wait_ready()
        address = target_doc["node"]["listen"]
        _say(f"$ cyclemirror --store target serve --listen {address} --nbd unix:{target_nbd} "
             "--key-file mirror.key &")
        _say(f"$ cyclemirror --store source serve --nbd unix:{nbd_socket} "
             "--key-file mirror.key &")

        source.call("volume.create", name=VOLUME, size=VOLUME_SIZE, block_size=4096)
        _say(f"$ cyclemirror --store source volume create {VOLUME} --size 64M")
        workload = _Workload(nbd_socket, seconds)
        workload.start()
        source.call("mirror.start", volume=VOLUME, to=address, interval=INTERVAL)
        _say(f"$ cyclemirror --store source mirror start {VOLUME} --to {address} "
             f"--interval {INTERVAL:g}")
        _say(f"  (writing to the volume over NBD for {seconds:g}s while cycles repeat)")
        while workload.is_alive():
            rows = source.call("status")["mirrors"]
            for row in rows:
                _say(_status_line(row))
            workload.join(1.0)
        if workload.error is not None:
            raise workload.error

        _say(f"$ cyclemirror --store source mirror sync {VOLUME}")
        (synced,) = source.call("mirror.sync", reply_timeout=None, volume=VOLUME, timeout=60)
        _say(f"  cycle {synced['applied_cycle']} applied on {address}")
        _say(f"$ cyclemirror --store source mirror break {VOLUME}")
        (broken,) = source.call("mirror.break", reply_timeout=None, volume=VOLUME)
        _say(f"  {broken['phase']} after cycle {broken['applied_cycle']}")

        export = os.path.join(workdir, "source-export.img")
        source.call("volume.export", reply_timeout=None, name=VOLUME, path=export)
        incoming = [m for m in target.call("status")["incoming"] if m["volume"] == VOLUME]
        if len(incoming) != 1 or not incoming[0]["image"]:
            raise IntegrityError(f"the target does not list exactly one mirror image of "
                                 f"{VOLUME}: {incoming}")
        image = incoming[0]["image"]
        _say("$ cyclemirror --store target status")
        _say("  " + render_status(target.call("status")).rstrip("\n").replace("\n", "\n  "))
        _say(f"$ cmp {export} {image}")
        equal, where = _files_equal(export, image)
        mirror_export = f"mirror/demo-source/{VOLUME}"
        _say(f"$ nbdcopy 'nbd+unix:///{mirror_export}?socket={target_nbd}' - | cmp {export} -")
        nbd_equal, nbd_where = _export_equal(export, mirror_export, target_nbd)
        refused = _write_is_refused(mirror_export, target_nbd)
        row = source.call("status")["mirrors"][0]
        last = row.get("last_cycle") or {}
        elapsed = time.monotonic() - started
        _say("")
        _say("summary")
        _say(f"  cycles applied     {row['applied_cycle']} (every {INTERVAL:g}s while writing)")
        _say(f"  written over NBD   {format_size(workload.written)}")
        _say(f"  bytes shipped      {format_size(row['shipped_bytes_total'])} on the wire")
        _say(f"  RPO age            {format_duration(row.get('rpo_age'))} at the break")
        ratio = last.get("compression_ratio")
        _say(f"  last cycle         {format_size(last.get('bytes') or 0)} in "
             f"{format_duration(last.get('duration'))}, "
             f"{format_rate(last.get('throughput'))}, compression "
             f"{'-' if ratio is None else f'{ratio:.2f}x'}")
        _say(f"  demo took          {format_duration(elapsed)}")
        if not equal:
            _say(f"  VERIFY FAILED: the mirror image differs from the source at byte {where}")
            _say(f"  logs kept in {workdir}")
            keep = True
            return IntegrityError.exit_code
        if not nbd_equal or not refused:
            _say(f"  VERIFY FAILED: the read-only NBD export {mirror_export} "
                 + (f"differs from the source at byte {nbd_where}" if not nbd_equal
                    else "accepted a write (EPERM expected)"))
            _say(f"  logs kept in {workdir}")
            keep = True
            return IntegrityError.exit_code
        _say(f"  verified           mirror image == source volume, "
             f"{format_size(VOLUME_SIZE)} byte for byte")
        _say(f"  read-only export   {mirror_export} on the target reads the same; "
             "writes get EPERM")
        return 0
    except CycleMirrorError:
        keep = True
        _say(f"demo failed; logs kept in {workdir}")
        raise
    finally:
        for d in reversed(daemons):
            d.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif os.path.isdir(workdir):
            _say(f"kept {workdir}")
