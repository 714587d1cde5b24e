"""NBD over TLS with pre-shared keys: real nbdinfo, nbdcopy, qemu-img and qemu-io.

The keys are made by GnuTLS's own psktool, the clients are the ones users
have (libnbd and qemu, both GnuTLS inside), the server is a real NbdServer on
TCP with ``NbdTls``.  What must hold: the right key connects and moves the
right bytes; a wrong key, an unknown user, plaintext and EXPORT_NAME before
STARTTLS are refused; none of that disturbs a client being served; a client
limited by ``[nbd_clients]`` sees and opens only its exports, read-only where
it says so.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import time

import pytest

from cyclemirror.errors import UsageError
from cyclemirror.nbd.access import ClientAccess, ClientRule
from cyclemirror.nbd.tls import NbdTls, read_psk_file
from tests.support import nbd_rawclient as C
from tests.support.nbd import raw_server, run
from tests.support.tools import require_tool

MiB = 1 << 20
REP_ERR_TLS_REQD = 0x80000005


def make_keys(path, *users: str) -> str:
    """A key file made by the real psktool, one random key per user."""
    require_tool("psktool")
    for user in users:
        run("psktool", "-u", user, "-p", str(path))
    return str(path)


def uri(srv, user: str, keys: str, export: str) -> str:
    host, port = srv.tcp_address
    return f"nbds://{user}@{host}:{port}/{export}?tls-psk-file={keys}"


def qemu_args(srv, user: str, keys_dir, export: str) -> list[str]:
    """qemu's way: a tls-creds-psk object (keys.psk in a directory) and image options."""
    host, port = srv.tcp_address
    return ["--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={keys_dir},username={user}",
            "--image-opts", f"driver=nbd,server.type=inet,server.host={host},"
                            f"server.port={port},export={export},tls-creds=tls0"]


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "psk"
    d.mkdir()
    return make_keys(d / "keys.psk", "alice", "bob")


def tls_server(tmp_path, keys, exports, **kw):
    return raw_server(tmp_path, exports, tcp=True, tls=NbdTls(psk_file=keys), **kw)


def test_nbdinfo_nbdcopy_and_qemu_img_with_the_right_key_move_the_right_bytes(tmp_path, keys):
    for tool in ("nbdinfo", "nbdcopy", "qemu-img"):
        require_tool(tool)
    data = random.Random(1).randbytes(24 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    with tls_server(tmp_path, keys, {"vol": (24 * MiB, False), "copy": (24 * MiB, False)}) as (
            srv, paths):
        info = json.loads(run("nbdinfo", "--json", uri(srv, "alice", keys, "vol")).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 24 * MiB
        run("nbdcopy", str(src), uri(srv, "alice", keys, "vol"))
        assert open(paths["vol"], "rb").read() == data
        out = tmp_path / "out.raw"
        run("nbdcopy", uri(srv, "bob", keys, "vol"), str(out))
        assert out.read_bytes() == data
        obj, opts = qemu_args(srv, "bob", tmp_path / "psk", "copy")[1::2]
        run("qemu-img", "convert", "-n", "-f", "raw", "--object", obj, str(src),
            "--target-image-opts", opts)
        assert open(paths["copy"], "rb").read() == data
        obj, opts = qemu_args(srv, "alice", tmp_path / "psk", "copy")[1::2]
        run("qemu-img", "compare", "--object", obj, "--image-opts", f"driver=file,filename={src}",
            opts)


def _refused(argv) -> str:
    proc = run(*argv, check=False, timeout=60)
    assert proc.returncode != 0, argv
    return proc.stderr.decode(errors="replace")


def test_wrong_key_unknown_user_and_plaintext_are_refused_while_a_client_is_being_served(
        tmp_path, keys):
    for tool in ("nbdinfo", "qemu-io", "qemu-img"):
        require_tool(tool)
    wrong = tmp_path / "wrong.psk"
    lines = open(keys).read().splitlines()
    # same user names, every key changed in its first hex digit
    wrong.write_text("".join(f"{u}:{'0' if k[0] != '0' else '1'}{k[1:]}\n"
                             for u, k in (line.split(":") for line in lines)))
    carol = make_keys(tmp_path / "carol.psk", "carol")
    with tls_server(tmp_path, keys, {"vol": (8 * MiB, False)}) as (srv, paths):
        # A qemu-io session opened with the right key stays connected throughout.
        served = subprocess.Popen(["qemu-io", *qemu_args(srv, "alice", tmp_path / "psk", "vol")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        try:
            served.stdin.write(b"write -P 0x5a 0 65536\n")
            served.stdin.flush()
            deadline = time.monotonic() + 60
            while open(paths["vol"], "rb").read(65536) != b"\x5a" * 65536:
                assert time.monotonic() < deadline, "the first write never arrived"
                assert served.poll() is None, served.communicate()
                time.sleep(0.05)
            host, port = srv.tcp_address
            assert "TLS" in _refused(["nbdinfo", uri(srv, "alice", str(wrong), "vol")])
            assert "TLS" in _refused(["nbdinfo", uri(srv, "carol", carol, "vol")])
            _refused(["nbdinfo", f"nbd://{host}:{port}/vol"])
            plain = _refused(["qemu-img", "info", f"nbd://{host}:{port}/vol"])  # shows our text
            assert "requires TLS" in plain and "STARTTLS" in plain
            served.stdin.write(b"write -P 0x6b 65536 65536\nread -P 0x5a 0 65536\nquit\n")
            out, err = served.communicate(timeout=60)
        finally:
            if served.poll() is None:
                served.kill()
                served.wait()
        assert served.returncode == 0, err
        assert b"Pattern verification failed" not in out, out
        with open(paths["vol"], "rb") as f:
            f.seek(65536)
            assert f.read(65536) == b"\x6b" * 65536


def _greet_tcp(srv) -> socket.socket:
    s = socket.create_connection(srv.tcp_address, timeout=10)
    C.greet(s)
    return s


def test_every_option_before_starttls_gets_tls_reqd_and_export_name_closes(tmp_path, keys):
    with tls_server(tmp_path, keys, {"vol": (MiB, False)}) as (srv, _paths):
        with _greet_tcp(srv) as s:
            for option, data in ((C.OPT["LIST"], b""), (C.OPT["GO"], C.go_data("vol")),
                                 (C.OPT["INFO"], C.go_data("vol")),
                                 (C.OPT["STRUCTURED_REPLY"], b""), (0x4242, b"x")):
                C.send_option(s, option, data)
                (rtype, message), = C.option_replies(s)
                assert rtype == REP_ERR_TLS_REQD, (option, hex(rtype))
                assert b"STARTTLS" in message
            C.send_option(s, C.OPT["STARTTLS"], b"junk")  # STARTTLS takes no data
            assert C.option_replies(s)[-1][0] == C.REP_ERR_INVALID
            C.send_option(s, C.OPT["ABORT"])
            assert C.option_replies(s) == [(C.REP_ACK, b"")]
        with _greet_tcp(srv) as s:
            C.send_option(s, C.OPT["EXPORT_NAME"], b"vol")
            assert s.recv(1) == b""  # closed: EXPORT_NAME cannot carry an error
        # STARTTLS acknowledged, then plaintext garbage instead of a TLS hello: closed
        with _greet_tcp(srv) as s:
            C.send_option(s, C.OPT["STARTTLS"])
            assert C.option_replies(s) == [(C.REP_ACK, b"")]
            s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT["LIST"], 0) * 8)
            try:
                first = s.recv(65536)[:1]
            except ConnectionResetError:
                first = b""
            assert first in (b"\x15", b"")  # a TLS alert record, or closed
        # the server still serves a good client
        require_tool("nbdinfo")
        run("nbdinfo", uri(srv, "bob", keys, "vol"))


def test_a_stalled_tls_handshake_is_dropped_and_stop_ends_idle_tls_sessions(tmp_path, keys):
    require_tool("qemu-io")
    tls = NbdTls(psk_file=keys, handshake_timeout=0.5)
    with raw_server(tmp_path, {"vol": (MiB, False)}, tcp=True, tls=tls) as (srv, _paths):
        with _greet_tcp(srv) as s:
            C.send_option(s, C.OPT["STARTTLS"])
            assert C.option_replies(s) == [(C.REP_ACK, b"")]
            s.settimeout(30)
            assert s.recv(1) == b""  # no client hello: dropped after the handshake timeout
        idle = subprocess.Popen(["qemu-io", *qemu_args(srv, "alice", tmp_path / "psk", "vol")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while srv.connection_count() == 0:
                assert time.monotonic() < deadline and idle.poll() is None
                time.sleep(0.05)
            srv.stop(grace=1.0)  # the relay thread and the session must both end
            assert srv.connection_count() == 0
        finally:
            idle.kill()
            idle.wait()


def test_the_key_file_is_read_for_every_connection(tmp_path, keys):
    require_tool("nbdinfo")
    with tls_server(tmp_path, keys, {"vol": (MiB, False)}) as (srv, _paths):
        dave = make_keys(tmp_path / "dave.psk", "dave")
        assert _refused(["nbdinfo", uri(srv, "dave", dave, "vol")])
        with open(keys, "a") as f:
            f.write(open(dave).read())
        run("nbdinfo", uri(srv, "dave", dave, "vol"))  # no restart needed


def test_clients_see_and_open_only_their_exports_read_only_where_the_table_says(tmp_path, keys):
    for tool in ("nbdinfo", "qemu-io", "qemu-img"):
        require_tool(tool)
    carol = make_keys(tmp_path / "psk" / "carol.psk", "carol")
    with open(keys, "a") as f:
        f.write(open(carol).read())
    access = ClientAccess({"alice": ClientRule(("vol", "mirror/*")),
                           "bob": ClientRule(("*",), readonly=True)})
    exports = {"vol": (MiB, False), "other": (MiB, False)}
    with tls_server(tmp_path, keys, exports, access=access) as (srv, paths):
        listed = json.loads(run("nbdinfo", "--list", "--json",
                                uri(srv, "alice", keys, "")).stdout)
        assert [e["export-name"] for e in listed["exports"]] == ["vol"]
        psk = tmp_path / "psk"
        _refused(["nbdinfo", uri(srv, "alice", keys, "other")])
        # qemu-img shows the server's message (nbdinfo only the error code)
        refused = _refused(["qemu-img", "info", *qemu_args(srv, "alice", psk, "other")])
        assert "not allowed for client 'alice'" in refused
        assert "not allowed for client 'carol'" in _refused(
            ["qemu-img", "info", *qemu_args(srv, "carol", psk, "vol")])
        ro = json.loads(run("nbdinfo", "--json", uri(srv, "bob", keys, "other")).stdout)
        assert ro["exports"][0]["is_read_only"] is True
        proc = run("qemu-io", *qemu_args(srv, "bob", psk, "other"), "-c",
                   "write -P 0x11 0 4096", check=False)
        assert open(paths["other"], "rb").read(4096) == bytes(4096)  # bob wrote nothing
        assert proc.returncode != 0 or b"failed" in proc.stdout + proc.stderr
        run("qemu-io", *qemu_args(srv, "alice", psk, "vol"), "-c", "write -P 0x22 0 4096")
        assert open(paths["vol"], "rb").read(4096) == b"\x22" * 4096


def test_the_table_marks_read_only_exports_and_refuses_others_by_policy():
    # The same negotiation the TLS clients above go through, over a socket pair
    # and our raw client, to see the flags and the reply codes themselves.
    import threading

    from cyclemirror.nbd.negotiation import negotiate

    access = ClientAccess({"*": ClientRule(("vol",), readonly=True)})
    backend = type("B", (), {"size": MiB, "nbd_backend": True, "read": None})()
    a, b = socket.socketpair()
    b.settimeout(10)
    result = []
    t = threading.Thread(target=lambda: result.append(
        negotiate(a, {"vol": backend, "other": backend}.get, lambda: ["vol", "other"],
                  threading.Event(), access=access)))
    t.start()
    try:
        C.greet(b)
        C.send_option(b, C.OPT["LIST"])
        names = [d[4:] for rtype, d in C.option_replies(b) if rtype == C.REP_SERVER]
        assert names == [b"vol"]
        C.send_option(b, C.OPT["INFO"], C.go_data("other"))
        rtype, message = C.option_replies(b)[-1]
        assert rtype == C.REP_ERR_POLICY and b"not allowed" in message
        C.send_option(b, C.OPT["GO"], C.go_data("vol"))
        info = [d for rtype, d in C.option_replies(b) if rtype == C.REP_INFO and d[:2] == b"\0\0"]
        _t, size, flags = struct.unpack(">HQH", info[0])
        assert size == MiB and flags & 2  # NBD_FLAG_READ_ONLY
    finally:
        t.join(10)
        a.close()
        b.close()
    assert result and result[0].transmission_flags & 2


@pytest.mark.parametrize("text, error", [
    ("alice\n", "line 1: expected 'username:hexkey'"),
    ("alice:xyz\n", "line 1"),
    ("alice:abc\n", "line 1"),  # odd number of hex digits
    ("# a comment\nal ice:00\n", "line 2"),
    ("alice:00\nalice:01\n", "appears twice"),
    ("\n# nothing\n", "no keys"),
])
def test_a_bad_key_file_is_refused_with_the_line(tmp_path, text, error):
    path = tmp_path / "keys.psk"
    path.write_text(text)
    with pytest.raises(UsageError, match=error):
        read_psk_file(path)


def test_psktool_key_files_read_back_as_bytes(tmp_path):
    keys = make_keys(tmp_path / "k.psk", "alice", "bob")
    table = read_psk_file(keys)
    assert sorted(table) == ["alice", "bob"]
    assert all(len(k) == 32 for k in table.values())  # psktool's default: 256-bit keys


def test_a_certificate_serves_clients_that_verify_it_beside_psk_clients(tmp_path, keys):
    from tests.support.certs import Certs

    require_tool("nbdinfo")
    certs = Certs(tmp_path / "certs")
    cert, key = certs.server("nbd-server")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "ca-cert.pem").write_bytes(open(certs.ca_cert, "rb").read())  # libnbd's name
    other = tmp_path / "other"
    other.mkdir()
    (other / "ca-cert.pem").write_bytes(open(certs.other_ca(), "rb").read())
    tls = NbdTls(psk_file=keys, certfile=cert, keyfile=key)
    with raw_server(tmp_path, {"vol": (MiB, False)}, tcp=True, tls=tls) as (srv, _paths):
        host, port = srv.tcp_address
        info = json.loads(run("nbdinfo", "--json",
                              f"nbds://{host}:{port}/vol?tls-certificates={trust}").stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == MiB
        _refused(["nbdinfo", f"nbds://{host}:{port}/vol?tls-certificates={other}"])
        run("nbdinfo", uri(srv, "alice", keys, "vol"))  # PSK clients still welcome


def test_a_key_that_does_not_match_the_certificate_is_refused_at_start(tmp_path):
    from tests.support.certs import Certs

    certs = Certs(tmp_path / "certs")
    cert, _key = certs.server("a")
    _cert_b, key_b = certs.server("b")
    with pytest.raises(UsageError, match="b.key: cannot be used: .*mismatch"):
        NbdTls(certfile=cert, keyfile=key_b)
    with pytest.raises(UsageError, match="cannot be used"):
        NbdTls(certfile=tmp_path / "missing.pem")
