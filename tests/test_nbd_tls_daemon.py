"""NBD TLS through the daemon: serve's flags, the TOML settings and the refusals.

A real ``cyclemirror serve`` with ``--nbd tcp:`` and a key file made by
psktool; real nbdinfo, nbdcopy and qemu-img as the clients.
"""

from __future__ import annotations

import json
import random

import pytest

from tests.support.daemons import DaemonPool, run_cli
from tests.support.nbd import run
from tests.support.tools import require_tool

MiB = 1 << 20


@pytest.fixture
def daemons(tmp_path):
    with DaemonPool(tmp_path) as pool:
        yield pool.start


def _tcp_port(daemon) -> int:
    (tcp,) = [a for a in daemon.status()["node"]["nbd"] if a.startswith("tcp:")]
    return int(tcp.rsplit(":", 1)[1])


def test_nbd_on_a_non_loopback_address_needs_tls_or_insecure(tmp_path):
    refused = run_cli("--store", str(tmp_path / "x"), "serve", "--nbd", "tcp:0.0.0.0:0",
                      check=False, timeout=60)
    assert refused.returncode == 2
    assert "--nbd-tls-psk FILE" in refused.stderr and "psktool" in refused.stderr
    assert "--insecure" in refused.stderr
    # the table without TLS would silently mean nothing: refused too
    config = tmp_path / "c.toml"
    config.write_text('nbd = "tcp:127.0.0.1:0"\n[nbd_clients.alice]\nexports = ["v"]\n')
    refused = run_cli("--store", str(tmp_path / "y"), "serve", "--config", config,
                      check=False, timeout=60)
    assert refused.returncode == 2 and "nbd_tls_psk" in refused.stderr


def test_insecure_serves_plaintext_on_a_non_loopback_address(daemons):
    require_tool("nbdinfo")
    d = daemons("d", nbd=False, metrics=False, extra=("--nbd", "tcp:0.0.0.0:0", "--insecure"))
    d.cli("volume", "create", "v", "--size", "1M")
    info = json.loads(run("nbdinfo", "--json", f"nbd://127.0.0.1:{_tcp_port(d)}/v").stdout)
    assert info["TLS"] is False and info["exports"][0]["export-size"] == MiB


def test_serve_with_a_psk_file_and_a_client_table_from_the_config(daemons, tmp_path):
    for tool in ("psktool", "nbdinfo", "nbdcopy", "qemu-img"):
        require_tool(tool)
    keys = tmp_path / "psk" / "keys.psk"
    keys.parent.mkdir()
    for user in ("alice", "bob", "carol"):
        run("psktool", "-u", user, "-p", str(keys))
    config = tmp_path / "serve.toml"
    config.write_text(f'nbd_tls_psk = "{keys}"\n'
                      '[nbd_clients.alice]\nexports = ["v1", "v2"]\n'
                      '[nbd_clients.bob]\nexports = ["v*"]\nreadonly = true\n')
    d = daemons("d", nbd=False, metrics=False,
                extra=("--nbd", "tcp:0.0.0.0:0", "--config", str(config)))
    d.cli("volume", "create", "v1", "--size", "8M")
    d.cli("volume", "create", "w", "--size", "1M")
    port = _tcp_port(d)

    def uri(user, export):
        return f"nbds://{user}@127.0.0.1:{port}/{export}?tls-psk-file={keys}"

    data = random.Random(3).randbytes(8 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    run("nbdcopy", str(src), uri("alice", "v1"))
    out = tmp_path / "out.raw"
    run("nbdcopy", uri("bob", "v1"), str(out))
    assert out.read_bytes() == data
    bob = json.loads(run("nbdinfo", "--json", uri("bob", "v1")).stdout)["exports"][0]
    assert bob["is_read_only"] is True
    listed = json.loads(run("nbdinfo", "--list", "--json", uri("alice", "")).stdout)
    assert [e["export-name"] for e in listed["exports"]] == ["v1"]  # not w, and v2 is absent
    for user, export in (("alice", "w"), ("carol", "v1")):
        proc = run("qemu-img", "info", "--object",
                   f"tls-creds-psk,id=t,endpoint=client,dir={keys.parent},username={user}",
                   "--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
                                   f"server.port={port},export={export},tls-creds=t",
                   check=False)
        assert proc.returncode != 0 and f"not allowed for client '{user}'".encode() in proc.stderr
    plain = run("nbdinfo", f"nbd://127.0.0.1:{port}/v1", check=False)
    assert plain.returncode != 0
