"""Child process of test_tree_postgres: the source's half of tree cycles, to kill -9.

    python -m tests.support.tree_source_child STORE NAME OUT_DIR CYCLES

Opens the tree object (its crash recovery runs), then CYCLES times: freeze,
the delta from the previous snapshot, its frames into OUT_DIR/cycle-K.frames
(written to a temporary name, then renamed).  Prints "ready" once the object
is open and "frozen K" after each freeze; the test kills it with SIGKILL at
a moment it picks.
"""

from __future__ import annotations

import os
import sys

from cyclemirror.store.tree import TreeObject
from cyclemirror.wire import treeframes


def opener(snapshot: str):
    return lambda rel: os.open(os.path.join(snapshot, rel), os.O_RDONLY | os.O_NOFOLLOW)


def main() -> None:
    store, name, out, cycles = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    obj = TreeObject(store, name)
    print("ready", flush=True)
    for _ in range(cycles):
        k = obj.freeze()
        print("frozen", k, flush=True)
        delta = obj.delta(k)
        tmp = os.path.join(out, f".cycle-{k}.tmp")
        with open(tmp, "wb") as fh:
            for frame in treeframes.encode_tree_delta(
                    delta.ops, opener(obj.snapshot_path(k)), k, obj.freeze_time(k), k == 1):
                fh.write(frame)
        os.rename(tmp, os.path.join(out, f"cycle-{k}.frames"))


if __name__ == "__main__":
    main()
