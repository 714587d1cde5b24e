"""Pre-shared mirror keys: make one, write it, read it back with checks.

A key file holds one line: the key as lowercase hex (at least 32 random
bytes, so at least 64 hex digits).  Hex keeps the file printable, so
``cyclemirror keygen > key`` works and a key survives copy and paste.  The
key itself never travels on the wire; the handshake proves knowledge of it
with HMAC-SHA256 (see ``docs/protocol.md``).

Reading refuses anything short, non-hex, or readable by group/other, with a
message that names the file and says how to fix it.

Key rotation: a file may hold several keys, one per line (blank lines and
``#`` comments are skipped).  A target accepts every key of every key file
it was given; a source uses the first key of its file.  So a rotation is:
add the new key as a line to the target's file (it re-reads its files on
every connection), give the sources the new key, then drop the old line.
"""

from __future__ import annotations

import os
import secrets
import stat

from cyclemirror.errors import UsageError

MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 1024  # a sanity cap: a key file is never megabytes


def generate_key(nbytes: int = MIN_KEY_BYTES) -> bytes:
    """Return ``nbytes`` random bytes from the OS CSPRNG."""
    if not MIN_KEY_BYTES <= nbytes <= MAX_KEY_BYTES:
        raise UsageError(
            f"key length: {nbytes} bytes is outside {MIN_KEY_BYTES}..{MAX_KEY_BYTES}"
        )
    return secrets.token_bytes(nbytes)


def format_key(key: bytes) -> str:
    """The text of a key file (one hex line)."""
    return key.hex() + "\n"


def keygen_text() -> str:
    """What ``cyclemirror keygen`` prints: a fresh key file."""
    return format_key(generate_key())


def parse_key(text: str, where: str = "key") -> bytes:
    """Decode key-file text; ``where`` names its origin in error messages."""
    stripped = text.strip()
    try:
        key = bytes.fromhex(stripped)
    except ValueError:
        raise UsageError(
            f"{where}: not a key file (expected one line of hex digits); "
            "make one with 'cyclemirror keygen > FILE'"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(
            f"{where}: key is {len(key)} bytes, at least {MIN_KEY_BYTES} are needed; "
            "make a new one with 'cyclemirror keygen > FILE'"
        )
    if len(key) > MAX_KEY_BYTES:
        raise UsageError(f"{where}: key is {len(key)} bytes, more than {MAX_KEY_BYTES}")
    return key


def write_key_file(path: str | os.PathLike, key: bytes) -> None:
    """Create ``path`` (mode 0600, refusing to overwrite) holding ``key``."""
    parse_key(key.hex(), str(path))  # same checks as reading
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(format_key(key))
        f.flush()
        os.fsync(f.fileno())


MAX_KEYS = 16  # per file: a rotation needs two


def parse_keys(text: str, where: str = "key") -> list[bytes]:
    """Every key of key-file text (one per line; blank lines and # comments skipped)."""
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise UsageError(f"{where}: holds no key; make one with 'cyclemirror keygen > FILE'")
    if len(lines) > MAX_KEYS:
        raise UsageError(f"{where}: {len(lines)} keys, more than {MAX_KEYS}")
    return [parse_key(line, f"{where} line {n}" if len(lines) > 1 else where)
            for n, line in lines]


def read_key_file(path: str | os.PathLike, *, check_mode: bool = True) -> bytes:
    """The first key of a key file (what a source proves); see ``read_keys``."""
    return read_keys(path, check_mode=check_mode)[0]


def read_keys(path: str | os.PathLike, *, check_mode: bool = True) -> list[bytes]:
    """Read and check every key of a key file; with ``check_mode`` refuse group/other access."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"key file {path}: not a regular file")
            if check_mode and st.st_mode & 0o077:
                raise UsageError(
                    f"key file {path}: readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                    f"run 'chmod 600 {path}'"
                )
            raw = f.read((MAX_KEY_BYTES * 2 + 80) * MAX_KEYS)
    except OSError as exc:
        raise UsageError(f"key file {path}: cannot read it ({exc.strerror})") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(f"key file {path}: not text; expected one line of hex digits") from None
    return parse_keys(text, f"key file {path}")
