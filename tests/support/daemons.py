"""Helpers for tests that drive real daemons in subprocesses through the real CLI.

Every daemon is ``python -m cyclemirror.cli
serve`` in its own process with its log in a file, every command is a fresh
``python -m cyclemirror.cli`` process, exactly as an administrator runs them.

``Daemon.status()`` is the one exception: tests poll it many times per test,
and a fresh interpreter per poll was about half of the end-to-end tests' wall
time.  It asks the daemon over its real control socket with the same client
the ``status --json`` verb uses (``ControlClient.call("status")``; the verb
only prints that document), and ``Daemon.start`` still reads its first status
through the real ``status --json`` command, so every daemon the suite starts
is also seen through the command line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from cyclemirror import keys
from cyclemirror.daemon.control_client import ControlClient
from cyclemirror.errors import DaemonUnavailableError
from tests.support.procenv import child_env


def cli_env() -> dict:
    env = child_env()
    env.pop("CYCLEMIRROR_STORE", None)
    return env


DEV_COMMAND = (sys.executable, "-m", "cyclemirror.cli")


def run_cli(*args, store: str | None = None, check: bool = True, timeout: float = 120,
            env: dict | None = None, command: tuple = DEV_COMMAND) -> subprocess.CompletedProcess:
    """One CLI process; ``command``: how the CLI is started (default: this interpreter on the
    package it imports; a bench may give an installed entry point, e.g. VENV/bin/cyclemirror)."""
    cmd = list(command)
    if store is not None:
        cmd += ["--store", store]
    cmd += [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[len(command):])} exited {proc.returncode}\n"
                             f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a daemon's --listen)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_key(path) -> str:
    """A new mirror key in the file ``path`` (mode 0600), written by the library call the
    ``keygen --out`` verb makes (``keys.write_key_file``), in this process: tests make one
    per test, and an interpreter per key was seconds of the suite.  The verb itself is
    tested in tests/test_cli.py (test_keygen_prints_a_key_and_writes_a_private_key_file)."""
    keys.write_key_file(str(path), keys.generate_key())
    return str(path)


class Daemon:
    """One ``cyclemirror serve`` subprocess on a store under ``root``."""

    def __init__(self, root, name: str, *, key_file: str | None = None, listen: bool = False,
                 nbd: bool = True, metrics: bool = True, extra: tuple = (), env: dict | None = None,
                 prefix: tuple = (), command: tuple = DEV_COMMAND):
        self.root = str(root)
        self.name = name
        self.store = os.path.join(self.root, name)
        self.log_path = os.path.join(self.root, f"{name}.log")
        self.nbd_sock = os.path.join(self.root, f"{name}-nbd.sock")
        self.key_file = key_file
        self.args = []
        if nbd:
            self.args += ["--nbd", f"unix:{self.nbd_sock}"]
        if listen:
            self.args += ["--listen", "127.0.0.1:0"]
        if key_file:
            self.args += ["--key-file", key_file]
        if metrics:
            self.args += ["--metrics", "127.0.0.1:0"]
        self.args += list(extra)
        self.env = env
        self.prefix = tuple(prefix)  # e.g. ('ip', 'netns', 'exec', NS): run the daemon in there
        # How the daemon and its CLI calls are started; another than the default (an
        # installed entry point) gets ``env`` for its CLI calls too.
        self.command = tuple(command)
        self.proc: subprocess.Popen | None = None
        self.listen: str | None = None
        self.metrics: str | None = None

    def start(self, timeout: float = 20.0) -> Daemon:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *self.command, "--store", self.store,
                 "serve",
                 *self.args], stdout=log, stderr=subprocess.STDOUT, env=self.env or cli_env())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon {self.name} exited {self.proc.returncode}:\n"
                                     f"{self.log()}")
            # Answering on the control socket is being up; asking in-process costs no
            # interpreter start per probe, so the probe can be frequent.
            try:
                self._ask_status(timeout=5.0)
            except DaemonUnavailableError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"daemon {self.name} did not answer:\n{self.log()}") from None
                time.sleep(0.02)
                continue
            doc = json.loads(self.cli("status", "--json").stdout)
            self.listen = doc["node"]["listen"]
            self.metrics = doc["node"]["metrics"]
            self.node_id = doc["node"]["id"]
            return self

    def _ask_status(self, timeout: float = 30.0) -> dict:
        with ControlClient(self.store, timeout=timeout) as client:
            return client.call("status")

    def cli(self, *args, check: bool = True, timeout: float = 120):
        if self.command == DEV_COMMAND:
            return run_cli(*args, store=self.store, check=check, timeout=timeout)
        return run_cli(*args, store=self.store, check=check, timeout=timeout, env=self.env,
                       command=self.command)

    def status(self) -> dict:
        """The daemon's status document: what ``status --json`` prints (see the module doc)."""
        return self._ask_status()

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def log(self) -> str:
        try:
            with open(self.log_path) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        self.terminate()
        return self.wait_stopped(timeout)

    def terminate(self) -> None:
        """Ask the daemon to stop (SIGTERM), without waiting; ``wait_stopped`` waits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon {self.name} ignored SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class DaemonPool:
    """Starts daemons under one temp dir and stops every one of them on exit.

    Each test module declares its own fixture around it (a fixture imported
    from here would shadow names for the linter)::

        @pytest.fixture
        def daemons(tmp_path):
            with DaemonPool(tmp_path) as pool:
                yield pool.start
    """

    def __init__(self, root):
        self.root = root
        self.started: list[Daemon] = []

    def start(self, name: str, **kw) -> Daemon:
        d = Daemon(self.root, name, **kw)
        self.started.append(d)
        return d.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # SIGTERM to every daemon first, then wait for each: they shut down side by side
        # instead of one after another (each takes a fraction of a second to stop).
        for d in self.started:
            d.terminate()
        for d in self.started:
            try:
                d.wait_stopped()
            except AssertionError:
                d.kill()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
