"""Extension modules only; all other metadata lives in pyproject.toml.

Every ``cext/NAME.pyx`` becomes ``cyclemirror._cext.NAME``.
Environment switches:
  CYCLEMIRROR_DEBUG=1   bounds checks, wraparound checks and line tracing on, -O0 -g
  CYCLEMIRROR_ONLY=a,b  build only these modules (for fast iteration on one module)
  CYCLEMIRROR_NO_RBD=1  leave out the optional RBD binding even where librbd is installed

``cext/rbd.pyx`` (the RBD target's binding of librbd) is optional: it is built
only where librbd's and librados' headers are installed (Debian: librbd-dev,
librados-dev), and left out, with a note, elsewhere.

The modules need Cython 3.  With Cython 3 at hand (a checkout, pip's isolated
build) the C is generated from ``cext/*.pyx`` as usual.  Without it (Debian
bookworm's cython3 is 0.29, and its package build cannot fetch from PyPI) the
build compiles the C files an sdist carries: ``sdist`` generates every
``cext/NAME.c`` with Cython 3 and records in ``cext/GENERATED`` the Cython
version and the SHA-256 of each ``.pyx`` it was generated from, and a build
without Cython 3 uses those C files only if every hash still matches (see
docs/packaging.md).
"""

import hashlib
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
CEXT = HERE / "cext"
GENERATED = CEXT / "GENERATED"
DEBUG = os.environ.get("CYCLEMIRROR_DEBUG") == "1"
ONLY = {m for m in os.environ.get("CYCLEMIRROR_ONLY", "").split(",") if m}

compile_args = ["-Wall", "-Wextra", "-Wno-unused-function", "-Wno-unused-parameter"]
compile_args += ["-O0", "-g"] if DEBUG else ["-O3"]
macros = []
if DEBUG:
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "linetrace": DEBUG,
    "embedsignature": True,
}

OPTIONAL_LIBS = {"rbd": ["rbd", "rados"]}  # modules built only where their libraries are
OPTIONAL_HEADERS = {"rbd": ["rbd/librbd.h", "rados/librados.h"]}


def _headers_present(names: list[str]) -> bool:
    dirs = [Path("/usr/include"), Path("/usr/local/include")]
    dirs += [Path(d) for d in os.environ.get("CPATH", "").split(":") if d]
    return all(any((d / n).is_file() for d in dirs) for n in names)


def _wanted(stem: str) -> bool:
    if ONLY and stem not in ONLY:
        return False
    if stem == "rbd" and os.environ.get("CYCLEMIRROR_NO_RBD") == "1":
        return False
    if stem in OPTIONAL_HEADERS and "sdist" not in sys.argv[1:] \
            and not _headers_present(OPTIONAL_HEADERS[stem]):
        print(f"setup.py: leaving out cyclemirror._cext.{stem}: its headers "
              f"({', '.join(OPTIONAL_HEADERS[stem])}) are not installed; RBD targets need "
              "it (Debian: apt-get install librbd-dev librados-dev, then rebuild)",
              file=sys.stderr)
        return False
    return True


SOURCES = sorted(p for p in CEXT.glob("*.pyx") if _wanted(p.stem))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cython3():
    """Cython's version and cythonize if it is Cython 3 or newer, else (version or None, None)."""
    try:
        import Cython
        from Cython.Build import cythonize
    except ImportError:
        return None, None
    if int(Cython.__version__.split(".")[0]) < 3:
        return Cython.__version__, None
    return Cython.__version__, cythonize


# Libraries each module links with; the others link with the compression and hash ones.
LIBRARIES = {"tlsrelay": ["ssl", "crypto"],  # OpenSSL: TLS-PSK for the NBD export (libssl-dev)
             "btrfsitems": []}  # parsing only: libc


def _extension(stem: str, source: Path) -> Extension:
    return Extension(
        f"cyclemirror._cext.{stem}",
        [str(source.relative_to(HERE))],
        include_dirs=["cext"],  # no numpy headers: the modules use only memoryviews
        libraries=LIBRARIES.get(stem, ["xxhash", "lz4", "zstd"]) + OPTIONAL_LIBS.get(stem, []),
        extra_compile_args=compile_args,
        define_macros=macros,
    )


def _pregenerated() -> list[Extension]:
    """Extensions from the sdist's C files, after checking they match the .pyx sources."""
    if not GENERATED.is_file():
        return []
    recorded = {}
    for line in GENERATED.read_text().splitlines():
        if line and not line.startswith("#"):
            digest, name = line.split()
            recorded[name] = digest
    stale = [p.name for p in SOURCES if recorded.get(p.name) != _sha256(p)
             or not p.with_suffix(".c").is_file()]
    if stale:
        raise SystemExit(
            f"setup.py: cext/GENERATED does not match {', '.join(stale)}: the C files were "
            "generated from other sources.  Install Cython 3 (pip install 'Cython>=3') to "
            "generate them anew, or build from an unmodified sdist.")
    return [_extension(p.stem, p.with_suffix(".c")) for p in SOURCES]


class SdistWithC(sdist):
    """sdist that carries C generated by Cython 3 and its record in cext/GENERATED."""

    def run(self):
        version, cythonize = _cython3()
        if cythonize is None or DEBUG or ONLY:
            raise SystemExit("setup.py sdist: needs Cython 3 and a release build "
                             "(no CYCLEMIRROR_DEBUG or CYCLEMIRROR_ONLY) to generate the C it carries")
        cythonize([_extension(p.stem, p) for p in SOURCES], compiler_directives=directives,
                  quiet=True, force=True)
        lines = [f"# C files generated by Cython {version}; SHA-256 of the source of each:"]
        lines += [f"{_sha256(p)} {p.name}" for p in SOURCES]
        GENERATED.write_text("\n".join(lines) + "\n")
        super().run()


def extensions() -> list[Extension]:
    if "sdist" in sys.argv[1:]:
        return [_extension(p.stem, p) for p in SOURCES]  # SdistWithC generates the C
    version, cythonize = _cython3()
    if cythonize is not None:
        return cythonize([_extension(p.stem, p) for p in SOURCES],
                         compiler_directives=directives, quiet=True)
    if DEBUG:
        raise SystemExit("setup.py: CYCLEMIRROR_DEBUG=1 needs Cython 3 (pip install 'Cython>=3')")
    pregenerated = _pregenerated()
    if pregenerated:
        return pregenerated
    found = f"Cython {version}" if version else "no Cython"
    raise SystemExit(f"setup.py: the compiled modules need Cython 3 (found {found}); "
                     "pip install 'Cython>=3', or build from an sdist, which carries the C "
                     "generated by Cython 3")


setup(ext_modules=extensions(), cmdclass={"sdist": SdistWithC})
