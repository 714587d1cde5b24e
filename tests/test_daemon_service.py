"""One real daemon in a subprocess, driven through the real CLI: volumes, NBD, status,
metrics, config files, locking, shutdown and restart."""

import json
import os
import socket
import subprocess

import pytest

from cyclemirror import errors
from cyclemirror.daemon.nbd_client import NbdClient
from tests.support.daemons import Daemon, DaemonPool, cli_env, make_key, run_cli
from tests.support.metrics import parse_exposition, value

MiB = 1 << 20


@pytest.fixture
def daemons(tmp_path):
    with DaemonPool(tmp_path) as pool:
        yield pool.start


def test_volume_commands_round_trip_data_written_over_nbd(daemons, tmp_path):
    d = daemons("src")
    assert "created volume v1 (4194304 bytes" in d.cli("volume", "create", "v1",
                                                      "--size", "4M").stdout
    payload = os.urandom(3 * 4096 + 100)
    with NbdClient("v1", unix_path=d.nbd_sock) as nbd:
        assert nbd.size == 4 * MiB
        nbd.write(8192, payload, fua=True)
        nbd.flush()
    out = tmp_path / "v1.img"
    d.cli("volume", "export", "v1", "--to", out)
    data = out.read_bytes()
    assert len(data) == 4 * MiB and data[8192:8192 + len(payload)] == payload
    assert data[:8192] == bytes(8192) and data[8192 + len(payload):].count(0) == len(
        data) - 8192 - len(payload)
    # import what we exported: same bytes under a new name
    d.cli("volume", "import", "v2", "--from", out, "--block-size", "64K")
    listed = json.loads(d.cli("volume", "list", "--json").stdout)
    assert listed == [{"name": "v1", "size": 4 * MiB, "block_size": 4096},
                      {"name": "v2", "size": 4 * MiB, "block_size": 65536}]
    with NbdClient("v2", unix_path=d.nbd_sock) as nbd:
        assert nbd.read(0, 4 * MiB) == data
    d.cli("volume", "rm", "v2")
    assert [v["name"] for v in d.status()["volumes"]] == ["v1"]


def test_errors_from_the_daemon_keep_their_exit_codes(daemons, tmp_path):
    d = daemons("src")
    d.cli("volume", "create", "v1", "--size", "1M")
    cases = [
        (("volume", "create", "v1", "--size", "1M"), errors.AlreadyExistsError),
        (("volume", "rm", "nope"), errors.NotFoundError),
        (("volume", "export", "nope", "--to", tmp_path / "x"), errors.NotFoundError),
        (("volume", "import", "v9", "--from", tmp_path / "missing"), errors.NotFoundError),
        (("volume", "create", "bad/name", "--size", "1M"), errors.UsageError),
        (("volume", "create", "v3", "--size", "4097"), errors.UsageError),
        (("mirror", "start", "nope", "--to", "127.0.0.1:9"), errors.NotFoundError),
        (("mirror", "start", "v1", "--to", "127.0.0.1:9"), errors.UsageError),  # no key
        (("mirror", "start", "v1", "--to", "127.0.0.1:0"), errors.UsageError),
        (("mirror", "start", "v1", "--to", "h:1", "--compress", "gzip"), errors.UsageError),
        (("mirror", "sync", "v1"), errors.NotFoundError),
        (("mirror", "break", "v1"), errors.NotFoundError),
    ]
    for argv, cls in cases:
        proc = d.cli(*argv, check=False)
        assert proc.returncode == cls.exit_code, (argv, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("cyclemirror: error:")
    d.cli("volume", "export", "v1", "--to", tmp_path / "once")
    proc = d.cli("volume", "export", "v1", "--to", tmp_path / "once", check=False)
    assert proc.returncode == errors.AlreadyExistsError.exit_code


def test_status_and_metrics_agree_on_the_store(daemons):
    d = daemons("src")
    d.cli("volume", "create", "a", "--size", "2M")
    d.cli("volume", "create", "b", "--size", "8M", "--block-size", "16K")
    doc = d.status()
    assert doc["schema"] == 1 and doc["node"]["store"] == d.store
    assert doc["node"]["nbd"] == [f"unix:{d.nbd_sock}"]
    assert {v["name"]: v["size"] for v in doc["volumes"]} == {"a": 2 * MiB, "b": 8 * MiB}
    table = d.cli("status").stdout
    assert "a" in table and "8.0 MiB" in table and doc["node"]["id"] in table
    types, samples = parse_exposition(d.scrape())
    assert value(samples, "cyclemirror_volumes") == 2
    assert value(samples, "cyclemirror_info", node_id=doc["node"]["id"]) == 1
    watch = d.cli("status", "--watch", "--json", "--count", "2", "--every", "0.1").stdout
    lines = watch.splitlines()
    assert len(lines) == 2 and all(json.loads(x)["schema"] == 1 for x in lines)


def test_one_daemon_per_store_and_sigterm_stops_cleanly(daemons, tmp_path):
    d = daemons("src")
    second = Daemon(tmp_path, "src", metrics=False, nbd=False)
    proc = subprocess.run(second_cmd(second), capture_output=True, text=True, timeout=30,
                          env=cli_env())
    assert proc.returncode != 0 and "another process" in proc.stderr
    assert d.stop() == 0
    assert not os.path.exists(os.path.join(d.store, "control.sock"))
    assert "stopped" in d.log()


def second_cmd(daemon):
    import sys

    return [sys.executable, "-m", "cyclemirror.cli", "--store", daemon.store, "serve",
            *daemon.args]


def test_a_port_in_use_is_a_clear_error_not_an_internal_one(tmp_path):
    """The system's refusals at start-up (port taken, disk full, no permission) name the
    store, the cause and what to do, and leave no half-started daemon behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        key = make_key(tmp_path / "key")
        d = Daemon(tmp_path, "src", metrics=False, nbd=False,
                   extra=("--listen", f"127.0.0.1:{port}", "--key-file", key))
        proc = subprocess.run(second_cmd(d), capture_output=True, text=True, timeout=30,
                              env=cli_env())
    assert proc.returncode == errors.UsageError.exit_code, proc.stderr
    assert "internal error" not in proc.stderr
    assert "Address already in use" in proc.stderr and "another port" in proc.stderr
    assert str(tmp_path / "src") in proc.stderr
    assert not os.path.exists(os.path.join(d.store, "control.sock"))


def test_flushed_writes_and_volumes_survive_kill_9_and_restart(daemons, tmp_path):
    d = daemons("src")
    d.cli("volume", "create", "v", "--size", "1M")
    with NbdClient("v", unix_path=d.nbd_sock) as nbd:
        nbd.write(0, b"before-kill" * 100)
        nbd.flush()
    d.kill()
    d.start()
    with NbdClient("v", unix_path=d.nbd_sock) as nbd:
        assert nbd.read(0, 1100) == b"before-kill" * 100


def test_config_file_sets_store_nbd_and_metrics_with_flags_winning(tmp_path):
    sock = tmp_path / "cfg-nbd.sock"
    cfg = tmp_path / "cm.toml"
    cfg.write_text(f'store = "cfgstore"\nnode_name = "from-config"\nnbd = "unix:{sock.name}"\n'
                   'metrics = "127.0.0.1:0"\nlog_level = "debug"\n')
    d = Daemon(tmp_path, "cfgstore", nbd=False, metrics=False,
               extra=("--config", str(cfg), "--node-name", "from-flag", "--bwlimit", "1M"))
    d.start()
    try:
        doc = d.status()
        assert doc["node"]["store"] == str(tmp_path / "cfgstore")
        assert doc["node"]["name"] == "from-flag" and doc["node"]["bwlimit"] == MiB
        assert doc["node"]["nbd"] == [f"unix:{sock}"] and doc["node"]["metrics"]
        d.cli("volume", "create", "v", "--size", "1M")
        with NbdClient("v", unix_path=str(sock)) as nbd:
            assert nbd.size == 1 * MiB
    finally:
        assert d.stop() == 0


def test_control_socket_survives_hostile_clients(daemons):
    d = daemons("src")
    for junk in (b"\x00" * 100 + b"\n", b"{" * 70000, b'{"v":1,"op":"volume.rm","args":{}}\n'):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(os.path.join(d.store, "control.sock"))
        try:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.recv(65536)
        except OSError:
            pass
        s.close()
    assert run_cli("status", "--json", store=d.store).returncode == 0


def test_status_watch_redraws_in_place_on_a_terminal(daemons):
    import pty
    import sys

    d = daemons("src")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cyclemirror.cli", "--store", d.store,
                             "status", "--watch", "--count", "3", "--every", "0.2"],
                            stdout=slave, stderr=subprocess.PIPE, env=cli_env())
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert proc.wait(timeout=30) == 0
    assert output.count(b"\x1b[H\x1b[2J") == 3  # home + clear before each frame
    assert output.count(b"cyclemirror status") == 3
