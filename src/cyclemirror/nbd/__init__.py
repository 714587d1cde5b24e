"""NBD export of volumes: applications read and write volumes over the Network Block Device protocol.

Modules: ``protocol`` (the protocol's numbers), ``negotiation`` (fixed newstyle
option haggling), ``server`` (listeners and connection threads), ``backends``
(raw image files and store volumes as exports), ``tls`` (STARTTLS with
pre-shared keys or a certificate) and ``access`` (which exports each TLS
client may use).  The per-request loop is the compiled
``cyclemirror._cext.nbdio``, the TLS handshake and relay ``cyclemirror._cext.tlsrelay``.  Details and guarantees: docs/nbd.md.
"""

from cyclemirror.nbd.backends import RawFileBackend, VolumeBackend
from cyclemirror.nbd.server import NbdServer

__all__ = ["NbdServer", "RawFileBackend", "VolumeBackend"]
