"""The environment for child processes the tests start (daemons, crash children).

A child must import the very cyclemirror this test process imported: the
source tree during development (PYTHONPATH=src with an in-place build), the
installed wheel under tox (where src/ holds no compiled modules).  The repo
root comes next so children can import tests.support modules.
"""

import os

import cyclemirror

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cyclemirror.__file__)))
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(**extra) -> dict:
    """os.environ with PYTHONPATH led by the imported package, plus ``extra`` as strings."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_ROOT, REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    env.update({k: str(v) for k, v in extra.items()})
    return env
