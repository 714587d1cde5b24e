"""The command line without a daemon: help, usage errors, exit codes, keygen.

Each case runs the real ``python -m cyclemirror.cli`` in a subprocess, so
what is checked is what a shell sees: exit status, stdout, one-line stderr.
"""

import os
import stat

import pytest

from cyclemirror import errors
from cyclemirror.cli import build_parser
from tests.support.daemons import cli_env, run_cli

VERBS = [
    [], ["serve"], ["keygen"], ["demo"], ["status"],
    ["volume"], ["volume", "create"], ["volume", "import"], ["volume", "export"],
    ["volume", "list"], ["volume", "rm"],
    ["mirror"], ["mirror", "start"], ["mirror", "sync"], ["mirror", "break"],
    ["mirror", "resume"], ["mirror", "rm"],
    ["tree"], ["tree", "add"], ["tree", "list"], ["tree", "rm"],
]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v) or "top")
def test_every_command_has_help_that_exits_zero(verb):
    proc = run_cli(*verb, "--help")
    assert proc.stdout.startswith("usage: cyclemirror")
    assert proc.stderr == ""


def test_the_parser_knows_every_command_the_issue_lists():
    parser = build_parser()
    for argv in (["serve", "--nbd", "unix:/x", "--nbd", "tcp:h:1", "--listen", "h:1",
                  "--key-file", "k", "--metrics", "h:2", "--config", "c"],
                 ["keygen"],
                 ["volume", "create", "v", "--size", "1G", "--block-size", "64K"],
                 ["volume", "import", "v", "--from", "p"], ["volume", "export", "v", "--to", "p"],
                 ["volume", "list"], ["volume", "rm", "v"],
                 ["mirror", "start", "v", "--to", "h:1", "--as", "w", "--interval", "5",
                  "--compress", "zstd:3", "--bwlimit", "10M", "--key-file", "k", "--group", "g"],
                 ["mirror", "sync", "v", "--to", "h:1", "--timeout", "9"],
                 ["mirror", "break", "v", "--to", "h:1", "--now"],
                 ["mirror", "resume", "v", "--to", "h:1"],
                 ["status", "--json", "--watch"], ["demo"]):
        args = parser.parse_args(["--store", "/s", *argv])
        assert callable(args.func)


@pytest.mark.parametrize(
    "argv",
    [["volume", "create", "v"], ["mirror", "start", "v"], ["frobnicate"], [],
     ["mirror", "start", "v", "--to", "h:1", "--interval", "soon"]],
)
def test_usage_errors_exit_2(argv, tmp_path):
    proc = run_cli(*argv, store=str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


def test_bad_values_exit_2_with_one_line_naming_the_option(tmp_path):
    proc = run_cli("volume", "create", "v", "--size", "12Q", store=str(tmp_path), check=False)
    assert proc.returncode == errors.UsageError.exit_code == 2
    assert proc.stderr.count("\n") == 1 and "--size" in proc.stderr
    assert proc.stderr.startswith("cyclemirror: error: ")


def test_no_store_given_is_a_usage_error(tmp_path):
    proc = run_cli("volume", "list", check=False)
    assert proc.returncode == 2 and "CYCLEMIRROR_STORE" in proc.stderr


def test_store_from_the_environment_and_no_daemon_exits_5(tmp_path):
    env = cli_env()
    env["CYCLEMIRROR_STORE"] = str(tmp_path)
    proc = run_cli("volume", "list", check=False, env=env)
    assert proc.returncode == errors.DaemonUnavailableError.exit_code == 5
    assert str(tmp_path) in proc.stderr and proc.stderr.count("\n") == 1


def test_exit_codes_are_distinct_per_class_of_failure():
    classes = [errors.UsageError, errors.NotFoundError, errors.AlreadyExistsError,
               errors.DaemonUnavailableError, errors.PeerError, errors.IntegrityError,
               errors.DeadlineError, errors.StoreError]
    codes = [c.exit_code for c in classes]
    assert len(set(codes)) == len(codes) and all(0 < c < 126 for c in codes)


def test_keygen_prints_a_key_and_writes_a_private_key_file(tmp_path):
    from cyclemirror.keys import parse_key, read_key_file

    proc = run_cli("keygen")
    assert len(parse_key(proc.stdout)) >= 32
    assert run_cli("keygen").stdout != proc.stdout
    path = tmp_path / "k"
    run_cli("keygen", "--out", path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(read_key_file(path)) >= 32
    again = run_cli("keygen", "--out", path, check=False)
    assert again.returncode == errors.AlreadyExistsError.exit_code
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr


def test_serve_refuses_listen_without_a_key(tmp_path):
    proc = run_cli("serve", "--listen", "127.0.0.1:0", store=str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and "--key-file" in proc.stderr


def test_serve_refuses_a_bad_config_file_before_touching_the_store(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('store = "s"\nbwlimt = "1M"\n')
    proc = run_cli("serve", "--config", cfg, check=False)
    assert proc.returncode == 2 and "bwlimt" in proc.stderr
    assert not (tmp_path / "s").exists()
