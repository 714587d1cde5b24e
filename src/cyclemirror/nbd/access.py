"""Which exports each NBD client may use, by the identity it proved (PSK user or cert CN).

Design.  ``ClientAccess`` is a pure table: client name -> (export patterns,
read-only).  The negotiation asks ``decide(identity, export)`` before it looks
an export up, and lists only the exports ``decide`` allows.  Patterns are
shell-style (``fnmatch``, case-sensitive): ``db``, ``mirror/*``, ``*``.

The table applies to TLS connections only: a Unix socket's file permissions
are its access control, and plaintext TCP (``--insecure``) has no identity to
go by; both keep serving every export.  Over TLS:
- without a table (no ``[nbd_clients]`` in the config), every client that
  passed the handshake gets every export read-write: the key file is the
  access control;
- with a table, a client that is not in it gets what the ``"*"`` entry gives
  (nothing if there is none), and one that is gets the exports its patterns
  match, read-only if it says so.  A client that authenticated with a
  client certificate (``--nbd-tls-ca``) goes by its certificate's common
  name; one that only verified the server's certificate has no identity,
  and only ``"*"`` applies to it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from enum import Enum

from cyclemirror.errors import UsageError

_CLIENT = re.compile(r"[^:\s\x00]{1,128}")
ANY_CLIENT = "*"  # the entry for clients the table does not name (and for no identity)


class Access(Enum):
    NONE = "none"
    READ_ONLY = "ro"
    READ_WRITE = "rw"


@dataclass(frozen=True)
class ClientRule:
    exports: tuple[str, ...]
    readonly: bool = False

    def decide(self, export: str) -> Access:
        if not any(fnmatch.fnmatchcase(export, pattern) for pattern in self.exports):
            return Access.NONE
        return Access.READ_ONLY if self.readonly else Access.READ_WRITE


class ClientAccess:
    """The per-client export table (``rules`` None: every client may use everything)."""

    def __init__(self, rules: dict[str, ClientRule] | None = None):
        self.rules = dict(rules) if rules is not None else None

    @property
    def restricted(self) -> bool:
        return self.rules is not None

    def decide(self, identity: str | None, export: str) -> Access:
        if self.rules is None:
            return Access.READ_WRITE
        rule = self.rules.get(identity) if identity is not None else None
        if rule is None:
            rule = self.rules.get(ANY_CLIENT)
        return rule.decide(export) if rule is not None else Access.NONE

    def why_not(self, identity: str | None, export: str) -> str:
        who = f"client {identity!r}" if identity is not None else "a client without an identity"
        return (f"export {export!r} is not allowed for {who}: the server's [nbd_clients] "
                "table does not list it for this client")


def parse_client_rules(data, where: str) -> ClientAccess:
    """``[nbd_clients.NAME]`` tables: ``exports = ["pattern", ...]``, ``readonly = bool``."""
    if data is None:
        return ClientAccess(None)
    if not isinstance(data, dict):
        raise UsageError(f"{where}: nbd_clients must be a table of clients "
                         "([nbd_clients.NAME] with exports = [...] and readonly = true/false)")
    rules = {}
    for name, entry in data.items():
        what = f"{where}: nbd_clients.{name}"
        if not isinstance(name, str) or not (_CLIENT.fullmatch(name) or name == ANY_CLIENT):
            raise UsageError(f"{what}: not a PSK user name (1-128 characters without ':' "
                             "or blanks)")
        if not isinstance(entry, dict):
            raise UsageError(f"{what}: expected a table with exports and readonly")
        unknown = set(entry) - {"exports", "readonly"}
        if unknown:
            raise UsageError(f"{what}: unknown keys {', '.join(sorted(unknown))}; "
                             "expected exports and readonly")
        exports = entry.get("exports")
        if isinstance(exports, str):
            exports = [exports]
        if (not isinstance(exports, list) or not exports
                or not all(isinstance(e, str) and e and len(e) <= 4096 for e in exports)):
            raise UsageError(f"{what}: exports must be a list of export names or patterns "
                             '(e.g. ["db", "mirror/*"])')
        readonly = entry.get("readonly", False)
        if not isinstance(readonly, bool):
            raise UsageError(f"{what}: readonly must be true or false")
        rules[name] = ClientRule(tuple(exports), readonly)
    return ClientAccess(rules)
