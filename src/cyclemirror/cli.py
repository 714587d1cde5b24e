"""The ``cyclemirror`` command line: a thin client of the daemon of one store.

Every verb except ``serve``, ``keygen`` and ``demo`` turns its arguments into
one request on the store's control socket (``cyclemirror.daemon.control``)
and prints the reply, as a table or, with ``--json`` where offered, as the
documented JSON.  ``serve`` runs the daemon in the foreground.

Exit codes come from one place, ``main``: a ``CycleMirrorError`` (raised here
or rebuilt from the daemon's reply) exits with its ``exit_code`` after one
line on stderr; argparse usage errors exit 2; Ctrl-C exits 130.  The table of
codes is in docs/cli.md.

Start-up: monitoring scripts run ``status --json`` every few seconds, so a
verb loads only what it uses.  Modules beyond argparse are imported inside the
verbs; the thin-client verbs reach the daemon through
``cyclemirror.daemon.control_client``, which imports nothing heavy; and each
verb's parser gets its arguments when that verb is parsed (``_Parser``).
tests/test_cli_startup.py checks what they import.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cyclemirror.errors import AlreadyExistsError, CycleMirrorError, UsageError

EXIT_INTERRUPTED = 130
EXIT_MISMATCH = 7  # verify or scrub found blocks that differ (IntegrityError's code)
EXIT_REPAIR_PENDING = 8  # the repair cycle was not held by the target in time (DeadlineError)
STORE_ENV = "CYCLEMIRROR_STORE"
DEFAULT_SYNC_TIMEOUT = 300.0
DEFAULT_STATUS_EVERY = 1.0  # seconds between refreshes of 'status --watch'


def _store_dir(args) -> str:
    store = args.store or os.environ.get(STORE_ENV)
    if not store:
        raise UsageError(
            f"no store given: pass --store DIR before the command or set {STORE_ENV}")
    return os.path.abspath(store)


def _client(args, timeout: float | None = 30.0):
    from cyclemirror.daemon.control_client import ControlClient

    return ControlClient(_store_dir(args), timeout=timeout)


def _call(args, op: str, *, reply_timeout: float | None = 60.0, **request):
    """One request; ``reply_timeout`` None means wait as long as the daemon works."""
    with _client(args, timeout=reply_timeout) as client:
        return client.call(op, **request)


def _print_json(value) -> None:
    import json

    print(json.dumps(value, indent=2, sort_keys=True))


# -- serve, keygen, demo ---------------------------------------------------------------------

def cmd_serve(args) -> int:
    from cyclemirror import failpoints
    from cyclemirror.daemon.config import (
        DaemonConfig,
        check_ceph_client,
        check_ceph_name,
        check_keep_cycles,
        load_config,
        parse_hostport,
        parse_link_timeout,
        parse_nbd_endpoint,
    )
    from cyclemirror.daemon.service import run_daemon
    from cyclemirror.units import parse_rate

    for spec in args.failpoint or ():  # tests only: see cyclemirror/failpoints.py
        failpoints.enable(*failpoints.parse_spec(spec))
    config = load_config(args.config) if args.config else DaemonConfig()
    store = args.store or os.environ.get(STORE_ENV) or config.store
    if not store:
        raise UsageError(f"no store given: pass --store DIR, set {STORE_ENV}, "
                         "or set 'store' in the --config file")
    config = config.merged_with(
        store=os.path.abspath(store),
        node_name=args.node_name,
        nbd=tuple(parse_nbd_endpoint(e) for e in args.nbd) if args.nbd else None,
        listen=parse_hostport(args.listen, "--listen", listening=True) if args.listen else None,
        key_file=os.path.abspath(args.key_file[0]) if args.key_file else None,
        extra_key_files=(tuple(os.path.abspath(k) for k in args.key_file[1:])
                         if args.key_file else None),
        tls_cert=os.path.abspath(args.tls_cert) if args.tls_cert else None,
        tls_key=os.path.abspath(args.tls_key) if args.tls_key else None,
        tls_ca=os.path.abspath(args.tls_ca) if args.tls_ca else None,
        insecure=True if args.insecure else None,
        nbd_tls_psk=os.path.abspath(args.nbd_tls_psk) if args.nbd_tls_psk else None,
        nbd_tls_cert=os.path.abspath(args.nbd_tls_cert) if args.nbd_tls_cert else None,
        nbd_tls_key=os.path.abspath(args.nbd_tls_key) if args.nbd_tls_key else None,
        nbd_tls_ca=os.path.abspath(args.nbd_tls_ca) if args.nbd_tls_ca else None,
        link_timeout=(parse_link_timeout(args.link_timeout)
                      if args.link_timeout is not None else None),
        metrics=parse_hostport(args.metrics, "--metrics", listening=True) if args.metrics else None,
        bwlimit=parse_rate(args.bwlimit, "--bwlimit") if args.bwlimit is not None else None,
        log_level=args.log_level,
        rbd_pool=check_ceph_name(args.rbd_pool, "--rbd-pool") if args.rbd_pool else None,
        rbd_namespace=(check_ceph_name(args.rbd_namespace, "--rbd-namespace")
                       if args.rbd_namespace else None),
        ceph_conf=os.path.abspath(args.ceph_conf) if args.ceph_conf else None,
        ceph_client=check_ceph_client(args.ceph_client, "--ceph-client")
        if args.ceph_client else None,
        ceph_keyring=os.path.abspath(args.ceph_keyring) if args.ceph_keyring else None,
        rbd_keep_cycles=(check_keep_cycles(args.keep_cycles, "--keep-cycles")
                         if args.keep_cycles is not None else None),
    )
    config.rbd_config()  # refuses Ceph settings without a pool
    if config.listen is not None and config.key_file is None:
        raise UsageError("--listen needs --key-file (the pre-shared key peers must prove); "
                         "make one with 'cyclemirror keygen --out FILE'")
    return run_daemon(config)


def cmd_keygen(args) -> int:
    from cyclemirror import keys

    if args.out:
        try:
            keys.write_key_file(args.out, keys.generate_key())
        except FileExistsError:
            raise AlreadyExistsError(
                f"{args.out} already exists; keygen never overwrites a key (peers may use "
                "it): remove it first or choose another path") from None
        except OSError as exc:
            raise UsageError(f"cannot write key file {args.out}: {exc.strerror}") from None
        print(f"wrote a new key to {args.out} (mode 0600); copy it to every peer")
    else:
        sys.stdout.write(keys.keygen_text())
    return 0


def cmd_demo(args) -> int:
    from cyclemirror.demo import run_demo

    return run_demo(keep=args.keep, seconds=args.seconds)


# -- volumes -------------------------------------------------------------------------------

def cmd_volume_create(args) -> int:
    from cyclemirror.units import parse_size

    size = parse_size(args.size, "--size")
    block_size = parse_size(args.block_size, "--block-size")
    info = _call(args, "volume.create", name=args.name, size=size, block_size=block_size)
    print(f"created volume {info['name']} ({info['size']} bytes, block size "
          f"{info['block_size']})")
    return 0


def cmd_volume_import(args) -> int:
    from cyclemirror.units import parse_size

    info = _call(args, "volume.import", name=args.name, path=os.path.abspath(args.src),
                 block_size=parse_size(args.block_size, "--block-size"), reply_timeout=None)
    print(f"imported {args.src} as volume {info['name']} ({info['size']} bytes)")
    return 0


def cmd_volume_export(args) -> int:
    info = _call(args, "volume.export", name=args.name, path=os.path.abspath(args.dest),
                 reply_timeout=None)
    print(f"exported volume {args.name} to {info['path']} ({info['size']} bytes)")
    return 0


def cmd_volume_list(args) -> int:
    volumes = _call(args, "volume.list")
    if args.json:
        _print_json(volumes)
        return 0
    from cyclemirror.units import format_size

    if not volumes:
        print("no volumes")
    for v in volumes:
        print(f"{v['name']}\t{format_size(v['size'])}\t{v['size']} bytes\tblock {v['block_size']}")
    return 0


def cmd_volume_rm(args) -> int:
    _call(args, "volume.rm", name=args.name)
    print(f"removed volume {args.name}")
    return 0


# -- file objects (docs/files.md) ----------------------------------------------------------

def cmd_file_add(args) -> int:
    from cyclemirror.units import parse_size

    info = _call(args, "file.add", name=args.name, path=os.path.abspath(args.path),
                 block_size=parse_size(args.block_size, "--block-size"))
    print(f"added file object {info['name']}: {info['path']} ({info['fs']}, {info['size']} "
          f"bytes, block size {info['block_size']}, consistency {info['consistency']})")
    return 0


def _print_objects(args, op: str, kind: str, columns) -> int:
    """``file list`` / ``tree list``: the JSON, or a line per object (``columns(obj)``, the
    cells between its path and its consistency) and one per object that cannot be read."""
    objs = _call(args, op)
    if args.json:
        _print_json(objs)
        return 0
    if not objs:
        print(f"no {kind} objects")
    for o in objs:
        if "error" in o:
            print(f"{o['name']}\terror: {o['error']}")
            continue
        print("\t".join([o["name"], o["path"], *columns(o), o["consistency"],
                         f"frozen cycle {o['frozen_cycle']}"]))
    return 0


def cmd_file_list(args) -> int:
    def columns(f):
        from cyclemirror.units import format_size  # the text only: --json does without

        return [f["fs"], format_size(f["size"])]

    return _print_objects(args, "file.list", "file", columns)


def cmd_file_rm(args) -> int:
    _call(args, "file.rm", name=args.name)
    print(f"removed file object {args.name} (the file itself is untouched)")
    return 0


# -- tree objects (docs/trees.md) ----------------------------------------------------------

def cmd_tree_add(args) -> int:
    info = _call(args, "tree.add", name=args.name, path=os.path.abspath(args.path))
    print(f"added tree object {info['name']}: {info['path']} ({info['fs']} subvolume, "
          f"consistency {info['consistency']})")
    return 0


def cmd_tree_list(args) -> int:
    return _print_objects(args, "tree.list", "tree", lambda t: [t["fs"]])


def cmd_tree_rm(args) -> int:
    _call(args, "tree.rm", name=args.name)
    print(f"removed tree object {args.name} (the tree itself is untouched)")
    return 0


# -- mirrors -------------------------------------------------------------------------------

def cmd_mirror_start(args) -> int:
    request = {"volume": args.volume, "to": args.to, "interval": args.interval,
               "compress": args.compress, "bwlimit": args.bwlimit, "group": args.group,
               "rpo": args.rpo, "pace": args.pace or None}
    if args.remote_name:
        request["as"] = args.remote_name
    if args.key_file:
        request["key_file"] = os.path.abspath(args.key_file)
    if args.tls_ca:
        request["tls_ca"] = os.path.abspath(args.tls_ca)
    if args.tls_server_name:
        request["tls_server_name"] = args.tls_server_name
    if args.insecure:
        request["insecure"] = True
    info = _call(args, "mirror.start", reply_timeout=60,
                 **{k: v for k, v in request.items() if v is not None})
    group = info.get("group")
    cadence = (f"with an RPO objective of {info['rpo']:g}s"
               + (f" (at most {info['interval']:g}s between freezes)" if info["interval"] else "")
               + (", pacing writers to keep it" if info.get("pace") else "")
               if info.get("rpo") else f"every {info['interval']}s")
    print(f"mirroring {info['volume']} to {info['target']} as {info['remote_name']} {cadence}"
          + (f" in group {group} (on the target: {info.get('target_mirror')})" if group else ""))
    return 0


def cmd_mirror_sync(args) -> int:
    from cyclemirror.units import parse_seconds

    timeout = parse_seconds(args.timeout, "--timeout", allow_zero=False)
    request = {"volume": args.volume, "timeout": timeout}
    if args.to:
        request["to"] = args.to
    # The daemon enforces the deadline; the socket waits a little longer for its answer.
    results = _call(args, "mirror.sync", reply_timeout=timeout + 30, **request)
    if args.json:
        _print_json(results)
        return 0
    for r in results:
        if r.get("skipped"):
            print(f"{r['volume']} -> {r['target']}: not waited for: {r['skipped']} "
                  f"(applied cycle {r['applied_cycle']})")
        else:
            print(f"{r['volume']} -> {r['target']}: cycle {r['applied_cycle']} applied "
                  f"(freeze at {r['applied_freeze_time']:.3f})")
    return 0


def cmd_mirror_break(args) -> int:
    request = {"volume": args.volume, "now": args.now}
    if args.to:
        request["to"] = args.to
    results = _call(args, "mirror.break", reply_timeout=None, **request)
    for r in results:
        if r["phase"] == "broken":
            print(f"{r['volume']} -> {r['target']}: broken after cycle {r['applied_cycle']}")
        else:
            print(f"{r['volume']} -> {r['target']}: break recorded; cycle {r['cycle']} is still "
                  f"{r['phase']} and ends the repetition when done (--now abandons it)")
    return 0


def cmd_mirror_resume(args) -> int:
    request = {"volume": args.volume}
    if args.to:
        request["to"] = args.to
    results = _call(args, "mirror.resume", **request)
    for r in results:
        print(f"{r['volume']} -> {r['target']}: resumed")
    return 0


def cmd_mirror_rm(args) -> int:
    if "/" in args.volume:  # on a target: an incoming mirror
        if args.to:
            raise UsageError(f"--to is for an outgoing mirror; {args.volume!r} names an "
                             "incoming one (SOURCE/NAME), which has no targets")
        info = _call(args, "mirror.rm", image=args.volume, force=args.force)
        if info.get("kind") == "tree":  # docs/trees.md
            print(f"removed incoming tree mirror "
                  f"{info['source_name'] or info['source_node']}/{info['mirror']} "
                  "(the tree and its state)")
            return 0
        print(f"removed incoming mirror {info['source_name'] or info['source_node']}/"
              f"{info['mirror']} ({', '.join(v + '.img' for v in info['volumes'])} and its "
              f"state, {len(info['removed'])} files)")
        return 0
    request = {"volume": args.volume}
    if args.to:
        request["to"] = args.to
    if args.force:
        request["force"] = True
    results = _call(args, "mirror.rm", **request)
    for r in results:
        print(f"{r['volume']} -> {r['target']}: mirror removed")
    return 0


def _check_request(args, request: dict) -> dict:
    from cyclemirror.units import parse_rate, parse_size

    if args.offset is not None:
        request["offset"] = parse_size(args.offset, "--offset")
    if args.length is not None:
        request["length"] = parse_size(args.length, "--length")
    if args.bwlimit is not None:
        request["bwlimit"] = parse_rate(args.bwlimit, "--bwlimit")
    if args.restart:
        request["restart"] = True
    return request


def cmd_mirror_verify(args) -> int:
    from cyclemirror.daemon.render import render_verify

    request = _check_request(args, {"volume": args.volume, "repair": args.repair})
    if args.to:
        request["to"] = args.to
    # A verify reads the whole volume on both sides: wait as long as it takes.
    results = _call(args, "mirror.verify", reply_timeout=None, **request)
    if args.json:
        _print_json(results)
    else:
        for r in results:
            sys.stdout.write(render_verify(r))
    states = {r["state"] for r in results}
    if "mismatch" in states:
        return EXIT_MISMATCH
    if "repairing" in states:
        return EXIT_REPAIR_PENDING
    return 0


def cmd_mirror_scrub(args) -> int:
    from cyclemirror.daemon.render import render_scrub

    result = _call(args, "mirror.scrub", reply_timeout=None,
                   **_check_request(args, {"image": args.image}))
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(render_scrub(result))
    return EXIT_MISMATCH if result["state"] == "rot" else 0


# -- status --------------------------------------------------------------------------------

EXIT_CHECK_UNKNOWN = 3  # status --check: the daemon could not be asked (Nagios "UNKNOWN")


def cmd_status(args) -> int:
    # 'status --json' is what monitoring scripts run: it imports neither the
    # renderer nor the unit parser unless asked for text, --check or --every.
    if args.check:
        from cyclemirror.daemon.render import check_status

        # For monitoring systems: one line, exit 0 ok / 1 at risk / 2 violated.
        try:
            doc = _call(args, "status")
        except CycleMirrorError as exc:
            print(f"UNKNOWN: {exc}")
            return EXIT_CHECK_UNKNOWN
        code, line = check_status(doc)
        print(line)
        return code
    if args.every is None:
        every = DEFAULT_STATUS_EVERY
    else:
        from cyclemirror.units import parse_seconds

        every = parse_seconds(args.every, "--every", allow_zero=False)
    with _client(args) as client:
        if not args.watch:
            doc = client.call("status")
            if args.json:
                _print_json(doc)
            else:
                from cyclemirror.daemon.render import render_status

                sys.stdout.write(render_status(doc))
            return 0
        # --watch: redraw in place on a terminal; JSON lines when --json.
        if args.json:
            import json
        else:
            from cyclemirror.daemon.render import CLEAR_SCREEN, render_status
        count = 0
        while args.count == 0 or count < args.count:
            doc = client.call("status")
            if args.json:
                sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
            else:
                stamp = time.strftime("%H:%M:%S")
                prefix = CLEAR_SCREEN if sys.stdout.isatty() else "\n"
                sys.stdout.write(f"{prefix}cyclemirror status  {stamp}  (every {every:g}s, "
                                 "Ctrl-C to stop)\n" + render_status(doc))
            sys.stdout.flush()
            count += 1
            if args.count == 0 or count < args.count:
                time.sleep(every)
    return 0


# -- parser --------------------------------------------------------------------------------
#
# Monitoring scripts run 'cyclemirror status --json' every few seconds, so the
# parser costs only what the verb given needs: each verb's parser gets its
# arguments on its first use (_Parser), and help text is laid out without
# importing shutil (_HelpFormatter).  tests/test_cli_startup.py checks what a
# thin-client verb imports; bench/bench_cli_startup.py measures it.


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns, without importing shutil (zlib, bz2, lzma...)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter; finds the width as argparse does, but without shutil.

    argparse makes a formatter for every argument it is given (to check its
    metavar), and its formatter imports shutil for the terminal's width."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None, **kwargs):
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width, **kwargs)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose arguments ``build(parser)`` adds when it is first used.

    ``add_parser(..., build=FUNC)`` on its sub-parsers makes more of them, so a
    verb's arguments (and its actions') are only made when that verb is
    parsed or its help is shown; the top level's help needs only each verb's
    ``help=``, given to ``add_parser`` itself."""

    def __init__(self, *args, build=None, formatter_class=_HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self._build = build

    def _built(self) -> None:
        build, self._build = self._build, None
        if build is not None:
            build(self)

    def parse_known_args(self, args=None, namespace=None):
        self._built()
        return super().parse_known_args(args, namespace)

    def format_usage(self):
        self._built()
        return super().format_usage()

    def format_help(self):
        self._built()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each verb adds its own arguments when it is parsed (_Parser)."""
    parser = _Parser(
        prog="cyclemirror",
        description="Asynchronous, cycle-based, always-consistent mirroring of block volumes. "
                    "Run one 'cyclemirror serve' per host; every other command talks to it.",
        epilog=f"The store is chosen by --store DIR or ${STORE_ENV}. Exit codes: 0 ok, "
               "1 other failure, 2 usage/config, 3 not found, 4 already exists, 5 no daemon, "
               "6 peer refused or broke protocol, 7 integrity, 8 timeout, 9 store I/O, "
               "130 interrupted (details: docs/cli.md).",
    )
    parser.add_argument("--store", metavar="DIR",
                        help=f"the store directory (default: ${STORE_ENV})")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    verbs.add_parser("serve", help="run the daemon of the store in the foreground",
                     description="Run the daemon: serves volumes over NBD, accepts "
                                 "incoming mirrors, runs outgoing ones, answers the CLI.",
                     build=_serve_arguments)
    verbs.add_parser("keygen", help="make a new pre-shared mirror key",
                     description="Print a new random key (hex), or write it to a new "
                                 "file with mode 0600.", build=_keygen_arguments)
    verbs.add_parser("volume", help="create, import, export, list, remove volumes",
                     build=_volume_actions)
    verbs.add_parser("file", help="add, list, remove file objects (files on XFS/btrfs "
                                  "mirrored like volumes)", build=_file_actions)
    verbs.add_parser("tree", help="add, list, remove tree objects (directory trees in a btrfs "
                                  "subvolume)", build=_tree_actions)
    verbs.add_parser("mirror", help="start, sync, break, resume, verify, scrub mirrors",
                     build=_mirror_actions)
    verbs.add_parser("status", help="show volumes, mirrors and incoming mirrors",
                     build=_status_arguments)
    verbs.add_parser("demo", help="run a source and a target on loopback and show a "
                                  "mirror at work (needs nothing else)", build=_demo_arguments)
    return parser


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The daemon's settings."""
    serve.add_argument("--nbd", action="append", metavar="unix:PATH|tcp:HOST:PORT",
                       help="serve the volumes over NBD here (repeatable)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="accept incoming mirrors here")
    serve.add_argument("--key-file", metavar="FILE", action="append",
                       help="pre-shared key(s) for incoming mirrors; the first key of the "
                            "first file is the default for outgoing ones. Repeat it (or put "
                            "several lines in a file) to accept old and new keys while "
                            "rotating; files are re-read on every incoming connection")
    serve.add_argument("--tls-cert", metavar="FILE",
                       help="TLS certificate (PEM) for incoming mirrors; also our client "
                            "certificate for outgoing mirrors that use TLS")
    serve.add_argument("--tls-key", metavar="FILE",
                       help="private key of --tls-cert (if not in the same file)")
    serve.add_argument("--tls-ca", metavar="FILE",
                       help="require incoming mirrors to present a client certificate "
                            "signed by this CA (in addition to the key)")
    serve.add_argument("--nbd-tls-psk", metavar="FILE",
                       help="require TLS with pre-shared keys on --nbd tcp: endpoints; FILE "
                            "holds 'username:hexkey' lines (psktool -u USER -p FILE), re-read "
                            "on every connection")
    serve.add_argument("--nbd-tls-cert", metavar="FILE",
                       help="require TLS on --nbd tcp: endpoints with this certificate (PEM); "
                            "with --nbd-tls-psk, clients may use either")
    serve.add_argument("--nbd-tls-key", metavar="FILE",
                       help="private key of --nbd-tls-cert (if not in the same file)")
    serve.add_argument("--nbd-tls-ca", metavar="FILE",
                       help="with --nbd-tls-cert: clients using certificates must present one "
                            "signed by this CA (its common name is the client's name in "
                            "[nbd_clients])")
    serve.add_argument("--link-timeout", metavar="SECONDS",
                       help="a mirror link that leaves data unacknowledged this long (or "
                            "answers no keepalive) is dropped and redialled; default 60s")
    serve.add_argument("--insecure", action="store_true",
                       help="allow plaintext on non-loopback addresses: mirrors (--listen and "
                            "every outgoing mirror) and --nbd tcp:; without it they need TLS")
    serve.add_argument("--metrics", metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics")
    serve.add_argument("--config", metavar="FILE", help="TOML settings; flags override it")
    serve.add_argument("--node-name", metavar="NAME",
                       help="readable name of this store shown to targets")
    serve.add_argument("--bwlimit", metavar="RATE",
                       help="daemon-wide cap on outgoing mirror traffic, shared fairly (e.g. 100M)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    # Tests only (kill -9 inside a slowed-down step); hidden from --help.
    serve.add_argument("--rbd-pool", metavar="POOL",
                       help="keep incoming mirrors' images as RBD images in this Ceph pool, "
                       "a snapshot per applied cycle (docs/ceph.md)")
    serve.add_argument("--rbd-namespace", metavar="NS", help="RBD namespace in --rbd-pool")
    serve.add_argument("--ceph-conf", metavar="FILE",
                       help="the Ceph cluster's config (default: Ceph's own search path)")
    serve.add_argument("--ceph-client", metavar="client.NAME",
                       help="the Ceph client to connect as (default client.admin)")
    serve.add_argument("--ceph-keyring", metavar="FILE",
                       help="that client's keyring (default: what the Ceph config names)")
    serve.add_argument("--keep-cycles", metavar="N",
                       help="keep the snapshots of the last N applied cycles of each RBD image "
                       "as remote history (default 1: only the last)")
    serve.add_argument("--failpoint", action="append", metavar="NAME=SECONDS",
                       help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)


def _keygen_arguments(keygen: argparse.ArgumentParser) -> None:
    """keygen's one option."""
    keygen.add_argument("-o", "--out", metavar="FILE", help="write to FILE (must not exist)")
    keygen.set_defaults(func=cmd_keygen)


def _volume_actions(volume: argparse.ArgumentParser) -> None:
    """The volume actions (small: built together)."""
    vverbs = volume.add_subparsers(dest="volume_verb", metavar="ACTION", required=True)
    create = vverbs.add_parser("create", help="create an empty (all-zero) volume")
    create.add_argument("name")
    create.add_argument("--size", required=True, metavar="SIZE", help="e.g. 64M, 10G")
    create.add_argument("--block-size", default="4K", metavar="SIZE",
                        help="change-tracking granularity (default 4K)")
    create.set_defaults(func=cmd_volume_create)
    imp = vverbs.add_parser("import", help="create a volume from a raw image file")
    imp.add_argument("name")
    imp.add_argument("--from", dest="src", required=True, metavar="PATH")
    imp.add_argument("--block-size", default="4K", metavar="SIZE")
    imp.set_defaults(func=cmd_volume_import)
    exp = vverbs.add_parser("export", help="write a consistent raw copy of a volume to a file")
    exp.add_argument("name")
    exp.add_argument("--to", dest="dest", required=True, metavar="PATH")
    exp.set_defaults(func=cmd_volume_export)
    lst = vverbs.add_parser("list", help="list the store's volumes")
    lst.add_argument("--json", action="store_true", help="print the documented JSON")
    lst.set_defaults(func=cmd_volume_list)
    rm = vverbs.add_parser("rm", help="delete a volume that has no running mirror")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_volume_rm)


def _file_actions(fobj: argparse.ArgumentParser) -> None:
    """The file-object actions (small: built together)."""
    fverbs = fobj.add_subparsers(dest="file_verb", metavar="ACTION", required=True)
    fadd = fverbs.add_parser("add", help="make a live file (on XFS with reflink, or btrfs) "
                                         "an object that 'mirror start NAME' mirrors")
    fadd.add_argument("name")
    fadd.add_argument("path", metavar="PATH")
    fadd.add_argument("--block-size", default="4K", metavar="SIZE",
                      help="change-tracking granularity (default 4K)")
    fadd.set_defaults(func=cmd_file_add)
    flst = fverbs.add_parser("list", help="list the store's file objects")
    flst.add_argument("--json", action="store_true", help="print the documented JSON")
    flst.set_defaults(func=cmd_file_list)
    frm = fverbs.add_parser("rm", help="forget a file object that has no mirror (deletes "
                                       "its snapshots, keeps the file)")
    frm.add_argument("name")
    frm.set_defaults(func=cmd_file_rm)


def _tree_actions(tobj: argparse.ArgumentParser) -> None:
    """The tree object actions (small: built together)."""
    tverbs = tobj.add_subparsers(dest="tree_verb", metavar="ACTION", required=True)
    tadd = tverbs.add_parser("add", help="make a btrfs subvolume a tree object, frozen whole "
                                         "by a read-only snapshot")
    tadd.add_argument("name")
    tadd.add_argument("path", metavar="PATH")
    tadd.set_defaults(func=cmd_tree_add)
    tlst = tverbs.add_parser("list", help="list the store's tree objects")
    tlst.add_argument("--json", action="store_true", help="print the documented JSON")
    tlst.set_defaults(func=cmd_tree_list)
    trm = tverbs.add_parser("rm", help="forget a tree object (deletes its snapshots, keeps "
                                       "the tree)")
    trm.add_argument("name")
    trm.set_defaults(func=cmd_tree_rm)


def _mirror_actions(mirror: argparse.ArgumentParser) -> None:
    """The mirror actions, each built when it is parsed."""
    mverbs = mirror.add_subparsers(dest="mirror_verb", metavar="ACTION", required=True)
    mverbs.add_parser("start", help="start mirroring a volume to a target daemon",
                      build=_mirror_start_arguments)
    mverbs.add_parser(
        "sync", help="run a cycle now and wait until it is applied",
        description="Freezes now (or, if nothing was written since a freeze whose cycle "
                    "is still on its way, takes that cycle) and waits until the cycle is "
                    "applied on --to, or "
                    "on every target that is not broken; a target that is down (retrying) "
                    "is not "
                    "waited for once another applied the cycle. The output names each "
                    "target not waited for and why.", build=_mirror_sync_arguments)
    mverbs.add_parser("break", help="stop the repetition after the running cycle",
                      build=_mirror_break_arguments)
    mverbs.add_parser("resume", help="restart a broken mirror with a delta",
                      build=_mirror_resume_arguments)
    mverbs.add_parser(
        "rm", help="forget a broken mirror (the target keeps its image); on a target, "
                   "SOURCE/NAME deletes an incoming mirror's image and state",
        description="On a source: forget a broken mirror of VOLUME (to --to only, or to "
                    "every target); the targets keep their images. On a target: delete "
                    "the incoming mirror SOURCE/NAME (the source's node name or id, as "
                    "'status' lists it, and the mirror's name), its images and its state; "
                    "refused while the source is connected, unless --force.",
        build=_mirror_rm_arguments)
    mverbs.add_parser(
        "verify", help="prove that a target's image equals the source (hashes only on the "
                       "wire); --repair ships exactly the blocks that differ",
        description="Both sides hash the same applied cycle in parallel and compare digests "
                    "per 64 MiB, then per 1 MiB, then per block where they differ. Mirroring "
                    "goes on meanwhile. Exits 7 when blocks differ and were not repaired, 8 "
                    "when the target did not hold the repair cycle within 10 minutes. A verify cut "
                    "short (a restart, a lost link) resumes where it stopped when run again.",
        build=_mirror_verify_arguments)
    mverbs.add_parser(
        "scrub", help="on a target: re-read an incoming image against the digests recorded "
                      "when its cycles were applied (no source needed)",
        description="Finds rot the source cannot know about. Exits 7 when blocks differ from "
                    "their recorded digests (confirm and heal with 'mirror verify --repair' "
                    "on the source). An image without a record gets one (nothing to compare "
                    "the first time).", build=_mirror_scrub_arguments)
    from cyclemirror import cli_failover

    cli_failover.add_verbs(mverbs)  # promote ... (docs/failover.md)


def _mirror_start_arguments(start: argparse.ArgumentParser) -> None:
    """mirror start's arguments."""
    start.add_argument("volume")
    start.add_argument("--to", required=True, metavar="HOST:PORT",
                       help="the target daemon's --listen address")
    start.add_argument("--as", dest="remote_name", metavar="NAME",
                       help="name of the mirror (and image) on the target (default: the "
                            "volume's name); same rules as a volume name")
    start.add_argument("--interval", type=float, metavar="SECONDS",
                       help="time from one freeze to the next (default 10; 0 = back to back); "
                            "with --rpo, the longest time between freezes")
    start.add_argument("--rpo", metavar="SECONDS",
                       help="RPO objective: the interval adapts (back to back while a target "
                            "lags, longer while the volume is quiet) and status says ok, "
                            "at_risk or violated")
    start.add_argument("--pace", action="store_true",
                       help="with --rpo: when cycles back to back cannot keep the objective, "
                            "slow the volume's writers to the rate the mirror ships "
                            "(never below 1 MiB/s; not while the target is unreachable)")
    start.add_argument("--compress", metavar="lz4|zstd[:LEVEL]|auto|none",
                       help="chunk compression (default lz4; auto: the codec that ships "
                            "fastest over the measured link)")
    start.add_argument("--bwlimit", metavar="RATE", help="cap this mirror's rate, e.g. 20M")
    start.add_argument("--key-file", metavar="FILE",
                       help="pre-shared key of the target (default: the daemon's --key-file); "
                            "its first key is used")
    start.add_argument("--tls-ca", metavar="FILE",
                       help="use TLS to the target, trusting certificates signed by this CA "
                            "(needed for a non-loopback target unless --insecure)")
    start.add_argument("--tls-server-name", metavar="NAME",
                       help="name the target's certificate must carry (default: the host of "
                            "--to)")
    start.add_argument("--insecure", action="store_true",
                       help="send plaintext to a non-loopback target (anyone on the path can "
                            "read and change the data)")
    start.add_argument("--group", metavar="NAME",
                       help="consistency group: all members freeze at one instant each "
                            "cycle and the target applies them all or none; members share "
                            "targets, interval, compression and bwlimit, and sync, break, "
                            "resume and rm of a member act on the whole group")
    start.set_defaults(func=cmd_mirror_start)


def _mirror_sync_arguments(sync: argparse.ArgumentParser) -> None:
    """mirror sync's arguments."""
    sync.add_argument("volume")
    sync.add_argument("--to", metavar="HOST:PORT",
                      help="wait for this target only; the others keep cycling")
    sync.add_argument("--timeout", default=DEFAULT_SYNC_TIMEOUT, metavar="SECONDS",
                      help=f"give up after this long (default {DEFAULT_SYNC_TIMEOUT:g})")
    sync.add_argument("--json", action="store_true", help="print the documented JSON")
    sync.set_defaults(func=cmd_mirror_sync)


def _mirror_break_arguments(brk: argparse.ArgumentParser) -> None:
    """mirror break's arguments."""
    brk.add_argument("volume")
    brk.add_argument("--to", metavar="HOST:PORT", help="only this target (default: all)")
    brk.add_argument("--now", action="store_true",
                     help="abandon the running cycle; the target keeps the previous image")
    brk.set_defaults(func=cmd_mirror_break)


def _mirror_resume_arguments(resume: argparse.ArgumentParser) -> None:
    """mirror resume's arguments."""
    resume.add_argument("volume")
    resume.add_argument("--to", metavar="HOST:PORT", help="only this target (default: all)")
    resume.set_defaults(func=cmd_mirror_resume)


def _mirror_rm_arguments(mrm: argparse.ArgumentParser) -> None:
    """mirror rm's arguments."""
    mrm.add_argument("volume", metavar="VOLUME|SOURCE/NAME")
    mrm.add_argument("--to", metavar="HOST:PORT", help="only this target (default: all)")
    mrm.add_argument("--force", action="store_true",
                     help="SOURCE/NAME only: remove it even while the source is connected "
                          "(its connection is closed; a source still mirroring sends a full "
                          "copy next time)")
    mrm.set_defaults(func=cmd_mirror_rm)


def _mirror_verify_arguments(verify: argparse.ArgumentParser) -> None:
    """mirror verify's arguments."""
    verify.add_argument("volume")
    verify.add_argument("--to", metavar="HOST:PORT", help="only this target (default: each)")
    verify.add_argument("--repair", action="store_true",
                        help="ship the differing blocks in the next cycle and wait for it")
    verify.add_argument("--offset", metavar="SIZE", help="start here (whole blocks)")
    verify.add_argument("--length", metavar="SIZE", help="verify this much (default: to the end)")
    verify.add_argument("--bwlimit", metavar="RATE",
                        help="cap the reads on each side, e.g. 100M (default: none)")
    verify.add_argument("--restart", action="store_true",
                        help="start over instead of resuming an unfinished verify")
    verify.add_argument("--json", action="store_true", help="print the documented JSON")
    verify.set_defaults(func=cmd_mirror_verify)


def _mirror_scrub_arguments(scrub: argparse.ArgumentParser) -> None:
    """mirror scrub's arguments."""
    scrub.add_argument("image", metavar="SOURCE/VOLUME",
                       help="the source's node name (or id) and the volume, as 'status' lists")
    scrub.add_argument("--offset", metavar="SIZE", help="start here")
    scrub.add_argument("--length", metavar="SIZE", help="scrub this much (default: to the end)")
    scrub.add_argument("--bwlimit", metavar="RATE", help="cap the reads, e.g. 100M")
    scrub.add_argument("--restart", action="store_true",
                       help="start over instead of resuming an unfinished scrub")
    scrub.add_argument("--json", action="store_true", help="print the documented JSON")
    scrub.set_defaults(func=cmd_mirror_scrub)


def _status_arguments(status: argparse.ArgumentParser) -> None:
    """status's options."""
    status.add_argument("--json", action="store_true", help="print the documented JSON")
    status.add_argument("--watch", action="store_true",
                        help="refresh in place until Ctrl-C (JSON lines with --json)")
    status.add_argument("--every", metavar="SECONDS",
                        help=f"refresh period of --watch (default {DEFAULT_STATUS_EVERY:g})")
    status.add_argument("--count", type=int, default=0, metavar="N",
                        help="with --watch, stop after N refreshes (default: never)")
    status.add_argument("--check", action="store_true",
                        help="for monitoring: one line and exit 0 (every mirror ok), 1 (at "
                             "risk), 2 (RPO objective violated or mirror broken), 3 (daemon "
                             "not reachable)")
    status.set_defaults(func=cmd_status)


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    """demo's options."""
    demo.add_argument("--seconds", type=float, default=6.0,
                      help="how long the write workload runs (default 6)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    demo.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error, 0 on --help
    try:
        return args.func(args)
    except CycleMirrorError as exc:
        print(f"cyclemirror: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cyclemirror: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0  # 'cyclemirror status | head' closed our stdout: not an error
    except Exception as exc:
        if os.environ.get("CYCLEMIRROR_DEBUG") == "1":
            raise
        print(f"cyclemirror: internal error: {type(exc).__name__}: {exc} "
              "(rerun with CYCLEMIRROR_DEBUG=1 for a traceback, and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
