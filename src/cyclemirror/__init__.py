"""cyclemirror: asynchronous, cycle-based, always-consistent remote mirroring of volumes.

Importing the package loads every compiled module (``cyclemirror._cext``); a
missing one is an ImportError here, never a silent slow fallback.
"""

from cyclemirror import _cext  # noqa: F401  (fails loudly if the build is incomplete)

__version__ = "0.1.0"
