"""cyclemirror: asynchronous, cycle-based, always-consistent remote mirroring of volumes.

Importing the package loads nothing else: the command line's thin-client
verbs (``status``, ``volume list``, ``mirror start``, ...) only talk JSON to
the daemon and must start fast, so they never pay for numpy or the compiled
modules.  The first import of any compiled module (``cyclemirror._cext.*``,
which every daemon-side module does) loads and checks all of them: a missing
one is an ImportError there, never a silent slow fallback.
"""

__version__ = "0.1.0"
