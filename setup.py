"""Extension modules only; all other metadata lives in pyproject.toml.

Every ``cext/NAME.pyx`` becomes ``cyclemirror._cext.NAME``.
Environment switches:
  CYCLEMIRROR_DEBUG=1   bounds checks, wraparound checks and line tracing on, -O0 -g
  CYCLEMIRROR_ONLY=a,b  build only these modules (for fast iteration on one module)
"""

import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
DEBUG = os.environ.get("CYCLEMIRROR_DEBUG") == "1"
ONLY = {m for m in os.environ.get("CYCLEMIRROR_ONLY", "").split(",") if m}

compile_args = ["-Wall", "-Wextra", "-Wno-unused-function", "-Wno-unused-parameter"]
compile_args += ["-O0", "-g"] if DEBUG else ["-O3"]
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if DEBUG:
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

extensions = [
    Extension(
        f"cyclemirror._cext.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        include_dirs=["cext", numpy.get_include()],
        libraries=["xxhash", "lz4", "zstd"],
        extra_compile_args=compile_args,
        define_macros=macros,
    )
    for pyx in sorted((HERE / "cext").glob("*.pyx"))
    if not ONLY or pyx.stem in ONLY
]

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "linetrace": DEBUG,
    "embedsignature": True,
}

setup(ext_modules=cythonize(extensions, compiler_directives=directives, quiet=True))
