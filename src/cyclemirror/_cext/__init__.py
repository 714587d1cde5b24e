"""The compiled hot paths (built from ``cext/*.pyx`` by setup.py).

Every module listed in ``REQUIRED`` must import; otherwise the package refuses
to load with a message that says how to rebuild.
"""

import importlib

REQUIRED: tuple[str, ...] = ("bitmap", "blockhash", "frames", "nbdio", "pagewrite")

for _name in REQUIRED:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        raise ImportError(
            f"cyclemirror: compiled module cyclemirror._cext.{_name} is missing or broken "
            f"({exc}); rebuild with 'pip install .' (needs gcc, Python headers, "
            "liblz4-dev, libzstd-dev, libxxhash-dev)"
        ) from exc
