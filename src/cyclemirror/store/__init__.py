"""The volume store: named volumes on disk, redirect-on-write overlays, freeze, merge, recovery.

Modules, bottom up: ``names`` (volume name rules), ``fileops`` (Linux file
calls), ``zerolog`` (write-ahead record of zeroed blocks), ``layer`` (base or
one overlay), ``resolve`` (which layer holds which block), ``recovery``
(bitmaps rebuilt from the allocation map after a crash), ``frozen`` (frozen
cycles and readers), ``exporter``, ``volume`` (the view, freeze, merge) and
``store`` (the directory of volumes). The design is in docs/store.md.
"""

from cyclemirror.store.frozen import FrozenCycle, FrozenReader
from cyclemirror.store.store import Store
from cyclemirror.store.volume import Volume

__all__ = ["FrozenCycle", "FrozenReader", "Store", "Volume"]
