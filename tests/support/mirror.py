"""Helpers for the mirror tests: child processes, waiting, comparing images."""

import contextlib
import filecmp
import json
import os
import signal
import subprocess
import sys
import time

from cyclemirror import keys
from tests.support.procenv import child_env

HERE = os.path.dirname(os.path.abspath(__file__))
PROC = os.path.join(HERE, "mirror_proc.py")




class Rig:
    """A target process and a source process on 127.0.0.1, all state under tmp."""

    def __init__(self, tmp, size=4 << 20, seed=1, interval=0.1):
        self.tmp = tmp
        self.size, self.seed, self.interval = size, seed, interval
        self.keyfile = os.path.join(tmp, "key")
        keys.write_key_file(self.keyfile, keys.generate_key())
        self.portfile = os.path.join(tmp, "port")
        self.snapdir = os.path.join(tmp, "snap")
        self.work = os.path.join(tmp, "work")
        os.makedirs(self.work, exist_ok=True)
        self.target = self.source = None
        self.logs = []

    def _spawn(self, args, name, env, failpoints=None):
        log = open(os.path.join(self.tmp, f"{name}.log"), "a")
        self.logs.append(log)
        fp = [a for n, s in (failpoints or {}).items() for a in ("--failpoint", f"{n}={s}")]
        return subprocess.Popen([sys.executable, PROC, *fp, *args], stdout=log,
                                stderr=subprocess.STDOUT, env=child_env(**env))

    def start_target(self, failpoints=None, **env):
        """Start the target process; ``failpoints``: {name: seconds} enabled in it."""
        if os.path.exists(self.portfile + ".ready"):
            os.unlink(self.portfile + ".ready")
        self.target = self._spawn(["target", os.path.join(self.tmp, "dst"), self.keyfile,
                                   self.portfile, self.snapdir], "target", env, failpoints)
        wait_for(lambda: os.path.exists(self.portfile), 30, "the target's port file")

    def start_source(self, **env):
        self.source = self._spawn(["source", os.path.join(self.tmp, "src"), self.keyfile,
                                   self.portfile, self.work, str(self.size), str(self.seed),
                                   str(self.interval)], "source", env)

    def kill(self, which):
        proc = getattr(self, which)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def events(self):
        path = os.path.join(self.work, "events.jsonl")
        if not os.path.exists(path):
            return []
        out = []
        for line in open(path):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line torn by kill -9
        return out

    def applied_cycles(self):
        return [e["cycle"] for e in self.events()]

    def finish(self, timeout=120):
        open(os.path.join(self.work, "stop"), "w").close()
        path = os.path.join(self.work, "final.json")
        wait_for(lambda: os.path.exists(path) or self.source.poll() is not None, timeout,
                 "the source's final sync")
        assert os.path.exists(path), f"source exited with {self.source.poll()}:\n{self.log('source')}"
        self.source.wait(30)
        return json.load(open(path))

    def log(self, name):
        return open(os.path.join(self.tmp, f"{name}.log")).read()[-4000:]

    def export(self, cycle):
        return os.path.join(self.work, f"export-{cycle}.img")

    def image(self):
        mdir = os.path.join(self.tmp, "dst", "mirrors")
        (node,) = os.listdir(mdir)
        return os.path.join(mdir, node, "v1.img")

    def close(self):
        self.kill("source")
        self.kill("target")
        for log in self.logs:
            log.close()


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def same_file(a, b):
    return filecmp.cmp(a, b, shallow=False)


@contextlib.contextmanager
def local_mirror(tmp_path, size: int, options=None):
    """A volume of ``size`` bytes in a source store and a MirrorDriver (not started) to a
    TargetServer in this process, both stores under ``tmp_path``; yields (volume, driver)
    and stops and closes everything on the way out."""
    from cyclemirror.receiver import TargetServer
    from cyclemirror.sender import MirrorDriver, MirrorOptions
    from cyclemirror.store import Store

    key = keys.generate_key()
    dst = Store.create(str(tmp_path / "dst"))
    src = Store.create(str(tmp_path / "src"))
    server = TargetServer(dst, key)
    server.start()
    vol = src.create_volume("v", size)
    d = MirrorDriver(vol, server.address, key, options or MirrorOptions(), store=src)
    try:
        yield vol, d
    finally:
        d.stop()
        server.stop()
        src.close()
        dst.close()
