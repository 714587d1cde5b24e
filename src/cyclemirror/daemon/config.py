"""Settings of one daemon: parsed from ``serve`` flags and/or a TOML file, validated.

A config file (see examples/cyclemirror.toml) holds the same settings as the
``serve`` flags plus ``[[mirror]]`` tables that the daemon starts at boot.
Flags given on the command line override the file.  Every value is checked
here, once, with an error that names the file and the key; an unknown key is
an error too, because a typo (``bwlimt``) must not silently drop a setting.

Nothing here touches the network or the store: it only turns text into
validated values (``DaemonConfig``, ``MirrorSpec``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cyclemirror.errors import UsageError
from cyclemirror.units import parse_duration, parse_rate, parse_seconds

if TYPE_CHECKING:  # imported where used: the thin CLI verbs must not load cyclemirror.nbd
    from cyclemirror.nbd.access import ClientAccess

DEFAULT_INTERVAL = 10.0
CODECS = ("none", "lz4", "zstd", "auto")
ZSTD_LEVELS = range(1, 23)
LOG_LEVELS = ("debug", "info", "warning", "error")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" lets "a\n" through


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NbdEndpoint:
    kind: str  # "unix" or "tcp"
    path: str | None = None
    address: HostPort | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.address}"


@dataclass(frozen=True)
class Compression:
    codec: str = "lz4"
    level: int = 0

    def __str__(self) -> str:
        return f"zstd:{self.level}" if self.codec == "zstd" and self.level else self.codec


@dataclass(frozen=True)
class MirrorSpec:
    """What ``mirror start`` asked for; persisted in the store so a restart resumes it."""

    volume: str
    to: HostPort
    remote_name: str
    interval: float = DEFAULT_INTERVAL
    compress: Compression = Compression()
    bwlimit: int = 0  # bytes per second, 0 = no cap of its own
    key_file: str | None = None
    group: str | None = None
    rpo: float | None = None  # the RPO objective, seconds; the interval then adapts to it
    pace: bool = False  # hold the volume's writers to what keeps the objective (needs rpo)
    tls_ca: str | None = None  # TLS to the target, trusting this CA (None: plaintext)
    tls_server_name: str | None = None  # the name in the target's certificate (default: host)
    insecure: bool = False  # plaintext to a non-loopback target, asked for explicitly

    def to_json(self) -> dict:
        out = {"volume": self.volume, "to": str(self.to), "as": self.remote_name,
               "interval": self.interval, "compress": str(self.compress),
               "bwlimit": self.bwlimit, "key_file": self.key_file, "group": self.group}
        # Written only when set, so definitions of mirrors without them read as before.
        if self.rpo is not None:
            out["rpo"] = self.rpo
        if self.pace:
            out["pace"] = True
        if self.tls_ca is not None:
            out["tls_ca"] = self.tls_ca
        if self.tls_server_name is not None:
            out["tls_server_name"] = self.tls_server_name
        if self.insecure:
            out["insecure"] = True
        return out

    @classmethod
    def from_json(cls, data: dict, where: str) -> MirrorSpec:
        return mirror_spec_from_mapping(data, where)


@dataclass(frozen=True)
class DaemonConfig:
    store: str | None = None
    node_name: str | None = None
    nbd: tuple[NbdEndpoint, ...] = ()
    listen: HostPort | None = None
    key_file: str | None = None
    metrics: HostPort | None = None
    bwlimit: int = 0  # daemon-wide cap shared by all outgoing mirrors, 0 = none
    log_level: str = "info"
    # Checks (docs/verify.md): seconds between scheduled runs (0 = none), read caps.
    verify_every: float = 0.0
    verify_repair: bool = False
    verify_bwlimit: int = 0
    scrub_every: float = 0.0
    scrub_bwlimit: int = 0
    mirrors: tuple[MirrorSpec, ...] = field(default_factory=tuple)
    extra_key_files: tuple[str, ...] = ()  # more keys incoming mirrors may use (rotation)
    tls_cert: str | None = None  # TLS for incoming mirrors (and our client certificate)
    tls_key: str | None = None
    tls_ca: str | None = None  # incoming: require client certificates signed by this CA
    insecure: bool = False  # plaintext mirrors on non-loopback addresses, asked for explicitly
    # NBD over TCP: TLS (PSK key file and/or certificate) and who may use which export.
    nbd_tls_psk: str | None = None
    nbd_tls_cert: str | None = None
    nbd_tls_key: str | None = None
    nbd_tls_ca: str | None = None  # certificate clients must present one signed by this CA
    link_timeout: float | None = None  # seconds a mirror link may stall (wire/sockio.py)
    nbd_clients: ClientAccess | None = None  # None: every TLS client gets every export

    # Incoming mirrors' images in a Ceph pool (docs/ceph.md); None: raw files in the store.
    rbd_pool: str | None = None
    rbd_namespace: str | None = None
    ceph_conf: str | None = None
    ceph_client: str | None = None
    ceph_keyring: str | None = None
    rbd_keep_cycles: int | None = None  # cycle snapshots kept per image (None: 1)

    def rbd_config(self):
        """The RBD target settings (``receiver.backend.RbdConfig``), or None for files."""
        from cyclemirror.receiver.backend import RbdConfig

        if self.rbd_pool is None:
            extra = [k for k in ("rbd_namespace", "ceph_conf", "ceph_client", "ceph_keyring",
                                 "rbd_keep_cycles") if getattr(self, k) is not None]
            if extra:
                raise UsageError(f"{', '.join(extra)} given without rbd_pool (--rbd-pool): "
                                 "name the Ceph pool that holds the mirror images")
            return None
        return RbdConfig(pool=self.rbd_pool, namespace=self.rbd_namespace or None,
                         conf=self.ceph_conf, client=self.ceph_client or "client.admin",
                         keyring=self.ceph_keyring, keep_cycles=self.rbd_keep_cycles or 1)

    def merged_with(self, **overrides) -> DaemonConfig:
        """Flags win over the file: only overrides that are not None replace a value."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def check_keep_cycles(value, what: str) -> int:
    """``--keep-cycles`` / ``rbd_keep_cycles``: how many cycle snapshots an RBD image keeps."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10000:
        raise UsageError(f"{what} must be a whole number from 1 to 10000 (the cycle "
                         f"snapshots each RBD image keeps: the last cycle's and N-1 older "
                         f"ones as history), not {value!r}")
    return value


_CEPH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CEPH_CLIENT = re.compile(r"client\.[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_ceph_name(name, what: str) -> str:
    """A pool or namespace name: letters, digits, '.', '_', '-' (no '/', '@' or spaces)."""
    if not isinstance(name, str) or not _CEPH_NAME.fullmatch(name):
        raise UsageError(f"{what} {name!r} is not a valid Ceph pool or namespace name: use "
                         "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def check_ceph_client(name, what: str) -> str:
    if not isinstance(name, str) or not _CEPH_CLIENT.fullmatch(name):
        raise UsageError(f"{what} {name!r} is not a Ceph client name; write it as "
                         "client.NAME (e.g. client.admin, client.cyclemirror)")
    return name


def check_name(name, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(
            f"{what} {name!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def is_loopback(host: str) -> bool:
    """True if ``host`` (an address or a name) reaches only this machine.

    A name counts as loopback only if every address it resolves to is one, so
    an unresolvable name (or a wildcard such as 0.0.0.0) asks for TLS.
    """
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    import socket

    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_mirror_tls(spec: MirrorSpec, daemon_insecure: bool = False) -> None:
    """A mirror to a non-loopback target needs TLS or an explicit --insecure."""
    if spec.tls_ca is None and not (spec.insecure or daemon_insecure) and not is_loopback(
            spec.to.host):
        raise UsageError(
            f"mirror {spec.volume} -> {spec.to}: {spec.to.host} is not a loopback address, "
            "and without TLS anyone on the path can read and change the data: add "
            "--tls-ca FILE (the CA that signed the target's certificate; the target runs "
            "with --tls-cert and --tls-key), or --insecure to send plaintext anyway")


def check_listen_tls(config: DaemonConfig) -> None:
    """Listening for mirrors on a non-loopback address needs TLS or an explicit --insecure."""
    if config.listen is None or config.tls_cert or config.insecure:
        return
    if not is_loopback(config.listen.host):
        raise UsageError(
            f"--listen {config.listen}: not a loopback address, and without TLS anyone on "
            "the path can read and change incoming mirrors: add --tls-cert FILE --tls-key "
            "FILE (sources then use --tls-ca), or --insecure to accept plaintext anyway")


def parse_link_timeout(text, what: str = "--link-timeout") -> float:
    """Seconds a mirror link may leave data unacknowledged before it counts as dead."""
    from cyclemirror.wire.sockio import LINK_TIMEOUT_RANGE

    seconds = parse_duration(text, what)
    low, high = LINK_TIMEOUT_RANGE
    if not low <= seconds <= high:
        raise UsageError(f"{what}: {seconds:g} s is outside {low:g}-{high:g} s; the default "
                         "is 60 s (a link that stalls longer is dropped and redialled, and "
                         "the cycle resumes)")
    return seconds


def check_nbd_tls(config: DaemonConfig) -> None:
    """NBD over TCP on a non-loopback address needs TLS or an explicit --insecure."""
    if config.nbd_tls_key and not config.nbd_tls_cert:
        raise UsageError("serve: --nbd-tls-key needs --nbd-tls-cert")
    if config.nbd_tls_ca and not config.nbd_tls_cert:
        raise UsageError("serve: --nbd-tls-ca (client certificates) needs a server "
                         "certificate: add --nbd-tls-cert FILE")
    tls = bool(config.nbd_tls_psk or config.nbd_tls_cert)
    if config.nbd_clients is not None and not tls:
        raise UsageError("serve: [nbd_clients] limits TLS clients by their PSK user name "
                         "(or client certificate); add nbd_tls_psk (--nbd-tls-psk FILE) "
                         "or remove [nbd_clients]")
    if tls or config.insecure:
        return
    for endpoint in config.nbd:
        if endpoint.kind == "tcp" and not is_loopback(endpoint.address.host):
            raise UsageError(
                f"--nbd {endpoint}: {endpoint.address.host} is not a loopback address, and "
                "without TLS anyone who can reach the port can read and write every volume: "
                "add --nbd-tls-psk FILE (make it with 'psktool -u USER -p FILE'; clients use "
                "nbds://USER@HOST:PORT/VOLUME?tls-psk-file=FILE), or --insecure to serve "
                "plaintext anyway")


def tls_settings(cert, key, ca, where: str) -> None:
    """A certificate needs its key file unless the certificate file holds the key too."""
    if (key or ca) and not cert:
        raise UsageError(f"{where}: --tls-key and --tls-ca need --tls-cert")


def parse_hostport(text, what: str, *, listening: bool = False) -> HostPort:
    """``HOST:PORT`` or ``[IPv6]:PORT``; the port must be 1-65535 (0 = any free port,
    allowed only for an address we listen on: ``listening=True``)."""
    if not isinstance(text, str) or not text:
        raise UsageError(f"{what}: expected HOST:PORT, got {text!r}")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UsageError(f"{what}: expected [IPv6]:PORT, got {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"{what}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise UsageError(
                f"{what}: expected HOST:PORT (IPv6 as [ADDR]:PORT), got {text!r}")
    lowest = 0 if listening else 1
    if not port.isdigit() or not lowest <= int(port) <= 65535:
        raise UsageError(
            f"{what}: port {port!r} in {text!r} is not a number from {lowest} to 65535")
    return HostPort(host, int(port))


def parse_nbd_endpoint(text, what: str = "--nbd") -> NbdEndpoint:
    if not isinstance(text, str):
        raise UsageError(f"{what}: expected unix:PATH or tcp:HOST:PORT, got {text!r}")
    kind, sep, rest = text.partition(":")
    if sep and kind == "unix" and rest:
        return NbdEndpoint("unix", path=os.path.abspath(rest))
    if sep and kind == "tcp":
        return NbdEndpoint("tcp", address=parse_hostport(rest, what, listening=True))
    raise UsageError(f"{what}: expected unix:PATH or tcp:HOST:PORT, got {text!r}")


def parse_compress(text, what: str = "--compress") -> Compression:
    """``lz4``, ``none``, ``zstd``, ``zstd:LEVEL`` (1-22) or ``auto`` (sender/autocodec.py)."""
    if not isinstance(text, str):
        raise UsageError(f"{what}: expected lz4, zstd[:LEVEL], auto or none, got {text!r}")
    codec, sep, level = text.strip().lower().partition(":")
    if codec not in CODECS or (sep and codec != "zstd"):
        raise UsageError(f"{what}: expected lz4, zstd[:LEVEL], auto or none, got {text!r}")
    if not sep:
        return Compression(codec, 0)
    if not level.isdigit() or int(level) not in ZSTD_LEVELS:
        raise UsageError(f"{what}: zstd level must be 1-22, got {level!r}")
    return Compression("zstd", int(level))


def mirror_spec_from_mapping(data: dict, where: str) -> MirrorSpec:
    """Build a MirrorSpec from a config table, a control request or the saved state."""
    if not isinstance(data, dict):
        raise UsageError(f"{where}: a mirror must be a table of settings")
    allowed = {"volume", "to", "as", "interval", "compress", "bwlimit", "key_file", "group",
               "rpo", "pace", "tls_ca", "tls_server_name", "insecure"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown mirror setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(allowed))}")
    if "volume" not in data or "to" not in data:
        raise UsageError(f"{where}: a mirror needs 'volume' and 'to'")
    volume = check_name(data["volume"], f"{where}: volume")
    remote = data.get("as") or volume
    key_file = data.get("key_file")
    if key_file is not None:
        if not isinstance(key_file, str) or not key_file:
            raise UsageError(f"{where}: key_file must be a path")
        key_file = os.path.abspath(key_file)
    group = data.get("group")
    if group is not None:
        group = check_name(group, f"{where}: group")
    objective = data.get("rpo")
    if objective is not None:
        objective = parse_seconds(objective, f"{where}: rpo")
        if objective <= 0:
            raise UsageError(f"{where}: rpo must be more than 0 seconds (the RPO objective)")
    pace = data.get("pace", False)
    if not isinstance(pace, bool):
        raise UsageError(f"{where}: pace must be true or false")
    if pace and objective is None:
        raise UsageError(f"{where}: pace needs rpo: pacing holds the volume's writers to the "
                         "rate that keeps the RPO objective; give rpo = SECONDS too")
    # With an objective the interval adapts; a given interval is then the longest wait.
    default_interval = 0.0 if objective is not None else DEFAULT_INTERVAL
    interval = data.get("interval")
    tls_ca = data.get("tls_ca")
    if tls_ca is not None:
        if not isinstance(tls_ca, str) or not tls_ca:
            raise UsageError(f"{where}: tls_ca must be a path")
        tls_ca = os.path.abspath(tls_ca)
    server_name = data.get("tls_server_name")
    if server_name is not None and (not isinstance(server_name, str) or not _SERVER_NAME.fullmatch(
            server_name)):
        raise UsageError(f"{where}: tls_server_name {server_name!r:.80} is not a host name")
    if server_name is not None and tls_ca is None:
        raise UsageError(f"{where}: tls_server_name needs tls_ca (TLS to the target)")
    insecure = data.get("insecure", False)
    if not isinstance(insecure, bool):
        raise UsageError(f"{where}: insecure must be true or false")
    return MirrorSpec(
        volume=volume,
        to=parse_hostport(data["to"], f"{where}: to"),
        remote_name=check_name(remote, f"{where}: as"),
        interval=(default_interval if interval is None
                  else parse_seconds(interval, f"{where}: interval")),
        compress=parse_compress(data.get("compress", "lz4"), f"{where}: compress"),
        bwlimit=parse_rate(data.get("bwlimit", 0), f"{where}: bwlimit"),
        key_file=key_file,
        group=group,
        rpo=objective,
        pace=pace,
        tls_ca=tls_ca,
        tls_server_name=server_name,
        insecure=insecure,
    )


_TOP_KEYS = {"store", "node_name", "nbd", "listen", "key_file", "metrics", "bwlimit",
             "log_level", "mirror", "tls_cert", "tls_key", "tls_ca", "insecure",
             "verify_every", "verify_repair", "verify_bwlimit", "scrub_every",
             "scrub_bwlimit", "nbd_tls_psk", "nbd_tls_cert", "nbd_tls_key", "nbd_tls_ca", "nbd_clients", "link_timeout",
             "rbd_pool", "rbd_namespace", "ceph_conf", "ceph_client", "ceph_keyring",
             "rbd_keep_cycles"}
_SERVER_NAME = re.compile(r"[A-Za-z0-9._:-]{1,253}")


def load_config(path: str) -> DaemonConfig:
    """Read and validate a TOML config; relative paths in it are relative to the file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    return config_from_mapping(data, path)


def config_from_mapping(data: dict, path: str) -> DaemonConfig:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_TOP_KEYS))}")
    base = os.path.dirname(os.path.abspath(path))

    def path_setting(key):
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise UsageError(f"{path}: {key} must be a path string")
        return os.path.normpath(os.path.join(base, value))

    key_files = data.get("key_file")
    if isinstance(key_files, list):  # several key files: every key is accepted (rotation)
        if not key_files or not all(isinstance(k, str) and k for k in key_files):
            raise UsageError(f"{path}: key_file must be a path or a list of paths")
        data = dict(data, key_file=key_files[0])
        extra_keys = tuple(os.path.normpath(os.path.join(base, k)) for k in key_files[1:])
    else:
        extra_keys = ()
    insecure = data.get("insecure", False)
    if not isinstance(insecure, bool):
        raise UsageError(f"{path}: insecure must be true or false")
    nbd = data.get("nbd", [])
    if isinstance(nbd, str):
        nbd = [nbd]
    if not isinstance(nbd, list):
        raise UsageError(f"{path}: nbd must be a string or a list of unix:PATH / tcp:HOST:PORT")
    endpoints = []
    for item in nbd:
        if isinstance(item, str) and item.startswith("unix:"):
            item = "unix:" + os.path.join(base, item[5:])
        endpoints.append(parse_nbd_endpoint(item, f"{path}: nbd"))
    node_name = data.get("node_name")
    if node_name is not None:
        node_name = check_name(node_name, f"{path}: node_name")
    log_level = data.get("log_level", "info")
    if log_level not in LOG_LEVELS:
        raise UsageError(f"{path}: log_level must be one of {', '.join(LOG_LEVELS)}")
    mirrors_raw = data.get("mirror", [])
    if not isinstance(mirrors_raw, list):
        raise UsageError(f"{path}: mirrors are written as [[mirror]] tables")
    mirrors = []
    for index, table in enumerate(mirrors_raw):
        for key in ("key_file", "tls_ca"):
            if isinstance(table, dict) and isinstance(table.get(key), str):
                table = dict(table, **{key: os.path.join(base, table[key])})
        mirrors.append(mirror_spec_from_mapping(table, f"{path}: mirror #{index + 1}"))
    return DaemonConfig(
        store=path_setting("store"),
        node_name=node_name,
        nbd=tuple(endpoints),
        listen=(parse_hostport(data["listen"], f"{path}: listen", listening=True)
                if "listen" in data else None),
        key_file=path_setting("key_file"),
        metrics=(parse_hostport(data["metrics"], f"{path}: metrics", listening=True)
                 if "metrics" in data else None),
        bwlimit=parse_rate(data.get("bwlimit", 0), f"{path}: bwlimit"),
        log_level=log_level,
        mirrors=tuple(mirrors),
        extra_key_files=extra_keys,
        tls_cert=path_setting("tls_cert"),
        tls_key=path_setting("tls_key"),
        tls_ca=path_setting("tls_ca"),
        insecure=insecure,
        nbd_tls_psk=path_setting("nbd_tls_psk"),
        nbd_tls_cert=path_setting("nbd_tls_cert"),
        nbd_tls_key=path_setting("nbd_tls_key"),
        nbd_tls_ca=path_setting("nbd_tls_ca"),
        link_timeout=(parse_link_timeout(data["link_timeout"], f"{path}: link_timeout")
                      if "link_timeout" in data else None),
        nbd_clients=_nbd_clients(data, path),
        verify_every=parse_duration(data.get("verify_every", 0), f"{path}: verify_every"),
        verify_repair=_bool(data.get("verify_repair", False), f"{path}: verify_repair"),
        verify_bwlimit=parse_rate(data.get("verify_bwlimit", 0), f"{path}: verify_bwlimit"),
        scrub_every=parse_duration(data.get("scrub_every", 0), f"{path}: scrub_every"),
        scrub_bwlimit=parse_rate(data.get("scrub_bwlimit", 0), f"{path}: scrub_bwlimit"),
        rbd_pool=(check_ceph_name(data["rbd_pool"], f"{path}: rbd_pool")
                  if "rbd_pool" in data else None),
        rbd_namespace=(check_ceph_name(data["rbd_namespace"], f"{path}: rbd_namespace")
                       if "rbd_namespace" in data else None),
        ceph_conf=path_setting("ceph_conf"),
        ceph_client=(check_ceph_client(data["ceph_client"], f"{path}: ceph_client")
                     if "ceph_client" in data else None),
        ceph_keyring=path_setting("ceph_keyring"),
        rbd_keep_cycles=(check_keep_cycles(data["rbd_keep_cycles"], f"{path}: rbd_keep_cycles")
                         if "rbd_keep_cycles" in data else None),
    )


def _nbd_clients(data: dict, path: str) -> ClientAccess | None:
    if "nbd_clients" not in data:
        return None
    from cyclemirror.nbd.access import parse_client_rules

    return parse_client_rules(data["nbd_clients"], path)


def _bool(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{what} must be true or false, got {value!r}")
    return value
