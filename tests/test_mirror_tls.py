"""TLS for the mirror protocol between real daemons, with real certificates from openssl.

A good certificate: the cycle arrives, status says TLS and which key each
source used.  A wrong CA, an expired certificate, a certificate for another
name, and a plaintext source against a TLS target: each refused with an
error that says what is wrong, and nothing arrives.  A man in the middle
that changes bytes of the TLS stream: the connection fails, nothing is
applied, and the mirror completes once the stream is left alone.  Non-loopback
addresses without TLS are refused with the exact options to add.  A target
holding old and new keys lets sources move to the new key without a restart.
"""

import os
import socket
import threading

import pytest

from cyclemirror import keys
from cyclemirror.wire.handshake import key_id
from tests.support.certs import Certs
from tests.support.daemons import DaemonPool, make_key, run_cli, wait_for

MiB = 1 << 20
MANUAL = "3600"


@pytest.fixture
def daemons(tmp_path):
    with DaemonPool(tmp_path) as pool:
        yield pool.start


@pytest.fixture
def key(tmp_path):
    return make_key(tmp_path / "mirror.key")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    c = Certs(tmp_path_factory.mktemp("certs"))
    c.good = c.server("target")
    return c


def tls_target(daemons, name, key, cert, *extra):
    return daemons(name, key_file=key, listen=True, nbd=False, metrics=False,
                   extra=("--tls-cert", cert[0], "--tls-key", cert[1], *extra))


def fill(daemon, volume, size_mb=4):
    src = os.path.join(daemon.root, f"{daemon.name}-{volume}.raw")
    with open(src, "wb") as fh:
        fh.write(os.urandom(size_mb * MiB // 2) + b"text " * (size_mb * MiB // 10))
        fh.truncate(size_mb * MiB)
    daemon.cli("volume", "import", volume, "--from", src)
    with open(src, "rb") as fh:
        return fh.read()


def incoming(target, node, volume):
    return [r for r in target.status()["incoming"]
            if r["source_node"] == node and r["volume"] == volume]


def row(source, volume):
    (r,) = [m for m in source.status()["mirrors"] if m["volume"] == volume]
    return r


def test_a_mirror_between_two_daemons_over_tls_arrives_and_status_says_so(
        daemons, key, certs):
    t = tls_target(daemons, "t", key, certs.good)
    s = daemons("s", key_file=key, nbd=False, metrics=False)
    data = fill(s, "v")
    s.cli("mirror", "start", "v", "--to", t.listen, "--interval", MANUAL,
          "--tls-ca", certs.ca_cert)
    s.cli("mirror", "sync", "v", "--timeout", "120")
    (r,) = incoming(t, s.node_id, "v")
    with open(r["image"], "rb") as fh:
        assert fh.read() == data
    kid = key_id(keys.read_key_file(key))
    assert r["tls"] is True and r["key_id"] == kid
    m = row(s, "v")
    assert m["tls"] is True and m["key_id"] == kid and m["applied_cycle"] >= 1
    assert t.status()["node"]["tls"] is True and t.status()["node"]["key_ids"] == [kid]


def _refused(source, volume, target, node, expect: str):
    wait_for(lambda: row(source, volume)["last_error"], 60, f"{volume}'s error")
    err = row(source, volume)["last_error"]
    assert expect in err, err
    assert not incoming(target, node, volume)  # nothing arrived, not even a state file
    failed = source.cli("mirror", "sync", volume, "--timeout", "5", check=False)
    assert failed.returncode != 0


def test_wrong_ca_expired_wrong_name_and_plaintext_are_each_refused_and_nothing_arrives(
        daemons, key, certs):
    good = tls_target(daemons, "good", key, certs.good)
    old = tls_target(daemons, "old", key, certs.expired("old"))
    other = tls_target(daemons, "other", key, certs.server("other", "DNS:other.example"))
    s = daemons("s", key_file=key, nbd=False, metrics=False)
    for v in ("wrongca", "expired", "wrongname", "plain"):
        fill(s, v, 1)
    start = ("--interval", MANUAL)
    s.cli("mirror", "start", "wrongca", "--to", good.listen, "--tls-ca", certs.other_ca(),
          *start)
    s.cli("mirror", "start", "expired", "--to", old.listen, "--tls-ca", certs.ca_cert, *start)
    s.cli("mirror", "start", "wrongname", "--to", other.listen, "--tls-ca", certs.ca_cert,
          *start)
    s.cli("mirror", "start", "plain", "--to", good.listen, *start)
    _refused(s, "wrongca", good, s.node_id, "is not trusted")
    _refused(s, "expired", old, s.node_id, "expired")
    _refused(s, "wrongname", other, s.node_id, "127.0.0.1")
    _refused(s, "plain", good, s.node_id, "requires TLS: start the mirror with --tls-ca")
    assert any("TLS" in e for e in good.status()["incoming_errors"])


class CorruptingProxy:
    """A TCP proxy that, while ``corrupt`` is set, flips one byte of each connection's
    source-to-target stream after its first 256 KiB (the TLS handshake is long done)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.corrupt = True
        self.flipped = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, forward):
        seen, done = 0, False
        try:
            while data := src.recv(1 << 16):
                if forward and self.corrupt and not done and seen + len(data) > 256 << 10:
                    i = max(0, (256 << 10) - seen)
                    data = data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]
                    done = True
                    self.flipped += 1
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self._stop = True
        self.listener.close()


def test_a_man_in_the_middle_changing_tls_bytes_breaks_the_link_and_nothing_is_applied(
        daemons, key, certs):
    t = tls_target(daemons, "t", key, certs.good)
    host, port = t.listen.rsplit(":", 1)
    proxy = CorruptingProxy((host, int(port)))
    try:
        s = daemons("s", key_file=key, nbd=False, metrics=False)
        data = fill(s, "v", 8)
        s.cli("mirror", "start", "v", "--to", proxy.address, "--interval", MANUAL,
              "--tls-ca", certs.ca_cert, "--tls-server-name", "localhost")
        wait_for(lambda: proxy.flipped >= 2, 60, "two corrupted connections")
        assert any("TLS" in e or "SSL" in e or "MAC" in e.upper()
                   for e in t.status()["incoming_errors"]), t.status()["incoming_errors"]
        rows = incoming(t, s.node_id, "v")
        assert all(r["applied_cycle"] == 0 for r in rows), rows  # nothing applied
        proxy.corrupt = False  # the man in the middle is gone
        s.cli("mirror", "sync", "v", "--timeout", "180")
        (r,) = incoming(t, s.node_id, "v")
        with open(r["image"], "rb") as fh:
            assert fh.read() == data
    finally:
        proxy.close()


def test_non_loopback_addresses_without_tls_are_refused_with_what_to_add(daemons, key, tmp_path):
    refused = run_cli("--store", str(tmp_path / "x"), "serve", "--listen", "0.0.0.0:0",
                      "--key-file", key, check=False, timeout=60)
    assert refused.returncode == 2
    assert "--tls-cert FILE --tls-key FILE" in refused.stderr and "--insecure" in refused.stderr
    s = daemons("s", key_file=key, nbd=False, metrics=False)
    s.cli("volume", "create", "v", "--size", "1M")
    out = s.cli("mirror", "start", "v", "--to", "192.0.2.1:7000", check=False)
    assert out.returncode == 2
    assert "--tls-ca FILE" in out.stderr and "--insecure" in out.stderr
    s.cli("mirror", "start", "v", "--to", "192.0.2.1:7000", "--insecure", "--interval", MANUAL)
    s.cli("mirror", "break", "v", "--now")


def test_a_key_rotation_needs_no_restart_and_status_names_the_key_in_use(daemons, tmp_path):
    old, new = keys.generate_key(), keys.generate_key()
    tkeys, skeys = tmp_path / "target.keys", tmp_path / "source.key"
    for path, content in ((tkeys, old.hex() + "\n"), (skeys, old.hex() + "\n")):
        path.write_text(content)
        path.chmod(0o600)
    t = daemons("t", key_file=str(tkeys), listen=True, nbd=False, metrics=False)
    s = daemons("s", key_file=str(skeys), nbd=False, metrics=False)
    fill(s, "v", 1)
    s.cli("mirror", "start", "v", "--to", t.listen, "--interval", MANUAL)
    s.cli("mirror", "sync", "v", "--timeout", "60")
    assert incoming(t, s.node_id, "v")[0]["key_id"] == key_id(old)
    # 1. The target accepts both (a second line; read on the next connection).
    tkeys.write_text(f"# rotation\n{old.hex()}\n{new.hex()}\n")
    # 2. The source moves to the new key: its next connection proves that one.
    skeys.write_text(new.hex() + "\n")
    s.cli("mirror", "break", "v")
    s.cli("mirror", "resume", "v")
    s.cli("mirror", "sync", "v", "--timeout", "60")
    assert incoming(t, s.node_id, "v")[0]["key_id"] == key_id(new)
    assert row(s, "v")["key_id"] == key_id(new)
    # 3. The old key is dropped; a source still using it is refused by its id.
    tkeys.write_text(new.hex() + "\n")
    skeys.write_text(old.hex() + "\n")
    s.cli("mirror", "break", "v")
    s.cli("mirror", "resume", "v")
    wait_for(lambda: row(s, "v")["last_error"], 60, "the old key to be refused")
    assert f"(id {key_id(old)}) is not one of this target's keys" in row(s, "v")["last_error"]
