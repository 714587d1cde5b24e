"""NBD over TLS with client certificates: only clients with a certificate of the CA connect.

The certificates are real X.509 made by the openssl command line
(tests/support/certs.py); the clients are libnbd's nbdinfo and nbdcopy
(``tls-certificates=DIR`` with ``ca-cert.pem``, ``client-cert.pem`` and
``client-key.pem``) and qemu-img (``tls-creds-x509``, the same file names), both
GnuTLS inside.  What must hold with ``client_ca``: a client certificate
signed by that CA connects and moves the right bytes; no client
certificate, one of another CA, and an expired one are refused (the server
logs why) while the server keeps serving the good client; PSK clients are
unaffected; the certificate's common name is the client's name in the
``[nbd_clients]`` table; and ``serve --nbd-tls-ca`` sets it up in the daemon.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import pytest

from cyclemirror.errors import UsageError
from cyclemirror.nbd.access import ClientAccess, ClientRule
from cyclemirror.nbd.tls import NbdTls
from tests.support.certs import Certs
from tests.support.daemons import DaemonPool
from tests.support.nbd import raw_server, run
from tests.support.tools import require_tool

MiB = 1 << 20


@pytest.fixture
def pki(tmp_path):
    """Our CA with the server's certificate, and a client directory per case."""
    certs = Certs(tmp_path / "ca")
    stranger = Certs(tmp_path / "other-ca")  # a CA the server does not trust

    def client_dir(name: str, made: tuple[str, str] | None) -> str:
        d = tmp_path / "clients" / name
        d.mkdir(parents=True)
        shutil.copy(certs.ca_cert, d / "ca-cert.pem")  # the client verifies the server
        if made is not None:
            shutil.copy(made[0], d / "client-cert.pem")
            shutil.copy(made[1], d / "client-key.pem")
        return str(d)

    dirs = {
        "alice": client_dir("alice", certs.server("alice", "DNS:alice")),
        "bob": client_dir("bob", certs.server("bob", "DNS:bob")),
        "none": client_dir("none", None),
        "stranger": client_dir("stranger", stranger.server("alice-forged", "DNS:alice")),
        "expired": client_dir("expired", certs.expired("carol", "DNS:carol")),
    }
    return certs, certs.server("nbd-server"), dirs


def _uri(srv, export: str, certdir: str) -> str:
    host, port = srv.tcp_address
    return f"nbds://{host}:{port}/{export}?tls-certificates={certdir}"


def _qemu(srv, export: str, certdir: str) -> list[str]:
    host, port = srv.tcp_address
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certdir}",
            "--image-opts", f"driver=nbd,server.type=inet,server.host={host},"
                            f"server.port={port},export={export},tls-creds=tls0"]


def _refused(*argv) -> str:
    proc = run(*argv, check=False, timeout=60)
    assert proc.returncode != 0, argv
    return proc.stderr.decode(errors="replace")


def test_a_client_certificate_of_the_ca_connects_and_others_are_refused(tmp_path, pki, caplog):
    for tool in ("nbdinfo", "nbdcopy", "qemu-img"):
        require_tool(tool)
    certs, (cert, key), dirs = pki
    data = random.Random(5).randbytes(8 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    tls = NbdTls(certfile=cert, keyfile=key, client_ca=certs.ca_cert)
    caplog.set_level(logging.INFO, logger="cyclemirror.nbd")
    with raw_server(tmp_path, {"vol": (8 * MiB, False)}, tcp=True, tls=tls) as (srv, paths):
        info = json.loads(run("nbdinfo", "--json", _uri(srv, "vol", dirs["alice"])).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 8 * MiB
        run("nbdcopy", str(src), _uri(srv, "vol", dirs["alice"]))
        assert open(paths["vol"], "rb").read() == data
        for case in ("none", "stranger", "expired"):
            caplog.clear()
            _refused("nbdinfo", _uri(srv, "vol", dirs[case]))
            _refused("qemu-img", "info", *_qemu(srv, "vol", dirs[case]))
            logged = " ".join(r.getMessage() for r in caplog.records)
            assert "certificate" in logged, (case, logged)  # the server says why
        # the server goes on serving the good client, with qemu as well
        out = tmp_path / "out.raw"
        run("qemu-img", "convert", "-O", "raw", *_qemu(srv, "vol", dirs["bob"])[:2],
            "--image-opts", _qemu(srv, "vol", dirs["bob"])[3], str(out))
        assert out.read_bytes() == data
    assert "client certificate 'bob'" in caplog.text  # who it was, by common name


def test_without_a_client_ca_a_client_needs_no_certificate(tmp_path, pki):
    require_tool("nbdinfo")
    _certs, (cert, key), dirs = pki
    with raw_server(tmp_path, {"vol": (MiB, False)}, tcp=True,
                    tls=NbdTls(certfile=cert, keyfile=key)) as (srv, _paths):
        run("nbdinfo", _uri(srv, "vol", dirs["none"]))  # the server's certificate only


def test_psk_clients_are_unaffected_by_the_client_ca(tmp_path, pki):
    for tool in ("nbdinfo", "psktool"):
        require_tool(tool)
    certs, (cert, key), dirs = pki
    keys = tmp_path / "keys.psk"
    run("psktool", "-u", "dave", "-p", str(keys))
    tls = NbdTls(psk_file=keys, certfile=cert, keyfile=key, client_ca=certs.ca_cert)
    with raw_server(tmp_path, {"vol": (MiB, False)}, tcp=True, tls=tls) as (srv, _paths):
        host, port = srv.tcp_address
        run("nbdinfo", f"nbds://dave@{host}:{port}/vol?tls-psk-file={keys}")
        run("nbdinfo", _uri(srv, "vol", dirs["alice"]))
        _refused("nbdinfo", _uri(srv, "vol", dirs["none"]))


def test_the_certificate_s_common_name_is_the_client_s_name_in_the_table(tmp_path, pki):
    for tool in ("nbdinfo", "qemu-img"):
        require_tool(tool)
    certs, (cert, key), dirs = pki
    tls = NbdTls(certfile=cert, keyfile=key, client_ca=certs.ca_cert)
    access = ClientAccess({"alice": ClientRule(("vol",)),
                           "bob": ClientRule(("*",), readonly=True)})
    exports = {"vol": (MiB, False), "other": (MiB, False)}
    with raw_server(tmp_path, exports, tcp=True, tls=tls, access=access) as (srv, _paths):
        listed = json.loads(run("nbdinfo", "--list", "--json",
                                _uri(srv, "", dirs["alice"])).stdout)
        assert [e["export-name"] for e in listed["exports"]] == ["vol"]
        assert "not allowed for client 'alice'" in _refused(
            "qemu-img", "info", *_qemu(srv, "other", dirs["alice"]))
        ro = json.loads(run("nbdinfo", "--json", _uri(srv, "other", dirs["bob"])).stdout)
        assert ro["exports"][0]["is_read_only"] is True


def test_a_client_ca_needs_a_server_certificate_and_a_readable_ca(tmp_path, pki):
    certs, (cert, key), _dirs = pki
    keys = tmp_path / "keys.psk"
    keys.write_text("dave:" + "ab" * 32 + "\n")
    with pytest.raises(UsageError, match="needs a server certificate"):
        NbdTls(psk_file=keys, client_ca=certs.ca_cert)
    with pytest.raises(UsageError, match="client CA .*missing.pem: cannot be used"):
        NbdTls(certfile=cert, keyfile=key, client_ca=tmp_path / "missing.pem")
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(UsageError, match="client CA"):
        NbdTls(certfile=cert, keyfile=key, client_ca=empty)


def test_serve_nbd_tls_ca_requires_client_certificates(tmp_path, pki):
    require_tool("nbdinfo")
    certs, (cert, key), dirs = pki
    with DaemonPool(tmp_path / "d") as pool:
        os.makedirs(tmp_path / "d")
        d = pool.start("d", nbd=False, metrics=False,
                       extra=("--nbd", "tcp:0.0.0.0:0", "--nbd-tls-cert", cert, "--nbd-tls-key",
                              key, "--nbd-tls-ca", certs.ca_cert))
        d.cli("volume", "create", "v", "--size", "1M")
        (tcp,) = [a for a in d.status()["node"]["nbd"] if a.startswith("tcp:")]
        port = tcp.rsplit(":", 1)[1]
        info = json.loads(run("nbdinfo", "--json", f"nbds://127.0.0.1:{port}/v?"
                              f"tls-certificates={dirs['alice']}").stdout)
        assert info["exports"][0]["export-size"] == MiB
        _refused("nbdinfo", f"nbds://127.0.0.1:{port}/v?tls-certificates={dirs['none']}")
        _refused("nbdinfo", f"nbds://127.0.0.1:{port}/v?tls-certificates={dirs['stranger']}")
        assert "client certificate 'alice'" in d.log()
    refused = d.cli("serve", "--nbd", "tcp:127.0.0.1:0", "--nbd-tls-ca", certs.ca_cert,
                    check=False, timeout=60)
    assert refused.returncode == 2 and "--nbd-tls-cert" in refused.stderr
