"""What the command line loads: the thin-client verbs and --help start without the daemon's machinery.

Monitoring scripts run ``cyclemirror status --json`` every few seconds, so
the verbs that only talk JSON to the daemon must not import numpy, the
compiled modules, the NBD server, the sender, ssl, logging, threads...  and
the parser builds only the verb it is given.  These tests check that
property, never a time (bench/bench_cli_startup.py measures the time): each
case is a fresh interpreter running the console script's code (``from
cyclemirror.cli import main; sys.exit(main())``) against real daemons, which
records the modules that were imported after the interpreter's own start-up.

A module the interpreter's start-up already imported (site, .pth files) is
not seen here; the cyclemirror modules always are, and each case lists the
ones it may load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from cyclemirror.cli import build_parser
from tests.support.daemons import DaemonPool, cli_env, make_key, run_cli

# Runs the CLI as the console script does and writes what it imported to argv[1].
PROBE = r"""
import sys
before = set(sys.modules)
record = sys.argv.pop(1)
code = None
try:
    from cyclemirror.cli import main
    code = main()
except SystemExit as exc:
    code = exc.code
finally:
    imported = sorted(set(sys.modules) - before)
    import json
    with open(record, "w") as fh:
        json.dump({"code": code, "imported": imported}, fh)
sys.exit(code)
"""

# Never for a thin-client verb or --help: third-party and compiled modules,
# the daemon's parts, and the standard library's heavier corners.
HEAVY_PREFIXES = (
    "numpy", "lz4", "zstandard", "xxhash", "prometheus_client",
    "cyclemirror._cext", "cyclemirror.store", "cyclemirror.sender", "cyclemirror.receiver",
    "cyclemirror.nbd", "cyclemirror.wire", "cyclemirror.daemon.service",
    "cyclemirror.daemon.control", "cyclemirror.daemon.config", "cyclemirror.daemon.metrics",
    "ssl", "_ssl", "hashlib", "_hashlib", "logging", "threading", "socket", "selectors",
    "typing", "dataclasses", "subprocess", "tempfile", "shutil", "zlib", "bz2", "lzma",
    "asyncio", "concurrent", "urllib", "http", "email", "tomllib", "uuid", "random",
    "pathlib", "inspect", "ipaddress",
)
# The cyclemirror modules every verb that asks the daemon needs.
CLIENT = {"cyclemirror", "cyclemirror.cli", "cyclemirror.errors", "cyclemirror.daemon",
          "cyclemirror.daemon.control_client"}
HELP = {"cyclemirror", "cyclemirror.cli", "cyclemirror.errors"}
RENDER = {"cyclemirror.daemon.render", "cyclemirror.units"}
MIRROR_VERBS = {"cyclemirror.cli_failover"}  # the mirror actions are built together


def _is_heavy(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in HEAVY_PREFIXES)


def probe(tmp_path, *argv) -> tuple[subprocess.CompletedProcess, int, list[str]]:
    """Run ``cyclemirror ARGV`` in a fresh interpreter: the process, its exit code, its imports."""
    record = tmp_path / "imported.json"
    record.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(record), *map(str, argv)],
                          capture_output=True, text=True, timeout=120, env=cli_env())
    assert record.exists(), f"the probe did not run: {proc.stderr}"
    result = json.loads(record.read_text())
    assert result["code"] == proc.returncode
    return proc, proc.returncode, result["imported"]


def check_imports(argv, imported: list[str], allowed_ours: set[str]) -> None:
    heavy = [m for m in imported if _is_heavy(m)]
    assert heavy == [], f"'cyclemirror {' '.join(map(str, argv))}' imported {heavy}"
    ours = {m for m in imported if m.split(".")[0] == "cyclemirror"}
    assert ours <= allowed_ours, (f"'cyclemirror {' '.join(map(str, argv))}' imported "
                                  f"{sorted(ours - allowed_ours)} beyond {sorted(allowed_ours)}")


def test_the_probe_sees_what_a_verb_imports(tmp_path):
    # The check can fail: 'serve' without a store loads the daemon before it refuses.
    proc, code, imported = probe(tmp_path, "serve")
    assert code == 2 and "no store given" in proc.stderr
    assert "cyclemirror.daemon.service" in imported  # run_daemon is imported up front
    assert [m for m in imported if _is_heavy(m)]


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["volume", "list", "--help"]],
                         ids=" ".join)
def test_help_builds_only_its_verb_and_imports_nothing_heavy(tmp_path, argv):
    proc, code, imported = probe(tmp_path, *argv)
    assert code == 0 and proc.stdout.startswith("usage: cyclemirror"), proc.stderr
    check_imports(argv, imported, HELP)  # not cli_failover: the mirror verb was not built


def test_mirror_help_builds_the_mirror_actions_only(tmp_path):
    proc, code, imported = probe(tmp_path, "mirror", "promote", "--help")
    assert code == 0 and "usage: cyclemirror mirror promote" in proc.stdout
    check_imports(["mirror", "promote", "--help"], imported, HELP | MIRROR_VERBS)


def test_usage_errors_import_nothing_heavy(tmp_path):
    proc, code, imported = probe(tmp_path, "status", "--every")
    assert code == 2 and "expected one argument" in proc.stderr
    check_imports(["status", "--every"], imported, HELP)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """A source daemon mirroring volume v1 to a target daemon, both real."""
    root = tmp_path_factory.mktemp("startup")
    with DaemonPool(root) as pool:
        key = make_key(root / "mirror.key")
        target = pool.start("dst", listen=True, key_file=key, nbd=False, metrics=False)
        source = pool.start("src", key_file=key, nbd=False, metrics=False)
        source.cli("volume", "create", "v1", "--size", "1M")
        source.cli("mirror", "start", "v1", "--to", target.listen, "--interval", "60")
        source.cli("mirror", "sync", "v1")
        yield source


def test_thin_client_verbs_against_a_daemon_import_nothing_heavy(mirrored, tmp_path):
    store = mirrored.store
    # (argv, what its stdout must show, the cyclemirror modules it may load); in this
    # order, since break and resume change the mirror.
    cases = [
        (["status", "--json"], '"v1"', CLIENT),
        (["status", "--check"], "OK", CLIENT | RENDER),
        (["status"], "v1", CLIENT | RENDER),
        (["status", "--json", "--watch", "--count", "2", "--every", "0.01"], '"v1"',
         CLIENT | {"cyclemirror.units"}),
        (["volume", "list", "--json"], '"v1"', CLIENT),
        (["volume", "list"], "v1", CLIENT | {"cyclemirror.units"}),
        (["file", "list", "--json"], "[]", CLIENT),
        (["mirror", "sync", "v1", "--json"], '"v1"', CLIENT | MIRROR_VERBS | {"cyclemirror.units"}),
        (["mirror", "break", "v1"], "v1 ->", CLIENT | MIRROR_VERBS),
        (["mirror", "resume", "v1"], "resumed", CLIENT | MIRROR_VERBS),
    ]
    for argv, shown, allowed in cases:
        proc, code, imported = probe(tmp_path, "--store", store, *argv)
        assert code == 0, f"{argv}: exit {code}: {proc.stderr}"
        assert shown in proc.stdout, (argv, proc.stdout)
        check_imports(argv, imported, allowed)


def test_no_daemon_is_reported_without_importing_anything_heavy(tmp_path):
    proc, code, imported = probe(tmp_path, "--store", tmp_path, "status", "--json")
    assert code == 5 and "no daemon answers" in proc.stderr
    check_imports(["status", "--json"], imported, CLIENT)
    proc, code, imported = probe(tmp_path, "--store", tmp_path, "status", "--check")
    assert code == 3 and proc.stdout.startswith("UNKNOWN: no daemon answers")


# -- the parser built verb by verb behaves as one built whole ----------------------------------

def _commands(parser: argparse.ArgumentParser, path=()):
    """Every command of the tree, (path, parser), building each parser on the way."""
    parser.format_help()  # a parser gets its arguments on first use
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from _commands(child, (*path, name))


def test_every_command_gets_its_arguments_and_function_once_built():
    commands = dict(_commands(build_parser()))
    expected = {("serve",), ("keygen",), ("demo",), ("status",), ("volume", "create"),
                ("volume", "list"), ("file", "add"), ("mirror", "start"), ("mirror", "sync"),
                ("mirror", "break"), ("mirror", "resume"), ("mirror", "verify"),
                ("mirror", "scrub"), ("mirror", "promote"), ("mirror", "switchover")}
    assert expected <= set(commands)
    for path, parser in commands.items():
        assert callable(parser.get_default("func")), path
        assert parser.format_usage().startswith(f"usage: cyclemirror {' '.join(path)}"), path
    # Parsing a verb twice with one parser builds it once (argparse refuses duplicates).
    parser = build_parser()
    for _ in range(2):
        args = parser.parse_args(["mirror", "sync", "v1", "--timeout", "5"])
        assert args.func.__name__ == "cmd_mirror_sync" and args.timeout == "5"


def test_status_every_is_still_checked_and_defaults_to_one_second(tmp_path):
    proc = run_cli("status", "--every", "0", store=str(tmp_path), check=False)
    assert proc.returncode == 2 and "--every" in proc.stderr
    args = build_parser().parse_args(["status", "--watch"])
    assert args.every is None  # cmd_status reads None as DEFAULT_STATUS_EVERY
    status = dict(_commands(build_parser()))[("status",)]
    assert "refresh period of --watch (default 1)" in " ".join(status.format_help().split())
