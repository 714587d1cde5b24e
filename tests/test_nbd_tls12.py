"""NBD over TLS 1.2 with pre-shared keys, forced by real GnuTLS clients.

The clients offer TLS 1.3 unless told otherwise, so the tests that the
export serves TLS 1.3 never see 1.2.  Here the clients are forced down:
libnbd's nbdinfo and nbdcopy through a GnuTLS system configuration
(``GNUTLS_SYSTEM_PRIORITY_FILE`` with ``[overrides] disabled-version =
tls1.3``; libnbd's priority string cannot be set), with
``tls-disabled-kx`` to force each TLS 1.2 PSK key exchange in turn
(ECDHE-PSK, DHE-PSK, plain PSK); and qemu-img with ``tls-creds-psk``'s own
``priority=NORMAL:-VERS-TLS1.3``.  The server's log names the version and
suite it negotiated, which is how the test knows the handshake really was
TLS 1.2 (in 1.2 the PSK identity comes from OpenSSL's own
``SSL_get_psk_identity``, a different path from 1.3's).  What must hold: the
right key connects as the right user and moves the right bytes; a wrong key
is refused.
"""

from __future__ import annotations

import logging
import os
import random
import re

import pytest

from cyclemirror.nbd.tls import NbdTls
from tests.support.nbd import raw_server, run
from tests.support.tools import require_tool

MiB = 1 << 20
TLS_ON = re.compile(r"TLS on \(user '([^']*)', (\S+) (\S+)\)")


@pytest.fixture
def keys(tmp_path):
    require_tool("psktool")
    d = tmp_path / "psk"
    d.mkdir()
    for user in ("alice", "bob"):
        run("psktool", "-u", user, "-p", str(d / "keys.psk"))
    return d / "keys.psk"


def gnutls_env(tmp_path, *disabled_kx: str) -> dict:
    """The environment of a GnuTLS client that may not use TLS 1.3 (nor ``disabled_kx``)."""
    conf = tmp_path / f"gnutls-{'-'.join(disabled_kx) or 'tls12'}.conf"
    conf.write_text("[overrides]\ndisabled-version = tls1.3\n"
                    + "".join(f"tls-disabled-kx = {kx}\n" for kx in disabled_kx))
    return dict(os.environ, GNUTLS_SYSTEM_PRIORITY_FILE=str(conf))


def _run_env(env, *argv, check=True):
    import subprocess

    proc = subprocess.run(argv, capture_output=True, timeout=120, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def _sessions(caplog) -> list[tuple[str, str, str]]:
    """(user, version, suite) of every TLS session the server started, in order."""
    return [m.groups() for m in (TLS_ON.search(r.getMessage()) for r in caplog.records) if m]


@pytest.mark.parametrize("disabled_kx, suite_prefix", [
    ((), "ECDHE-PSK-"),  # GnuTLS's first choice in TLS 1.2
    (("ECDHE-PSK",), "DHE-PSK-"),
    (("ECDHE-PSK", "DHE-PSK"), "PSK-"),  # no forward secrecy, but the key still authenticates
])
def test_libnbd_forced_to_tls_1_2_psk_moves_the_right_bytes(tmp_path, keys, caplog,
                                                             disabled_kx, suite_prefix):
    for tool in ("nbdinfo", "nbdcopy"):
        require_tool(tool)
    env = gnutls_env(tmp_path, *disabled_kx)
    data = random.Random(len(disabled_kx)).randbytes(4 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    caplog.set_level(logging.INFO, logger="cyclemirror.nbd")
    with raw_server(tmp_path, {"vol": (4 * MiB, False)}, tcp=True,
                    tls=NbdTls(psk_file=keys)) as (srv, paths):
        host, port = srv.tcp_address
        uri = f"nbds://alice@{host}:{port}/vol?tls-psk-file={keys}"
        _run_env(env, "nbdcopy", str(src), uri)
        assert open(paths["vol"], "rb").read() == data
        out = tmp_path / "out.raw"
        _run_env(env, "nbdcopy", uri.replace("alice@", "bob@"), str(out))
        assert out.read_bytes() == data
        sessions = _sessions(caplog)
        assert {user for user, _v, _s in sessions} == {"alice", "bob"}, sessions
        for _user, version, suite in sessions:
            assert version == "TLSv1.2" and suite.startswith(suite_prefix), sessions
        wrong = tmp_path / "wrong.psk"
        user, key = open(keys).read().splitlines()[0].split(":")
        wrong.write_text(f"{user}:{'0' if key[0] != '0' else '1'}{key[1:]}\n")
        refused = _run_env(env, "nbdinfo", f"nbds://{user}@{host}:{port}/vol?tls-psk-file={wrong}",
                           check=False)
        assert refused.returncode != 0 and b"TLS" in refused.stderr
        assert len(_sessions(caplog)) == len(sessions)  # no session for the wrong key


def test_qemu_img_with_a_tls_1_2_priority_moves_the_right_bytes(tmp_path, keys, caplog):
    require_tool("qemu-img")
    data = random.Random(9).randbytes(4 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    caplog.set_level(logging.INFO, logger="cyclemirror.nbd")
    with raw_server(tmp_path, {"vol": (4 * MiB, False)}, tcp=True,
                    tls=NbdTls(psk_file=keys)) as (srv, paths):
        host, port = srv.tcp_address
        obj = (f"tls-creds-psk,id=t,endpoint=client,dir={keys.parent},username=bob,"
               "priority=NORMAL:-VERS-TLS1.3")
        opts = (f"driver=nbd,server.type=inet,server.host={host},server.port={port},"
                "export=vol,tls-creds=t")
        run("qemu-img", "convert", "-n", "-f", "raw", "--object", obj, str(src),
            "--target-image-opts", opts)
        assert open(paths["vol"], "rb").read() == data
        sessions = _sessions(caplog)
        assert sessions and all(u == "bob" and v == "TLSv1.2" for u, v, _s in sessions), sessions
