"""The compiled hot paths (built from ``cext/*.pyx`` by setup.py).

Importing any of them runs this first, and this imports every module listed
in ``REQUIRED``: a missing or broken one refuses the import with a message that
says how to rebuild, so a partial build never runs half of the hot paths.
``OPTIONAL`` ones are not imported here.
``import cyclemirror`` alone does not come here (the CLI's thin-client verbs
need no compiled code and start faster without numpy); every daemon-side
module does.
"""

import importlib

REQUIRED: tuple[str, ...] = ("bitmap", "blockhash", "btrfsitems", "frames", "nbdio",
                             "pagewrite", "tlsrelay")
# Built only where their libraries' headers are (setup.py), imported only by what
# needs them, which says what to install when one is missing: rbd (librbd) for
# RBD targets (receiver/rbdbackend.py).
OPTIONAL: tuple[str, ...] = ("rbd",)

for _name in REQUIRED:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        raise ImportError(
            f"cyclemirror: compiled module cyclemirror._cext.{_name} is missing or broken "
            f"({exc}); rebuild with 'pip install .' (needs gcc, Python headers, "
            "liblz4-dev, libzstd-dev, libxxhash-dev, libssl-dev)"
        ) from exc
