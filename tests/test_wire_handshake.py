"""The handshake over real loopback sockets (and TLS with a real openssl cert).

Proves: matching keys agree on a version; a wrong key fails on both sides with
AuthenticationError and the source never sends its proof to an impostor; a
keyless source or an insecure target is refused by a keyed peer; version
ranges without overlap are refused with a message; garbage and truncated
hellos are ProtocolError / ConnectionLostError, not crashes; key files are
checked (length, hex, mode).
"""

import os
import socket
import struct
import subprocess
import threading

import pytest

from cyclemirror import keys
from cyclemirror.errors import (
    AuthenticationError,
    ConnectionLostError,
    ProtocolError,
    UsageError,
)
from cyclemirror.wire import handshake as hs
from tests.support.tools import require_tool


def run_pair(client_fn, server_fn):
    """Run server_fn(sock) in a thread on an accepted loopback socket, client_fn here."""
    lst = socket.create_server(("127.0.0.1", 0))
    result = {}

    def serve():
        conn, _ = lst.accept()
        conn.settimeout(5)
        try:
            result["server"] = server_fn(conn)
        except Exception as exc:  # recorded for the assertions
            result["server_exc"] = exc
        finally:
            conn.close()

    t = threading.Thread(target=serve)
    t.start()
    cli = socket.create_connection(lst.getsockname(), timeout=5)
    try:
        result["client"] = client_fn(cli)
    except Exception as exc:
        result["client_exc"] = exc
    finally:
        cli.close()
        t.join(10)
        lst.close()
    return result


def test_matching_keys_agree_on_the_current_version():
    key = keys.generate_key()
    r = run_pair(lambda s: hs.client_handshake(s, key), lambda s: hs.server_handshake(s, key))
    assert r.get("client") == hs.PROTOCOL_VERSION
    assert r.get("server") == hs.PROTOCOL_VERSION


def test_wrong_key_fails_on_both_sides_with_authentication_error():
    r = run_pair(
        lambda s: hs.client_handshake(s, keys.generate_key()),
        lambda s: hs.server_handshake(s, keys.generate_key()),
    )
    # The source's nonce names its key: the target refuses before proving anything,
    # naming both sides' key ids.
    assert isinstance(r["client_exc"], AuthenticationError)
    assert "is not one of this target's keys" in str(r["client_exc"])
    assert r["client_exc"].temporary is False
    assert isinstance(r["server_exc"], AuthenticationError)


def test_a_target_holding_old_and_new_keys_accepts_sources_of_either_and_names_the_key():
    old, new = keys.generate_key(), keys.generate_key()
    for key in (old, new):
        r = run_pair(lambda s, k=key: hs.client_handshake(s, k),
                     lambda s: hs.server_handshake_keys(s, [old, new]))
        assert r.get("client") == hs.PROTOCOL_VERSION, r
        assert r["server"] == (hs.PROTOCOL_VERSION, hs.key_id(key))
    assert len(hs.key_id(old)) == 8 and hs.key_id(old) != hs.key_id(new)


def test_a_source_without_a_key_id_gets_the_targets_first_key(monkeypatch):
    key, other = keys.generate_key(), keys.generate_key()
    # An older source: no FLAG_KEY_ID, a nonce of pure randomness.
    monkeypatch.setattr(hs, "FLAG_KEY_ID", 0)
    monkeypatch.setattr(hs, "key_id", lambda k: "00000000")
    r = run_pair(lambda s: hs.client_handshake(s, key),
                 lambda s: hs.server_handshake_keys(s, [other, key]))
    assert isinstance(r["client_exc"], AuthenticationError)
    assert "does not hold our key" in str(r["client_exc"])
    r = run_pair(lambda s: hs.client_handshake(s, key),
                 lambda s: hs.server_handshake_keys(s, [key, other]))
    assert r.get("client") == hs.PROTOCOL_VERSION


def test_impostor_source_that_replays_a_proof_is_rejected_by_the_target():
    key = keys.generate_key()

    def impostor(s):
        s.sendall(struct.pack(">8sHHI32s", hs.MAGIC_SOURCE, 1, 1, 1, os.urandom(32)))
        s.recv(4096)
        s.sendall(os.urandom(32))  # a guess
        return s.recv(4096)

    r = run_pair(impostor, lambda s: hs.server_handshake(s, key))
    assert isinstance(r["server_exc"], AuthenticationError)
    assert b"authentication failed" in r["client"]


def test_keyless_source_is_refused_by_a_keyed_target():
    r = run_pair(
        lambda s: hs.client_handshake(s, None, insecure=True),
        lambda s: hs.server_handshake(s, keys.generate_key()),
    )
    assert isinstance(r["client_exc"], AuthenticationError)
    assert "requires a key" in str(r["client_exc"])
    assert isinstance(r["server_exc"], AuthenticationError)


def test_keyed_source_refuses_an_insecure_target():
    r = run_pair(
        lambda s: hs.client_handshake(s, keys.generate_key()),
        lambda s: hs.server_handshake(s, None),
    )
    assert isinstance(r["client_exc"], AuthenticationError)
    assert "--insecure" in str(r["client_exc"])


def test_insecure_on_both_sides_is_allowed_only_explicitly():
    with pytest.raises(UsageError):
        hs.client_handshake(socket.socket(), None)
    r = run_pair(
        lambda s: hs.client_handshake(s, None, insecure=True),
        lambda s: hs.server_handshake(s, None),
    )
    assert r.get("client") == hs.PROTOCOL_VERSION


def test_version_ranges_without_overlap_are_refused_with_a_message():
    key = keys.generate_key()

    def future_source(s):
        s.sendall(struct.pack(">8sHHI32s", hs.MAGIC_SOURCE, 7, 9, 1, os.urandom(32)))
        magic, version = struct.unpack(">8sH", s.recv(80, socket.MSG_WAITALL)[:10])
        return version, hs._read_verdict(s)

    r = run_pair(future_source, lambda s: hs.server_handshake(s, key))
    version, (ok, text) = r["client"]
    assert version == 0 and not ok and "no common protocol version" in text
    assert isinstance(r["server_exc"], ProtocolError)


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\n" * 4, b"CYMIR"])
def test_garbage_or_truncated_hello_is_a_clear_error(junk):
    def send_junk(s):
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
        return s.recv(4096)

    r = run_pair(send_junk, lambda s: hs.server_handshake(s, keys.generate_key()))
    exc = r["server_exc"]
    if len(junk) >= 48:
        assert isinstance(exc, ProtocolError) and "bad magic" in str(exc)
    else:
        assert isinstance(exc, ConnectionLostError) and "5 of 48 bytes" in str(exc)


def make_cert(tmp_path):
    openssl = require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


def test_tls_wraps_the_handshake_and_checks_the_certificate(tmp_path):
    cert, pkey = make_cert(tmp_path)
    server_ctx = hs.TlsConfig(certfile=cert, keyfile=pkey).server_context()
    good = hs.TlsConfig(cafile=cert, server_hostname="localhost").client_context()
    key = keys.generate_key()

    def server(s):
        with server_ctx.wrap_socket(s, server_side=True) as t:
            return hs.server_handshake(t, key), t.version()

    def client(s):
        with good.wrap_socket(s, server_hostname="localhost") as t:
            return hs.client_handshake(t, key)

    r = run_pair(client, server)
    assert r.get("client") == hs.PROTOCOL_VERSION
    assert r["server"][1].startswith("TLS")

    # A client that trusts another CA refuses this certificate.
    (tmp_path / "other").mkdir()
    other_cert, _ = make_cert(tmp_path / "other")
    wrong = hs.TlsConfig(cafile=other_cert, server_hostname="localhost").client_context()

    def bad_client(s):
        with wrong.wrap_socket(s, server_hostname="localhost") as t:
            return hs.client_handshake(t, key)

    r = run_pair(bad_client, server)
    assert "CERTIFICATE_VERIFY_FAILED" in str(r["client_exc"])


def test_keygen_makes_a_key_that_reads_back(tmp_path):
    text = keys.keygen_text()
    assert len(keys.parse_key(text)) == keys.MIN_KEY_BYTES
    path = tmp_path / "key"
    k = keys.generate_key()
    keys.write_key_file(path, k)
    assert keys.read_key_file(path) == k
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    "content, mode, message",
    [
        ("00" * 16, 0o600, "at least 32"),
        ("zz" * 40, 0o600, "hex digits"),
        ("ab" * 40, 0o644, "chmod 600"),
    ],
)
def test_bad_key_files_are_refused_with_the_fix(tmp_path, content, mode, message):
    path = tmp_path / "key"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(UsageError, match=message):
        keys.read_key_file(path)
