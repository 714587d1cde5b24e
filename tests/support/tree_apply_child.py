"""Child process of test_tree_crash: apply one tree delta from a file, with failpoints.

    python -m tests.support.tree_apply_child ROOT NAME DELTA_FILE [FAILPOINT=SECONDS ...]

Prints "applied N" when the cycle is applied; the test kills it with SIGKILL
before that, at a moment it picks.
"""

from __future__ import annotations

import sys

from cyclemirror import failpoints
from cyclemirror.receiver.treeops import TreeMirror
from cyclemirror.wire import treeframes


def main() -> None:
    root, name, delta = sys.argv[1:4]
    for spec in sys.argv[4:]:
        fp, _, seconds = spec.partition("=")
        failpoints.enable(fp, float(seconds))
    mirror = TreeMirror(root, name)
    with open(delta, "rb") as fh:
        reader = treeframes.TreeFrameReader(treeframes.read_exact_from(fh))
        print("applied", mirror.apply(reader.events()), flush=True)


if __name__ == "__main__":
    main()
