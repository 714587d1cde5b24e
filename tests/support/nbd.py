"""Shared set-up for the NBD tests: a real server on a real image, and running real clients."""

from __future__ import annotations

import contextlib
import os
import subprocess

from cyclemirror.nbd import NbdServer, RawFileBackend


@contextlib.contextmanager
def raw_server(tmp_path, exports: dict[str, tuple[int | bytes, bool]], *, tcp: bool = False,
               **server_args):
    """Serve raw images: exports maps name -> (size or initial bytes, readonly).

    Yields (server, {name: image path}).  The socket lives in tmp_path (short
    enough for AF_UNIX under pytest's tmp dirs).
    """
    paths, backends = {}, {}
    for name, (content, readonly) in exports.items():
        path = tmp_path / f"{name}.img"
        if isinstance(content, int):
            with open(path, "wb") as f:
                f.truncate(content)
        else:
            path.write_bytes(content)
        paths[name] = str(path)
        backends[name] = RawFileBackend(path, readonly=readonly)
    sock = tmp_path / "nbd.sock"
    server = NbdServer(backends.get, list_names=lambda: sorted(backends),
                       unix_path=str(sock), tcp=("127.0.0.1", 0) if tcp else None, **server_args)
    server.start()
    try:
        yield server, paths
    finally:
        server.stop()
        for b in backends.values():
            b.close()


def run(*argv: str, timeout: float = 120, check: bool = True, input: bytes | None = None):
    """Run a real client; on failure the assertion shows its stderr."""
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                             f"{proc.stdout.decode(errors='replace')}\n"
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def qemu_uri(server: NbdServer, name: str) -> str:
    return server.uri(name)


def file_blocks_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def run_under_freezer(writers, freezer, writers_done, errors: list, timeout: float = 300) -> None:
    """Start ``freezer`` and the ``writers`` threads, wait for the writers, then set
    ``writers_done`` and wait for the freezer; fail with whatever the threads recorded."""
    freezer.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(timeout)
    writers_done.set()
    freezer.join(60)
    assert not errors, errors
