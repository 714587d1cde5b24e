"""A store's own state files: ``volume.json`` (Volume.open) and ``store.json`` (Store.open).

Byte 0 picks the file (even: volume.json, odd: store.json); the rest is its
new content, written into a fresh copy of a small real store (a 64 KiB
volume ``v`` with a frozen overlay, so recovery and merges have something
to do).  Opening must succeed or raise a CycleMirrorError (StoreError,
NotFoundError, ...): never a KeyError after validation passed.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

from cyclemirror.store import Store
from cyclemirror.store.volume import Volume
from fuzz.harness import clean, fast_tmp

MAX_LEN = 4096
_root = tempfile.mkdtemp(prefix="cm-fuzz-volume-", dir=fast_tmp())
atexit.register(shutil.rmtree, _root, True)
_template = os.path.join(_root, "template")
_work = os.path.join(_root, "work")


def _make_template() -> None:
    store = Store.create(_template, node_name="fuzz")
    vol = store.create_volume("v", 65536, 4096)
    vol.write(0, b"a" * 8192)
    vol.freeze()
    vol.write(4096, b"b" * 4096)
    store.close()


_make_template()
# The template's files, kept in memory: rewriting them per input costs far less than a copy.
_files: dict[str, bytes] = {}
for _dirpath, _dirs, _names in os.walk(_template):
    for _name in _names:
        _full = os.path.join(_dirpath, _name)
        with open(_full, "rb") as _fh:
            _files[os.path.relpath(_full, _template)] = _fh.read()
shutil.copytree(_template, _work)


_paths = {os.path.join(_work, rel): content for rel, content in _files.items()}
_dirs = {os.path.dirname(p) for p in _paths}
_stamps: dict[str, tuple] = {}


def _stamp(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _restore() -> None:
    """Put the work store back as the template was (opening may merge, delete, rewrite);
    only files whose stamp changed are rewritten."""
    for d in _dirs:
        for name in os.listdir(d):
            full = os.path.join(d, name)
            if full not in _paths and full not in _dirs and os.path.isfile(full):
                os.unlink(full)
    for full, content in _paths.items():
        if full in _stamps and _stamps[full] == _stamp(full):
            continue
        with open(full, "wb") as fh:
            fh.write(content)
        _stamps[full] = _stamp(full)


def seeds() -> list[bytes]:
    with open(os.path.join(_template, "volumes", "v", "volume.json"), "rb") as fh:
        vol = fh.read()
    with open(os.path.join(_template, "store.json"), "rb") as fh:
        st = fh.read()
    state = json.loads(vol)
    no_closed = dict(state, overlays=[{"number": o["number"]} for o in state["overlays"]])
    no_merging = {k: v for k, v in state.items() if k != "merging"}
    merging = dict(state, merging=state["merged_through"] + 1, merge_mode="copy")
    return [b"\x00" + vol, b"\x01" + st, b"\x00" + json.dumps(no_closed).encode(),
            b"\x00" + json.dumps(no_merging).encode(), b"\x00" + json.dumps(merging).encode(),
            b"\x00" + json.dumps(dict(state, size="big")).encode(), b"\x00" + b"[" * 4000]


def _open_volume() -> None:
    vol = Volume.open("v", os.path.join(_work, "volumes", "v"))
    try:
        vol.read(0, 4096)
    finally:
        vol.close()


def _open_store() -> None:
    Store.open(_work).close()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    _restore()
    name = os.path.join(_work, "store.json") if data[0] & 1 else os.path.join(
        _work, "volumes", "v", "volume.json")
    with open(name, "wb") as fh:
        fh.write(data[1:])
    clean(_open_store if data[0] & 1 else _open_volume)
