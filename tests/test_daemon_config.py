"""Config files and address/codec parsing: valid files load, every mistake is named."""

import os

import pytest

from cyclemirror.daemon.config import (
    Compression,
    DaemonConfig,
    HostPort,
    load_config,
    mirror_spec_from_mapping,
    parse_compress,
    parse_hostport,
    parse_nbd_endpoint,
)
from cyclemirror.errors import UsageError

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "cyclemirror.toml")
# installed by the Debian package as /etc/cyclemirror/cyclemirror.toml
PACKAGED = os.path.join(os.path.dirname(__file__), "..", "contrib", "cyclemirror.toml")


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_full_config_loads_with_paths_relative_to_the_file(tmp_path):
    path = write(tmp_path, """
store = "store"
node_name = "storage-a"
key_file = "keys/mirror.key"
listen = "0.0.0.0:7300"
nbd = ["unix:nbd.sock", "tcp:127.0.0.1:10809"]
metrics = "127.0.0.1:9310"
bwlimit = "100M"
log_level = "debug"

[[mirror]]
volume = "db"
to = "[::1]:7300"
as = "db-a"
interval = 2.5
compress = "zstd:3"
bwlimit = "10M/s"
group = "app"
key_file = "keys/b.key"
""")
    cfg = load_config(path)
    assert cfg.store == str(tmp_path / "store")
    assert cfg.key_file == str(tmp_path / "keys" / "mirror.key")
    assert cfg.listen == HostPort("0.0.0.0", 7300)
    assert [str(e) for e in cfg.nbd] == [f"unix:{tmp_path}/nbd.sock", "tcp:127.0.0.1:10809"]
    assert cfg.bwlimit == 100 << 20 and cfg.log_level == "debug"
    (m,) = cfg.mirrors
    assert m.to == HostPort("::1", 7300) and str(m.to) == "[::1]:7300"
    assert (m.remote_name, m.interval, m.bwlimit, m.group) == ("db-a", 2.5, 10 << 20, "app")
    assert m.compress == Compression("zstd", 3)
    assert m.key_file == str(tmp_path / "keys" / "b.key")
    assert mirror_spec_from_mapping(m.to_json(), "saved") == m


def test_the_shipped_example_config_is_valid():
    cfg = load_config(EXAMPLE)
    assert cfg.store and cfg.listen and cfg.mirrors
    paced = [m for m in cfg.mirrors if m.pace]
    assert paced and all(m.rpo for m in paced)
    assert all(mirror_spec_from_mapping(m.to_json(), "saved") == m for m in cfg.mirrors)


def test_pace_needs_an_objective_and_a_boolean():
    base = {"volume": "v", "to": "h:1"}
    with pytest.raises(UsageError, match="pace needs rpo"):
        mirror_spec_from_mapping({**base, "pace": True}, "x")
    with pytest.raises(UsageError, match="pace must be true or false"):
        mirror_spec_from_mapping({**base, "rpo": 2, "pace": "yes"}, "x")
    assert not mirror_spec_from_mapping({**base, "rpo": 2}, "x").pace


def test_the_packaged_default_config_is_valid_and_starts_nothing_remote():
    # Installed and started by the .deb as is: a local store, NBD on a Unix
    # socket, metrics on localhost; no listener and no mirror until a person
    # uncomments them.
    cfg = load_config(PACKAGED)
    assert cfg.store == "/var/lib/cyclemirror"
    assert [str(e) for e in cfg.nbd] == ["unix:/run/cyclemirror/nbd.sock"]
    assert cfg.metrics == HostPort("127.0.0.1", 9310)
    assert cfg.listen is None and cfg.key_file is None and not cfg.mirrors


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('stroe = "/x"', "unknown setting(s) stroe"),
        ('listen = "nohost"', "HOST:PORT"),
        ('listen = "h:70000"', "0 to 65535"),
        ('nbd = ["ftp:x"]', "unix:PATH or tcp:HOST:PORT"),
        ('bwlimit = "fast"', "bwlimit"),
        ('log_level = "loud"', "log_level"),
        ('node_name = "has space"', "not a valid name"),
        ('[[mirror]]\nvolume = "v"', "needs 'volume' and 'to'"),
        ('[[mirror]]\nvolume = "v"\nto = "h:1"\ncompress = "gzip"', "lz4, zstd"),
        ('[[mirror]]\nvolume = "v"\nto = "h:1"\ncompress = "zstd:40"', "1-22"),
        ('[[mirror]]\nvolume = "v"\nto = "h:1"\ninterval = -1', "interval"),
        ('[[mirror]]\nvolume = "v"\nto = "h:1"\nbwlimt = "1M"', "bwlimt"),
        ('[[mirror]]\nvolume = "../etc"\nto = "h:1"', "not a valid name"),
        ("store = [", "not valid TOML"),
    ],
)
def test_each_mistake_is_an_error_naming_file_and_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_config(path)
    assert fragment in str(info.value)
    assert path in str(info.value) or "TOML" in str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"))


def test_flags_override_the_file_only_where_given():
    cfg = DaemonConfig(store="/a", bwlimit=5, log_level="debug")
    merged = cfg.merged_with(store="/b", bwlimit=None, log_level=None)
    assert (merged.store, merged.bwlimit, merged.log_level) == ("/b", 5, "debug")


def test_address_and_codec_parsers():
    assert parse_hostport("localhost:1", "x") == HostPort("localhost", 1)
    for bad in ("", ":1", "h:", "h:0", "::1:80", "[zz]:1", "[::1]80", 7):
        with pytest.raises(UsageError):
            parse_hostport(bad, "--to")
    assert parse_nbd_endpoint("unix:rel.sock").path == os.path.abspath("rel.sock")
    assert parse_nbd_endpoint("tcp:[::1]:10809").address == HostPort("::1", 10809)
    assert parse_compress("none") == Compression("none", 0)
    assert parse_compress("ZSTD") == Compression("zstd", 0)
    assert str(parse_compress("zstd:19")) == "zstd:19"
    for bad in ("lz4:1", "zstd:", "zstd:0", "brotli", None):
        with pytest.raises(UsageError):
            parse_compress(bad)
